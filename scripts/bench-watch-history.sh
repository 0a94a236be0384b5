#!/usr/bin/env bash
# What the Watch history costs logins: one node's presence-login throughput with
# presence.watch_history_events at its default (16384) and at 0, alternating, ROUNDS rounds
# (default 3) of SECONDS (default 4) each, 50 wire connections. Prints one line per round and
# the medians. Usage: [ROUNDS=3] [SECONDS_PER_ROUND=4] scripts/bench-watch-history.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/bench-common.sh
ROUNDS=${ROUNDS:-3}
SECONDS_PER_ROUND=${SECONDS_PER_ROUND:-4}
cargo build --release -q -p imstate
BIN=target/release/imstate
bench_setup watch-history
declare -A RESULTS=([16384]="" [0]="")
for round in $(seq "$ROUNDS"); do
  for history in 16384 0; do
    dir="$WORK/node-$round-$history"
    grpc=127.0.0.1:$(free_port); http=127.0.0.1:$(free_port); wire=127.0.0.1:$(free_port)
    IMSTATE_PRESENCE__WATCH_HISTORY_EVENTS=$history "$BIN" serve --data-dir "$dir" \
      --listen "$grpc" --metrics-listen "$http" --wire-listen "$wire" >"$WORK/serve.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do grep -q "wire listening" "$WORK/serve.log" && break; sleep 0.1; done
    grep -q "wire listening" "$WORK/serve.log" || die "the node did not start: $(cat "$WORK/serve.log")"
    "$BIN" bench --target "imstate://$wire" --workload presence-login --connections 50 \
      --duration "$SECONDS_PER_ROUND" --quiet --json-out "$WORK/result.json" >/dev/null
    ops=$(field "$WORK/result.json" ops_per_sec)
    p99=$(field "$WORK/result.json" p99_us)
    printf 'round %s  watch_history_events=%-6s  logins/s %10.0f  p99 %s us\n' "$round" "$history" "$ops" "$p99"
    RESULTS[$history]+=" $ops"
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
on=$(median ${RESULTS[16384]}); off=$(median ${RESULTS[0]})
python3 -c "import sys; on,off=map(float,sys.argv[1:]); print(f'median logins/s: history on {on:,.0f}, off {off:,.0f}, ratio {on/off:.2f}')" "$on" "$off"
