#!/usr/bin/env bash
# Memory per idle client connection: N keep-alive connections, each after one
# proxied GET, held open; RSS of the proxy before, while they are held, and
# after they close. edge-router, a bare Pingora proxy and nginx, in one run.
#
#   bench/idle-connections.sh                 10,000 connections
#   bench/idle-connections.sh --connections N
#   bench/idle-connections.sh --only edge-router   (or bare, nginx)
#   EDGE_ENV="MIMALLOC_PURGE_DELAY=0" bench/idle-connections.sh   (allocator settings for edge-router)
set -euo pipefail
cd "$(dirname "$0")/.."

N=10000 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) N=$2; shift ;;
    --only) ONLY=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

scripts/ensure-build-deps
. bench/lib.sh
ensure_nginx

echo "idle: building release binaries" >&2
cargo build --release -q -p edge-router -p edge-loadtest --bin edge-router --bin edge-loadtest --example bare_pingora
BIN=$PWD/target/release

# Each process here holds N client sockets plus a few: raise the soft limit
# as far as the hard limit allows, and fewer connections if it is too low.
HARD=$(ulimit -Hn)
WANT=$(( N + 1024 ))
if [ "$HARD" != unlimited ] && [ "$HARD" -lt "$WANT" ]; then
  N=$(( HARD - 1024 ))
  echo "idle: open-file limit $HARD: measuring $N connections" >&2
  WANT=$HARD
fi
ulimit -n "$WANT"

O_PORT=$(free_port); N_PORT=$(free_port); E_PORT=$(free_port); A_PORT=$(free_port); B_PORT=$(free_port)
"$BIN/edge-loadtest" origin --listen "127.0.0.1:$O_PORT" --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$O_PORT/health"

cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections $(( N * 2 + 1024 )); }
http {
  access_log $WORK/nginx-access.log;
  keepalive_timeout 300s;
  client_body_temp_path $WORK/body;
  proxy_temp_path $WORK/proxy;
  upstream origin { server 127.0.0.1:$O_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$N_PORT backlog=4096;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" &
PIDS+=($!)
NGINX_MASTER=$!

cat > "$WORK/edge.toml" <<EDGE
[server]
region = "bench"
listen = ["127.0.0.1:$E_PORT"]
threads = 1
keepalive_timeout = "300s"
max_connections = $(( N * 2 ))
[admin]
listen = "127.0.0.1:$A_PORT"
[upstreams.origin]
health = { path = "/health", interval = "2s" }
backends.bench = ["127.0.0.1:$O_PORT"]
[[routes]]
host = "*"
upstream = "origin"
EDGE
env ${EDGE_ENV:-} EDGE_LOG=warn "$BIN/edge-router" run -c "$WORK/edge.toml" 2>"$WORK/edge.log" &
PIDS+=($!)
EDGE_PID=$!

"$BIN/examples/bare_pingora" "127.0.0.1:$B_PORT" "127.0.0.1:$O_PORT" 2>"$WORK/bare.log" &
PIDS+=($!)
BARE_PID=$!

wait_http "http://127.0.0.1:$N_PORT/x"
wait_http "http://127.0.0.1:$E_PORT/x"
wait_http "http://127.0.0.1:$B_PORT/x"
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)

# Opens N connections, one GET each (Host set, keep-alive), holds them until
# told (a line on stdin), then closes them all.
cat > "$WORK/hold.py" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
req = b"GET /x HTTP/1.1\r\nHost: bench\r\n\r\n"
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection {i} closed by the proxy before a response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"connection {i} closed mid-body")
        body += chunk
    socks.append(s)
print("held", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
PY

measure() { # name pids port
  local name=$1 pids=$2 port=$3
  local before held after
  before=$(rss_kib "$pids")
  coproc HOLD { python3 "$WORK/hold.py" "$port" "$N"; }
  read -r _ <&"${HOLD[0]}"
  sleep 2
  held=$(rss_kib "$pids")
  echo >&"${HOLD[1]}"
  read -r _ <&"${HOLD[0]}"
  wait "$HOLD_PID" 2>/dev/null || true
  sleep 3
  after=$(rss_kib "$pids")
  awk -v name="$name" -v n="$N" -v b="$before" -v h="$held" -v a="$after" \
    'BEGIN { printf "| %s | %d | %.1f | %.1f | %.2f | %.1f |\n", name, n, b/1024, h/1024, (h-b)/n, a/1024 }'
}

echo "| proxy | idle connections | RSS before MiB | RSS held MiB | KiB per connection | RSS after close MiB |"
echo "|---|---:|---:|---:|---:|---:|"
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }
if want edge-router; then measure "edge-router${EDGE_ENV:+ ($EDGE_ENV)}" "$EDGE_PID" "$E_PORT"; fi
if want bare; then measure "bare Pingora 0.9.1" "$BARE_PID" "$B_PORT"; fi
if want nginx; then measure "nginx" "$NGINX_MASTER $NGINX_WORKER" "$N_PORT"; fi
