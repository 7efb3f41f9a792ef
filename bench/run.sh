#!/usr/bin/env bash
# Benchmark edge-router against nginx on loopback, side by side, in
# interleaved rounds. See docs/benchmarks.md for what is measured and why.
#
#   bench/run.sh            full run (3 rounds, 10 s phases)
#   bench/run.sh --quick    1 round, 3 s phases (CI smoke; no thresholds)
#   options: --rounds N --rate R --duration D --connections C --size BYTES
#            --handshake-rate R --no-tls
#   EDGE_BIN=path/to/edge-router bench/run.sh   measure another build (e.g. an older commit)
#   EDGE_ENV="MIMALLOC_PURGE_DELAY=0" bench/run.sh   run edge-router with these variables
#   EDGE_BIN_B=path/to/other/edge-router bench/run.sh  A/B: a second build as target
#     "edge-router-b", interleaved round by round with the others (same config)
#   Cache-hit rows (docs/benchmarks.md, "Cache hit path"): nginx-cache, varnish
#     and edge-router-cache (edge-router-b-cache in an A/B) serve one cached
#     response; a row is skipped when its tool or the build's cache is missing.
#   TLS rows (docs/benchmarks.md, "TLS"): nginx-https / edge-router-https (keep-alive
#     over TLS), nginx-handshake / edge-router-handshake (a new TLS connection per
#     request, fixed-rate phase at --handshake-rate, default 1000/s) and nginx-hop-tls /
#     edge-router-hop-tls (forwarding to a TLS peer); separate processes with 2 workers
#     each. --no-tls leaves them out; a proxy without TLS support is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0 ROUNDS=3 RATE=8000 DURATION=10s WARMUP=2s CONNS=32 SIZE=1024 HS_RATE=1000 TLS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; ROUNDS=1; DURATION=3s; WARMUP=1s ;;
    --rounds) ROUNDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --connections) CONNS=$2; shift ;;
    --size) SIZE=$2; shift ;;
    --handshake-rate) HS_RATE=$2; shift ;;
    --no-tls) TLS=0 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

scripts/ensure-build-deps
. bench/lib.sh
ensure_nginx
ensure_varnish
command -v python3 >/dev/null || { echo "bench: python3 is needed to summarise results" >&2; exit 1; }

echo "bench: building release binaries" >&2
cargo build --release -q -p edge-router -p edge-loadtest
BIN=$PWD/target/release
# Regions sign their hops with a shared secret; `check` reads it as `run` does.
export EDGE_HOP_SECRET="${EDGE_HOP_SECRET:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')}"

# Two cores: the proxies on core 0; the load generator and the origin on the last core.
NCPU=$(nproc)
PROXY_CORE=0
LOAD_CORE=$(( NCPU > 1 ? NCPU - 1 : 0 ))
TCK=$(getconf CLK_TCK)

O_PORT=$(free_port); N_PORT=$(free_port); E_PORT=$(free_port); A_PORT=$(free_port)
EB_PORT=$(free_port); AB_PORT=$(free_port); V_PORT=$(free_port)

taskset -c "$LOAD_CORE" "$BIN/edge-loadtest" origin --listen "127.0.0.1:$O_PORT" --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$O_PORT/health"

# The cache-hit rows ask the same origin for a response it marks cacheable for
# longer than any run (the origin sets Cache-Control from the query), so that
# after the warm-up every measured request is a hit.
CACHE_PATHQ="/cache/bench?size=$SIZE&cache-control=public%2C%20max-age%3D3600"

