#!/usr/bin/env bash
# Is edge-loadtest a trustworthy instrument? Compares it with oha against the
# same origin: closed-loop max rps with both pinned to one core, and p50 at a
# fixed moderate rate (oha measures from the actual send there, as edge-loadtest
# does when no request is overdue). Needs oha (`cargo install oha`; set OHA=/path/to/oha).
#   bench/generator.sh [--rate 2000] [--duration 5s]
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=2000 DURATION=5s
while [ $# -gt 0 ]; do
  case "$1" in --rate) RATE=$2; shift ;; --duration) DURATION=$2; shift ;; *) echo "unknown $1" >&2; exit 2 ;; esac
  shift
done
OHA=${OHA:-$(command -v oha || true)}
[ -x "$OHA" ] || { echo "oha not found: cargo install oha --locked, or set OHA=" >&2; exit 1; }
cargo build --release -q -p edge-loadtest
BIN=target/release
W=$(mktemp -d); trap 'kill $OP 2>/dev/null; rm -rf $W' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 $BIN/edge-loadtest origin --listen 127.0.0.1:$PORT --threads 1 >/dev/null 2>&1 & OP=$!
sleep 0.5
URL="http://127.0.0.1:$PORT/g?size=1024"
taskset -c 1 $BIN/edge-loadtest run "$URL" -c 32 -d 1s --warmup 0s >/dev/null

for round in 1 2 3 4 5; do
  taskset -c 1 $BIN/edge-loadtest run "$URL" -c 32 -d "$DURATION" --warmup 0s --json $W/el-max-$round.json >/dev/null
  taskset -c 1 "$OHA" "$URL" -c 32 -z "$DURATION" --worker-threads 1 --no-tui --output-format json > $W/oha-max-$round.json
  taskset -c 1 $BIN/edge-loadtest run "$URL" --rate "$RATE" -c 16 -d "$DURATION" --warmup 1s --json $W/el-rate-$round.json >/dev/null
  taskset -c 1 "$OHA" "$URL" -c 16 -q "$RATE" -z "$DURATION" --worker-threads 1 --no-tui --output-format json > $W/oha-rate-$round.json
done
python3 - "$W" "$RATE" <<'PY'
import json, statistics, sys
w, rate = sys.argv[1], sys.argv[2]
def j(p): return json.load(open(p))
el_max = [j(f"{w}/el-max-{r}.json")["achieved_rps"] for r in (1, 2, 3, 4, 5)]
oha_max = [j(f"{w}/oha-max-{r}.json")["summary"]["requestsPerSec"] for r in (1, 2, 3, 4, 5)]
el_p50 = [j(f"{w}/el-rate-{r}.json")["latency_ms"]["p50"] for r in (1, 2, 3, 4, 5)]
oha_p50 = [j(f"{w}/oha-rate-{r}.json")["latencyPercentiles"]["p50"] * 1000 for r in (1, 2, 3, 4, 5)]
m = statistics.median
print("| generator (1 core) | closed-loop rps, 32 conns | p50 ms at %s req/s, 16 conns |" % rate)
print("|---|---:|---:|")
print(f"| edge-loadtest | {m(el_max):,.0f} | {m(el_p50):.3f} |")
print(f"| oha | {m(oha_max):,.0f} | {m(oha_p50):.3f} |")
print(f"| edge-loadtest / oha | {m(el_max)/m(oha_max):.2f}x | {m(el_p50)/m(oha_p50):.2f}x |")
print(f"\nrounds: edge-loadtest rps {[round(x) for x in el_max]}, oha rps {[round(x) for x in oha_max]}, "
      f"edge-loadtest p50 {[round(x,3) for x in el_p50]}, oha p50 {[round(x,3) for x in oha_p50]}")
PY
