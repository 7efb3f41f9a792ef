# Shared by the bench scripts (sourced): nginx on a fresh Debian machine, a
# work folder cleaned up on exit with every process started, and helpers.

ensure_nginx() {
  if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    echo "bench: installing nginx" >&2
    local sudo=""; [ "$(id -u)" = "0" ] || sudo=sudo
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nginx >/dev/null
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

# Varnish, for the cache-hit rows of bench/run.sh: installed from Debian when
# missing. VARNISHD is empty when it cannot be had (no apt, no root and no
# sudo, install failed); the varnish row is then skipped, not failed.
ensure_varnish() {
  VARNISHD=$(command -v varnishd || { [ -x /usr/sbin/varnishd ] && echo /usr/sbin/varnishd; } || true)
  [ -n "$VARNISHD" ] && return 0
  local sudo=""
  if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bench: varnish missing and this user cannot install packages" >&2; return 0; }
    sudo=sudo
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "bench: varnish missing and no apt-get to install it" >&2; return 0; }
  echo "bench: installing varnish" >&2
  if DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >/dev/null 2>&1 &&
     DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends varnish >/dev/null 2>&1; then
    VARNISHD=$(command -v varnishd || echo /usr/sbin/varnishd)
  else
    echo "bench: could not install varnish (apt-get install varnish failed)" >&2
  fi
}

# WORK: a fresh folder; PIDS: processes to stop on exit (append with PIDS+=($!)).
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid" 2>/dev/null)" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_http URL [TRIES]: until a GET of URL succeeds, every 0.1 s, TRIES (100) times at most.
wait_http() { for _ in $(seq 1 "${2:-100}"); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "bench: $1 did not come up" >&2; exit 1; }
# Resident memory of the processes given, KiB.
rss_kib() { local t=0; for p in $1; do t=$(( t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status") )); done; echo "$t"; }

# TLS rows. wait_https URL CA [TRIES]: like wait_http, the server's
# certificate verified against CA (the name in URL included).
wait_https() { for _ in $(seq 1 "${3:-100}"); do curl -fsS --cacert "$2" -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "bench: $1 did not come up (over TLS, CA $2)" >&2; exit 1; }
# nginx has TLS (the ssl module), as Debian's package has.
nginx_has_ssl() { "$NGINX" -V 2>&1 | grep -q -- '--with-http_ssl_module'; }
# log_lines FILE: lines in FILE so far (0 when it does not exist yet).
log_lines() { if [ -f "$1" ]; then wc -l < "$1"; else echo 0; fi; }
# new_conns FILE FROM: TLS connections logged in FILE after line FROM, as
# "FULL RESUMED": requests whose log line ends "$ssl_session_reused
# $connection_requests" with $connection_requests 1 (a connection's first
# request; "r" = resumed, "." = full handshake). Health probes (/.edge/health)
# are left out: edge-router's peer probes open a connection each.
new_conns() {
  tail -n +"$(( $2 + 1 ))" "$1" |
    awk '$NF == 1 && index($0, "/.edge/health") == 0 { if ($(NF-1) == "r") r++; else f++ } END { print f + 0, r + 0 }'
}