# nginx's workers run as another user when the script runs as root; they write
# the cache under $WORK, so they must be able to enter it.
chmod 711 "$WORK"
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/nginx-access.log;
  # Like edge-router (Pingora), keep client connections open for the whole run.
  keepalive_requests 1000000;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  # The cache-hit row (nginx-cache): files under $WORK (read through the page
  # cache once warm), the keys zone in shared memory.
  proxy_cache_path $WORK/cache levels=1:2 keys_zone=bench:10m max_size=256m inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:$O_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$N_PORT;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_buffering on;
    }
    location /cache/ {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_buffering on;
      proxy_cache bench;
      # The key edge-router uses: scheme, host, path and query.
      proxy_cache_key \$scheme\$host\$request_uri;
      # Only for responses without freshness of their own: the origin's
      # Cache-Control (max-age=3600 here) takes precedence.
      proxy_cache_valid 200 10m;
      proxy_cache_lock on;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
NGINX
taskset -c "$PROXY_CORE" "$NGINX" -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
NGINX_MASTER=$!

# Varnish (the varnish row): a minimal VCL, the same origin, 256 MiB in memory.
# X-Cache is set here as edge-router and nginx set theirs. -j none: it runs as
# whoever runs the script (its default jail would need $WORK readable by
# Varnish's own users). One thread pool; threads per connection is its model.
VARNISH_PID=""
if [ -n "$VARNISHD" ]; then
  cat > "$WORK/varnish.vcl" <<VCL
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "$O_PORT"; }
sub vcl_deliver {
  if (obj.hits > 0) { set resp.http.X-Cache = "HIT"; } else { set resp.http.X-Cache = "MISS"; }
}
VCL
  taskset -c "$PROXY_CORE" "$VARNISHD" -F -j none -n "$WORK/varnish" -a "127.0.0.1:$V_PORT" \
    -f "$WORK/varnish.vcl" -s malloc,256m -p thread_pools=1 >"$WORK/varnish.log" 2>&1 &
  PIDS+=($!)
  VARNISH_PID=$!
else
  echo "bench: varnish row skipped: varnishd is not installed" >&2
fi

cat > "$WORK/edge-base.toml" <<EDGE
[server]
region = "bench"
listen = ["127.0.0.1:$E_PORT"]
threads = 1
[admin]
listen = "127.0.0.1:$A_PORT"
[upstreams.origin]
health = { path = "/health", interval = "2s" }
backends.bench = ["127.0.0.1:$O_PORT"]
[[routes]]
host = "*"
upstream = "origin"
policy = "local-first"
EDGE
# The same origin behind read-your-writes: the row "edge-router-ryw" sends a
# valid consistency token with every request (verified, then decided). Only
# the build under test gets it: an A/B's second build may predate it.
cat "$WORK/edge-base.toml" - > "$WORK/edge.toml" <<EDGE
[consistency]
# One token serves the whole run.
token_ttl = "1h"
[[routes]]
host = "*"
path_prefix = "/ryw"
upstream = "origin"
policy = "read-your-writes"
EDGE
# The cache-hit row's route: same origin, under /cache, cache = true. A build
# from before the cache refuses the key (unknown field `cache`): it runs
# without the route, and its cache row is skipped (below). Any other error in
# the config is a failure.
cat > "$WORK/cache-route.toml" <<EDGE
[[routes]]
host = "*"
path_prefix = "/cache"
upstream = "origin"
policy = "local-first"
cache = true
EDGE
# with_cache_route BIN CONFIG: the path of CONFIG plus the cache route if BIN
# accepts it, else of CONFIG.
with_cache_route() {
  local out="${2%.toml}-cache.toml" errors
  cat "$2" "$WORK/cache-route.toml" > "$out"
  if errors=$("$1" check -c "$out" 2>&1 >/dev/null); then echo "$out"; return 0; fi
  if grep -q 'unknown field `cache`' <<<"$errors"; then echo "$2"; return 0; fi
  printf 'bench: %s refuses the bench config:\n%s\n' "$1" "$errors" >&2
  return 1
}
EDGE_CONFIG=$(with_cache_route "${EDGE_BIN:-$BIN/edge-router}" "$WORK/edge.toml")
# The access log is on (info), as nginx's is: both write a line per request to a file.
env ${EDGE_ENV:-} EDGE_LOG=info taskset -c "$PROXY_CORE" "${EDGE_BIN:-$BIN/edge-router}" run -c "$EDGE_CONFIG" 2>"$WORK/edge.log" &
PIDS+=($!)
EDGE_PID=$!
EDGE_B_PID=""
if [ -n "${EDGE_BIN_B:-}" ]; then
  # The same config as the build under test when B accepts it (an A/B must
  # differ only in the binary); an older build gets the base config.
  if "$EDGE_BIN_B" check -c "$WORK/edge.toml" >/dev/null 2>&1; then
    EDGE_B_BASE=$(with_cache_route "$EDGE_BIN_B" "$WORK/edge.toml")
  else
    echo "bench: $EDGE_BIN_B refuses the read-your-writes config; it runs the base one" >&2
    EDGE_B_BASE=$(with_cache_route "$EDGE_BIN_B" "$WORK/edge-base.toml")
  fi
  sed -e "s/127.0.0.1:$E_PORT/127.0.0.1:$EB_PORT/" -e "s/127.0.0.1:$A_PORT/127.0.0.1:$AB_PORT/" "$EDGE_B_BASE" > "$WORK/edge-b.toml"
  env ${EDGE_ENV:-} EDGE_LOG=info taskset -c "$PROXY_CORE" "$EDGE_BIN_B" run -c "$WORK/edge-b.toml" 2>"$WORK/edge-b.log" &
  PIDS+=($!)
  EDGE_B_PID=$!
