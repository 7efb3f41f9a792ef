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
wait_http() { for _ in $(seq 1 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "bench: $1 did not come up" >&2; exit 1; }
# Resident memory of the processes given, KiB.
rss_kib() { local t=0; for p in $1; do t=$(( t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status") )); done; echo "$t"; }
