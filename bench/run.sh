#!/usr/bin/env bash
# Benchmark edge-router against nginx on loopback, side by side, in
# interleaved rounds. See docs/benchmarks.md for what is measured and why.
#
#   bench/run.sh            full run (3 rounds, 10 s phases)
#   bench/run.sh --quick    1 round, 3 s phases (CI smoke; no thresholds)
#   options: --rounds N --rate R --duration D --connections C --size BYTES
#   EDGE_BIN=path/to/edge-router bench/run.sh   measure another build (e.g. an older commit)
#   EDGE_ENV="MIMALLOC_PURGE_DELAY=0" bench/run.sh   run edge-router with these variables
#   EDGE_BIN_B=path/to/other/edge-router bench/run.sh  A/B: a second build as target
#     "edge-router-b", interleaved round by round with the others (same config)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0 ROUNDS=3 RATE=8000 DURATION=10s WARMUP=2s CONNS=32 SIZE=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; ROUNDS=1; DURATION=3s; WARMUP=1s ;;
    --rounds) ROUNDS=$2; shift ;;
    --rate) RATE=$2; shift ;;
    --duration) DURATION=$2; shift ;;
    --connections) CONNS=$2; shift ;;
    --size) SIZE=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

scripts/ensure-build-deps
. bench/lib.sh
ensure_nginx
command -v python3 >/dev/null || { echo "bench: python3 is needed to summarise results" >&2; exit 1; }

echo "bench: building release binaries" >&2
cargo build --release -q -p edge-router -p edge-loadtest
BIN=$PWD/target/release

# Two cores: the proxies on core 0; the load generator and the origin on the last core.
NCPU=$(nproc)
PROXY_CORE=0
LOAD_CORE=$(( NCPU > 1 ? NCPU - 1 : 0 ))
TCK=$(getconf CLK_TCK)

O_PORT=$(free_port); N_PORT=$(free_port); E_PORT=$(free_port); A_PORT=$(free_port)
EB_PORT=$(free_port); AB_PORT=$(free_port)

taskset -c "$LOAD_CORE" "$BIN/edge-loadtest" origin --listen "127.0.0.1:$O_PORT" --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$O_PORT/health"

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
  }
}
NGINX
taskset -c "$PROXY_CORE" "$NGINX" -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
NGINX_MASTER=$!

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
# The access log is on (info), as nginx's is: both write a line per request to a file.
env ${EDGE_ENV:-} EDGE_LOG=info taskset -c "$PROXY_CORE" "${EDGE_BIN:-$BIN/edge-router}" run -c "$WORK/edge.toml" 2>"$WORK/edge.log" &
PIDS+=($!)
EDGE_PID=$!
EDGE_B_PID=""
if [ -n "${EDGE_BIN_B:-}" ]; then
  sed -e "s/127.0.0.1:$E_PORT/127.0.0.1:$EB_PORT/" -e "s/127.0.0.1:$A_PORT/127.0.0.1:$AB_PORT/" "$WORK/edge-base.toml" > "$WORK/edge-b.toml"
  env ${EDGE_ENV:-} EDGE_LOG=info taskset -c "$PROXY_CORE" "$EDGE_BIN_B" run -c "$WORK/edge-b.toml" 2>"$WORK/edge-b.log" &
  PIDS+=($!)
  EDGE_B_PID=$!
fi

PATHQ="/bench?size=$SIZE"
wait_http "http://127.0.0.1:$N_PORT$PATHQ"
wait_http "http://127.0.0.1:$E_PORT$PATHQ"
[ -n "$EDGE_B_PID" ] && wait_http "http://127.0.0.1:$EB_PORT$PATHQ"
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)
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

cpu_ticks() { local t=0; for p in $1; do t=$(( t + $(awk '{print $14 + $15}' "/proc/$p/stat") )); done; echo "$t"; }
load() { taskset -c "$LOAD_CORE" "$BIN/edge-loadtest" run "$@" >/dev/null; }
# Extra request headers of target $1, as edge-loadtest arguments.
headers_of() { if [ -n "${HEADER_OF[$1]:-}" ]; then printf '%s\n' -H "${HEADER_OF[$1]}"; fi; }

echo "bench: warm-up" >&2
for t in "${TARGETS[@]}"; do
  mapfile -t H < <(headers_of "$t")
  load "${URL[$t]}" "${H[@]}" -c "$CONNS" -d 1s --warmup 0s --json "$WORK/warm.json"
done

for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    echo "bench: round $r/$ROUNDS $t" >&2
    pids=${PIDS_OF[$t]}
    mapfile -t H < <(headers_of "$t")
    before=0; [ -n "$pids" ] && before=$(cpu_ticks "$pids")
    load "${URL[$t]}" "${H[@]}" -c "$CONNS" -d "$DURATION" --warmup 0s --json "$WORK/closed-$t-$r.json"
    after=0; [ -n "$pids" ] && after=$(cpu_ticks "$pids")
    echo "$(( after - before ))" > "$WORK/cpu-$t-$r.ticks"
    load "${URL[$t]}" "${H[@]}" --rate "$RATE" -c 64 -d "$DURATION" --warmup "$WARMUP" --json "$WORK/rate-$t-$r.json"
    rss=0; [ -n "$pids" ] && rss=$(rss_kib "$pids")
    echo "$rss" > "$WORK/rss-$t-$r.kib"
  done
done

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
KIND=$([ "$QUICK" = 1 ] && echo quick || echo full)
OUT=bench/results/$STAMP-$KIND
BENCH_TARGETS="${TARGETS[*]}" python3 bench/summarise.py "$WORK" "$ROUNDS" "$TCK" "$RATE" "$SIZE" "$CONNS" "$DURATION" "$KIND" "$OUT" \
  "$(nginx -v 2>&1 | head -1)" "$(uname -r)" "$NCPU"