fi

PATHQ="/bench?size=$SIZE"
wait_http "http://127.0.0.1:$N_PORT$PATHQ"
wait_http "http://127.0.0.1:$E_PORT$PATHQ"
[ -n "$EDGE_B_PID" ] && wait_http "http://127.0.0.1:$EB_PORT$PATHQ"
# Varnish compiles its VCL with cc first: up to 30 s on a busy machine.
[ -n "$VARNISH_PID" ] && wait_http "http://127.0.0.1:$V_PORT$PATHQ" 300
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" -f "nginx: worker process" | head -1)
NGINX_CACHE_MANAGER=$(pgrep -P "$NGINX_MASTER" -f "nginx: cache manager process" | head -1 || true)
# A write through the read-your-writes route hands out the token the ryw row presents.
TOKEN=$(curl -s -D - -o /dev/null -X PUT "http://127.0.0.1:$E_PORT/ryw/write" \
  | awk -F': ' 'tolower($1) == "x-edge-consistency" { print $2 }' | tr -d '\r')
[ -n "$TOKEN" ] || { echo "bench: no consistency token from the read-your-writes route" >&2; exit 1; }

declare -A URL=( [direct]="http://127.0.0.1:$O_PORT$PATHQ" [nginx]="http://127.0.0.1:$N_PORT$PATHQ" [edge-router]="http://127.0.0.1:$E_PORT$PATHQ" )
declare -A PIDS_OF=( [direct]="" [nginx]="$NGINX_MASTER $NGINX_WORKER" [edge-router]="$EDGE_PID" )
TARGETS=(direct nginx edge-router edge-router-ryw)
URL[edge-router-ryw]="http://127.0.0.1:$E_PORT/ryw$PATHQ"
PIDS_OF[edge-router-ryw]="$EDGE_PID"
declare -A HEADER_OF=( [edge-router-ryw]="x-edge-consistency: $TOKEN" )
if [ -n "$EDGE_B_PID" ]; then
  URL[edge-router-b]="http://127.0.0.1:$EB_PORT$PATHQ"
  PIDS_OF[edge-router-b]="$EDGE_B_PID"
  TARGETS+=(edge-router-b)
fi

# Cache-hit rows. probe URL: GET it, keep the response head in $WORK/probe.head;
# probe_status / probe_header NAME read it (empty when absent).
probe() { curl -s -m 5 -D "$WORK/probe.head" -o /dev/null "$1" || : > "$WORK/probe.head"; }
probe_status() { awk 'NR == 1 { print $2 }' "$WORK/probe.head"; }
probe_header() { awk -F': ' -v h="$1" 'tolower($1) == h { v = $2 } END { print v }' "$WORK/probe.head" | tr -d '\r'; }
# until_hit URL HEADER: GET URL until HEADER says HIT, 5 s at most. Returns 1 if it never did.
until_hit() {
  for _ in $(seq 1 50); do
    probe "$1"
    [ "$(probe_header "$2")" = HIT ] && return 0
    sleep 0.1
  done
  return 1
}
# A cache row that does not hit is a broken row: stop the run, loudly.
no_hit() {
  echo "bench: $1: no cache hit after warm-up (status ${2:-none}, $3: ${4:-absent}); the last lines of $(basename "$5"):" >&2
  tail -n 20 "$5" >&2 || true
  exit 1
}
# The rows measure hits only; CACHE_HEADER_OF says which response header shows it.
declare -A CACHE_HEADER_OF=()
add_cache_row() { # NAME URL HEADER PIDS
  URL[$1]=$2; PIDS_OF[$1]=$4; CACHE_HEADER_OF[$1]=$3; TARGETS+=("$1")
}
if until_hit "http://127.0.0.1:$N_PORT$CACHE_PATHQ" x-cache-status; then
  add_cache_row nginx-cache "http://127.0.0.1:$N_PORT$CACHE_PATHQ" x-cache-status \
    "$NGINX_MASTER $NGINX_WORKER $NGINX_CACHE_MANAGER"
else
  no_hit nginx-cache "$(probe_status)" X-Cache-Status "$(probe_header x-cache-status)" "$WORK/nginx-error.log"
fi
if [ -n "$VARNISH_PID" ]; then
  if until_hit "http://127.0.0.1:$V_PORT$CACHE_PATHQ" x-cache; then
    add_cache_row varnish "http://127.0.0.1:$V_PORT$CACHE_PATHQ" x-cache "$VARNISH_PID $(pgrep -P "$VARNISH_PID" | tr '\n' ' ')"
  else
    no_hit varnish "$(probe_status)" X-Cache "$(probe_header x-cache)" "$WORK/varnish.log"
  fi
fi
# edge-router: the build has a cache if its answer on the cache route carries
# x-cache (a build without one routes /cache to the origin like any path). A
# build that has it must hit, and any non-2xx is a failure either way.
edge_cache_row() { # NAME PORT PID LOG
  local url="http://127.0.0.1:$2$CACHE_PATHQ"
  probe "$url"
  case "$(probe_status)" in
    2??) ;;
    *) no_hit "$1" "$(probe_status)" x-cache "$(probe_header x-cache)" "$4" ;;
  esac
  if [ -z "$(probe_header x-cache)" ]; then
    echo "bench: $1 skipped: this build has no cache (no x-cache header on the cache route)" >&2
    return 0
  fi
  # The first answer is a MISS; hits start once the invalidation consumer has synced.
  until_hit "$url" x-cache || no_hit "$1" "$(probe_status)" x-cache "$(probe_header x-cache)" "$4"
  add_cache_row "$1" "$url" x-cache "$3"
}
edge_cache_row edge-router-cache "$E_PORT" "$EDGE_PID" "$WORK/edge.log"
[ -n "$EDGE_B_PID" ] && edge_cache_row edge-router-b-cache "$EB_PORT" "$EDGE_B_PID" "$WORK/edge-b.log"

# TLS rows (docs/benchmarks.md, "TLS"). Processes of their own, 2 workers
# each (edge-router threads = 2, nginx worker_processes 2): the rows above
# run 1. On 2 cores both workers share core 0 with every other proxy (the
# last core is the generator's and the origin's); with 3 cores or more they
# get cores 0 and 1. Peer B of the hop rows runs on the last core: it is
# not what is measured.
TLS_CORES=$([ "$NCPU" -ge 3 ] && echo 0,1 || echo "$PROXY_CORE")
# LOAD_ARGS_OF: extra edge-loadtest arguments of a row (words, no spaces
# within one); RATE_OF: its fixed rate when not --rate; CONNLOG_OF: an nginx
# log whose new connections (full or resumed, new_conns) are counted over the
# closed-loop phase, CONNLOG_SIDE_OF saying whether they are the row's client
# connections ("client") or the proxy's connections to its upstream ("upstream").
declare -A LOAD_ARGS_OF=() RATE_OF=() CONNLOG_OF=() CONNLOG_SIDE_OF=()
: > "$WORK/tls-rows"
# A client's new TLS connection resumes a session the server handed out on an
# earlier one (edge-loadtest keeps rustls' client session cache; nginx and
# edge-router both resume by default), unless edge-loadtest can be told not
# to: then every handshake of a handshake row is a full one. nginx's log
# says which it was (client handshakes resumed, in the summary).
LOADTEST_HELP=$("$BIN/edge-loadtest" run --help)
HS_RESUME=resumed
if grep -q -- '--no-tls-resume' <<<"$LOADTEST_HELP"; then HS_RESUME=full; fi
# tls_row NAME URL PIDS CLIENT(https|http) CONN_REQUESTS(-: keep-alive) [LOG SIDE]
tls_row() {
  URL[$1]=$2; PIDS_OF[$1]=$3; TARGETS+=("$1")
  LOAD_ARGS_OF[$1]=""
  if [ "$4" = https ]; then LOAD_ARGS_OF[$1]="--insecure"; fi
  if [ "$5" != - ]; then LOAD_ARGS_OF[$1]+=" --conn-requests $5"; fi
  if [ "$4" = https ] && [ "$5" != - ] && [ "$HS_RESUME" = full ]; then LOAD_ARGS_OF[$1]+=" --no-tls-resume"; fi
  if [ "$5" = 1 ]; then RATE_OF[$1]=$HS_RATE; fi
  if [ -n "${6:-}" ]; then CONNLOG_OF[$1]=$6; CONNLOG_SIDE_OF[$1]=$7; fi
  printf '%s %s %s %s %s\n' "$1" "$4" "$5" "${RATE_OF[$1]:-$RATE}" "$HS_RESUME" >> "$WORK/tls-rows"
}
TLS_NGINX=0 TLS_EDGE=0
if [ "$TLS" = 1 ]; then
  if nginx_has_ssl; then TLS_NGINX=1; else echo "bench: nginx TLS rows skipped: this nginx has no ssl module (and peer B of the hop rows is an nginx)" >&2; fi
  TLS_EDGE=1
else
  echo "bench: TLS rows left out (--no-tls)" >&2
fi
if [ "$TLS" = 1 ]; then
  # One certificate for every TLS server of the run: edge-router's development
  # CA and a leaf it signed for localhost and 127.0.0.1 (ECDSA P-256).
  "$BIN/edge-router" cert dev --dir "$WORK/certs" >/dev/null
  CA=$WORK/certs/ca/ca.crt CRT=$WORK/certs/default.crt KEY=$WORK/certs/default.key
  NS_PORT=$(free_port); NH_PORT=$(free_port); B_PORT=$(free_port)
  ES_PORT=$(free_port); ESP_PORT=$(free_port); ESA_PORT=$(free_port)
  EH_PORT=$(free_port); EHS_PORT=$(free_port); EHA_PORT=$(free_port); DEAD_PORT=$(free_port)
fi
if [ "$TLS_NGINX" = 1 ]; then
  # Peer B, the upstream TLS terminator of both hop rows (never measured
  # itself): shared session cache and tickets, so a client that offers a
  # session resumes; nginx's default keepalive_requests (1000) closes each
  # proxy's connection after 1000 requests, so the proxies reconnect during
  # the run, resuming or not. Its log's last two fields are what new_conns
  # counts. It answers edge-router A's peer probes as an edge-router would:
  # the RegionReport of proxy/src/health/report.rs, with one healthy backend
  # of the upstream "origin" (an empty report would leave no region to send to).
  B_LISTEN="listen 127.0.0.1:$B_PORT ssl;"
  # edge-router A reaches it as https://localhost:B_PORT: the first address
  # localhost resolves to.
  B_FIRST=$(python3 -c 'import socket,sys; print(socket.getaddrinfo("localhost", int(sys.argv[1]), type=socket.SOCK_STREAM)[0][4][0])' "$B_PORT")
  [ "$B_FIRST" = 127.0.0.1 ] || B_LISTEN="$B_LISTEN listen [$B_FIRST]:$B_PORT ssl;"
  cat > "$WORK/nginx-b.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx-b.pid;
error_log $WORK/nginx-b-error.log warn;
events { worker_connections 4096; }
http {
  log_format reuse '\$remote_addr "\$request" \$status \$ssl_protocol \$ssl_session_reused \$connection_requests';
  access_log $WORK/nginx-b-access.log reuse;
  client_body_temp_path $WORK/body-b;
  proxy_temp_path $WORK/proxy-b;
  upstream origin { server 127.0.0.1:$O_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    $B_LISTEN
    ssl_certificate $CRT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:1m;
    ssl_session_tickets on;
    location = /.edge/health {
      default_type application/json;
      return 200 '{"status":"ok","region":"eu-west-1","upstreams":{"origin":{"healthy":1,"total":1}}}';
    }
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }
  }
}
NGINX
  taskset -c "$LOAD_CORE" "$NGINX" -c "$WORK/nginx-b.conf" -p "$WORK" &
  PIDS+=($!)
  # The TLS nginx: 2 workers; the HTTPS server (https and handshake rows) and
  # nginx A of the hop row (plain HTTP from clients, HTTPS to peer B). Its log
  # is the combined format plus the two fields new_conns reads.
  cat > "$WORK/nginx-tls.conf" <<NGINX
worker_processes 2;
daemon off;
pid $WORK/nginx-tls.pid;
error_log $WORK/nginx-tls-error.log warn;
events { worker_connections 4096; }
http {
  log_format tls '\$remote_addr - \$remote_user [\$time_local] "\$request" \$status \$body_bytes_sent "\$http_referer" "\$http_user_agent" \$ssl_session_reused \$connection_requests';
  access_log $WORK/nginx-tls-access.log tls;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/body-tls;
  proxy_temp_path $WORK/proxy-tls;
  upstream origin { server 127.0.0.1:$O_PORT; keepalive 64; keepalive_requests 1000000; }
  upstream peer_b { server 127.0.0.1:$B_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NS_PORT ssl;
    ssl_certificate $CRT;
    ssl_certificate_key $KEY;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_buffering on;
    }
  }
  server {
    listen 127.0.0.1:$NH_PORT;
    location / {
      proxy_pass https://peer_b;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_buffering on;
      proxy_ssl_protocols TLSv1.2 TLSv1.3;
      proxy_ssl_session_reuse on;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $CA;
      proxy_ssl_name localhost;
      proxy_ssl_server_name on;
    }
  }
}
NGINX
  taskset -c "$TLS_CORES" "$NGINX" -c "$WORK/nginx-tls.conf" -p "$WORK" &
  PIDS+=($!)
  NGINX_TLS_MASTER=$!
fi
# edge_tls_config BIN CONFIG NAME: whether BIN takes CONFIG; a build without
# TLS (unknown field `tls` or `peer_ca`) skips its rows, any other error fails.
edge_tls_config() {
  local errors
  if errors=$("$1" check -c "$2" 2>&1 >/dev/null); then return 0; fi
  if grep -qE 'unknown field `(tls|peer_ca|peer_cert|peer_key)`' <<<"$errors"; then
    echo "bench: $3 skipped: this build has no TLS listeners or peer TLS" >&2
    return 1
  fi
  printf 'bench: %s refuses the %s config:\n%s\n' "$1" "$3" "$errors" >&2
  exit 1
}
EDGE_TLS_PID="" EDGE_HOP_PID=""
if [ "$TLS_EDGE" = 1 ]; then
  # edge-router over TLS: the base config (same route, same features, the
  # access log on) with 2 threads and a TLS listener.
  sed -e "s/127.0.0.1:$E_PORT/127.0.0.1:$ESP_PORT/" -e "s/127.0.0.1:$A_PORT/127.0.0.1:$ESA_PORT/" \
    -e 's/^threads = 1$/threads = 2/' "$WORK/edge-base.toml" > "$WORK/edge-tls.toml"
  cat >> "$WORK/edge-tls.toml" <<EDGE
[[server.tls]]
listen = "127.0.0.1:$ES_PORT"
certs = "$WORK/certs"
EDGE
  if edge_tls_config "${EDGE_BIN:-$BIN/edge-router}" "$WORK/edge-tls.toml" "edge-router-https/handshake"; then
    env ${EDGE_ENV:-} EDGE_LOG=info taskset -c "$TLS_CORES" "${EDGE_BIN:-$BIN/edge-router}" run -c "$WORK/edge-tls.toml" 2>"$WORK/edge-tls.log" &
    PIDS+=($!)
    EDGE_TLS_PID=$!
  fi
fi
if [ "$TLS_EDGE" = 1 ] && [ "$TLS_NGINX" = 1 ]; then
  # edge-router A of the hop row: region us-east-1, whose one backend is a
  # closed port (found down by the first probes), so every request fails over
  # to eu-west-1: peer B over mutual TLS (the dev CA as peer_ca, the dev leaf
  # as this region's certificate; B asks for none). Probes every second; the
  # peer is probed as often, each probe a new TLS connection (B's log counts
  # them apart). Plain HTTP from the clients, as nginx A.
  cat > "$WORK/edge-hop.toml" <<EDGE
[server]
region = "us-east-1"
listen = ["127.0.0.1:$EH_PORT"]
threads = 2
peer_ca = "$CA"
peer_cert = "$CRT"
peer_key = "$KEY"
[[server.tls]]
listen = "127.0.0.1:$EHS_PORT"
certs = "$WORK/certs"
[admin]
listen = "127.0.0.1:$EHA_PORT"
[regions.us-east-1]
[regions.eu-west-1]
peer = "https://localhost:$B_PORT"
[upstreams.origin]
health = { path = "/health", interval = "1s", timeout = "1s", healthy = 1, unhealthy = 2 }
backends.us-east-1 = ["127.0.0.1:$DEAD_PORT"]
backends.eu-west-1 = ["127.0.0.1:$O_PORT"]
[[routes]]
host = "*"
upstream = "origin"
policy = "local-first"
EDGE
  if edge_tls_config "${EDGE_BIN:-$BIN/edge-router}" "$WORK/edge-hop.toml" "edge-router-hop-tls"; then
    # Regions sign their hops with a shared secret (B, an nginx, ignores it).
    env ${EDGE_ENV:-} EDGE_LOG=info EDGE_HOP_SECRET="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" \
      taskset -c "$TLS_CORES" "${EDGE_BIN:-$BIN/edge-router}" run -c "$WORK/edge-hop.toml" 2>"$WORK/edge-hop.log" &
    PIDS+=($!)
    EDGE_HOP_PID=$!
  fi
fi
if [ "$TLS_NGINX" = 1 ]; then
  wait_https "https://localhost:$B_PORT$PATHQ" "$CA"
  wait_https "https://localhost:$NS_PORT$PATHQ" "$CA"
  wait_http "http://127.0.0.1:$NH_PORT$PATHQ"
  NGINX_TLS_WORKERS=$(pgrep -P "$NGINX_TLS_MASTER" -f "nginx: worker process" | tr '\n' ' ')
  tls_row nginx-https "https://127.0.0.1:$NS_PORT$PATHQ" "$NGINX_TLS_MASTER $NGINX_TLS_WORKERS" https - \
    "$WORK/nginx-tls-access.log" client
fi
if [ -n "$EDGE_TLS_PID" ]; then
  wait_https "https://localhost:$ES_PORT$PATHQ" "$CA"
  tls_row edge-router-https "https://127.0.0.1:$ES_PORT$PATHQ" "$EDGE_TLS_PID" https -
fi
if [ "$TLS_NGINX" = 1 ]; then
  tls_row nginx-handshake "https://127.0.0.1:$NS_PORT$PATHQ" "$NGINX_TLS_MASTER $NGINX_TLS_WORKERS" https 1 \
    "$WORK/nginx-tls-access.log" client
fi
if [ -n "$EDGE_TLS_PID" ]; then
  tls_row edge-router-handshake "https://127.0.0.1:$ES_PORT$PATHQ" "$EDGE_TLS_PID" https 1
fi
if [ "$TLS_NGINX" = 1 ]; then
  tls_row nginx-hop-tls "http://127.0.0.1:$NH_PORT$PATHQ" "$NGINX_TLS_MASTER $NGINX_TLS_WORKERS" http 100 \
    "$WORK/nginx-b-access.log" upstream
fi
if [ -n "$EDGE_HOP_PID" ]; then
  # Before measuring: A's /status shows the local backend down and peer B's
  # report read (an RTT is only measured from a report that parses, and until
  # one does A assumes the peer's configured backends are up), then a request
  # comes back 200 from eu-west-1. Else the run stops.
  hop_url="http://127.0.0.1:$EH_PORT$PATHQ"
  hop_state() {
    { curl -s -m 2 "http://127.0.0.1:$EHA_PORT/status" 2>/dev/null || true; } | python3 -c '
import json, sys
try:
    doc = json.load(sys.stdin)
except ValueError:
    print("no /status yet"); sys.exit()
peer = next((p for p in doc["peers"] if p["region"] == "eu-west-1"), {})
regions = {r["region"]: r for u in doc["upstreams"] if u["name"] == "origin" for r in u["regions"]}
local, far = regions.get("us-east-1", {}), regions.get("eu-west-1", {})
if local.get("healthy") == 0 and peer.get("healthy") and peer.get("rtt_ms") is not None and far.get("healthy", 0) > 0:
    print("ready")
else:
    print("local backends healthy {}, peer healthy {}, peer report read {}, eu-west-1 backends reported healthy {}".format(
        local.get("healthy"), peer.get("healthy"), peer.get("rtt_ms") is not None, far.get("healthy")))
'
  }
  for _ in $(seq 1 150); do
    state=$(hop_state)
    [ "$state" = ready ] && break
    sleep 0.1
  done
  probe "$hop_url"
  if [ "$state" != ready ] || [ "$(probe_status)" != 200 ] || [ "$(probe_header x-edge-upstream-region)" != eu-west-1 ]; then
    echo "bench: edge-router-hop-tls: not failing over to eu-west-1 through peer B after 15 s ($state; status $(probe_status), x-edge-upstream-region: $(probe_header x-edge-upstream-region)); the last lines of edge-hop.log and peer B's logs:" >&2
    tail -n 20 "$WORK/edge-hop.log" "$WORK/nginx-b-error.log" "$WORK/nginx-b-access.log" >&2 || true
    exit 1
  fi
  tls_row edge-router-hop-tls "$hop_url" "$EDGE_HOP_PID" http 100 "$WORK/nginx-b-access.log" upstream
fi

cpu_ticks() { local t=0; for p in $1; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done; echo "$t"; }
load() { taskset -c "$LOAD_CORE" "$BIN/edge-loadtest" run "$@" >/dev/null; }
# Extra edge-loadtest arguments of target $1: its request headers, then its
# LOAD_ARGS_OF words (TLS rows).
args_of() {
  if [ -n "${HEADER_OF[$1]:-}" ]; then printf '%s\n' -H "${HEADER_OF[$1]}"; fi
  local a; for a in ${LOAD_ARGS_OF[$1]:-}; do printf '%s\n' "$a"; done
}

echo "bench: warm-up" >&2
for t in "${TARGETS[@]}"; do
  mapfile -t H < <(args_of "$t")
  load "${URL[$t]}" "${H[@]}" -c "$CONNS" -d 1s --warmup 0s --json "$WORK/warm.json"
done

for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    echo "bench: round $r/$ROUNDS $t" >&2
    pids=${PIDS_OF[$t]}
    mapfile -t H < <(args_of "$t")
    connlog=${CONNLOG_OF[$t]:-}
    [ -n "$connlog" ] && from=$(log_lines "$connlog")
    before=0; [ -n "$pids" ] && before=$(cpu_ticks "$pids")
    load "${URL[$t]}" "${H[@]}" -c "$CONNS" -d "$DURATION" --warmup 0s --json "$WORK/closed-$t-$r.json"
    after=0; [ -n "$pids" ] && after=$(cpu_ticks "$pids")
    echo "$(( after - before ))" > "$WORK/cpu-$t-$r.ticks"
    # TLS rows: the new connections (full handshakes, resumed) logged over the closed-loop phase.
    [ -n "$connlog" ] && echo "${CONNLOG_SIDE_OF[$t]} $(new_conns "$connlog" "$from")" > "$WORK/conns-$t-$r.txt"
    load "${URL[$t]}" "${H[@]}" --rate "${RATE_OF[$t]:-$RATE}" -c 64 -d "$DURATION" --warmup "$WARMUP" --json "$WORK/rate-$t-$r.json"
    rss=0; [ -n "$pids" ] && rss=$(rss_kib "$pids")
    echo "$rss" > "$WORK/rss-$t-$r.kib"
  done
done

# Still hits after the rounds (max-age=3600 outlasts any run; nothing purges).
for t in "${!CACHE_HEADER_OF[@]}"; do
  probe "${URL[$t]}"
  [ "$(probe_header "${CACHE_HEADER_OF[$t]}")" = HIT ] || {
    echo "bench: $t: no longer a cache hit after the run (${CACHE_HEADER_OF[$t]}: $(probe_header "${CACHE_HEADER_OF[$t]}"))" >&2
    exit 1
  }
done

# The hop row still fails over to eu-west-1 through peer B.
if [ -n "$EDGE_HOP_PID" ]; then
  probe "${URL[edge-router-hop-tls]}"
  [ "$(probe_status)" = 200 ] && [ "$(probe_header x-edge-upstream-region)" = eu-west-1 ] || {
    echo "bench: edge-router-hop-tls: no longer served by eu-west-1 after the run (status $(probe_status), x-edge-upstream-region: $(probe_header x-edge-upstream-region))" >&2
    exit 1
  }
fi

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
KIND=$([ "$QUICK" = 1 ] && echo quick || echo full)
OUT=bench/results/$STAMP-$KIND
BENCH_TARGETS="${TARGETS[*]}" BENCH_TLS_CORES="${TLS_CORES:-}" python3 bench/summarise.py "$WORK" "$ROUNDS" "$TCK" "$RATE" "$SIZE" "$CONNS" "$DURATION" "$KIND" "$OUT" \
  "$("$NGINX" -v 2>&1 | head -1)${VARNISHD:+, $("$VARNISHD" -V 2>&1 | grep -o 'varnish-[0-9.]*' | head -1)}" "$(uname -r)" "$NCPU"
