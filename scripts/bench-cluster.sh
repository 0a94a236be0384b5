#!/usr/bin/env bash
# Cluster figures on this machine: Next and NextBatch(100) through the smart client
# (imstate bench --target imstate+cluster://) against a 1-node and a 3-node cluster on one
# etcd, alternating rounds; node CPU per request; etcd writes per million allocations.
#
# Usage: scripts/bench-cluster.sh
# Environment: DURATION [5] s per run, ROUNDS [3], CONNECTIONS [32], PROTOCOL [grpc] or wire
# (the smart client over gRPC, imstate+cluster://, or over the wire protocol,
# imstate+wire-cluster://).
# The namespace `bench` (300,000 ids, sections of 10,000, step 1,000: 30 sections spread over
# the nodes) keeps raises frequent enough to measure etcd writes per allocation (aim 1/step).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
PROTOCOL=${PROTOCOL:-grpc}
case $PROTOCOL in grpc|wire) ;; *) echo "error: PROTOCOL is grpc or wire" >&2; exit 1 ;; esac
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
command -v python3 >/dev/null || die "python3 is needed"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate
bench_setup cluster-bench
start_etcd

revision() { curl -s -X POST "http://$ETCD/v3/kv/range" -d '{"key":"AA=="}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["header"]["revision"])'; }

declare -A GRPC WIRE NODE_PIDS
start_cluster() { # start_cluster NAME NODES
  local name=$1 nodes=$2 i
  NODE_PIDS[$name]=""
  for i in $(seq 1 "$nodes"); do
    local grpc=127.0.0.1:$(free_port) wire=127.0.0.1:$(free_port)
    "$BIN" serve --data-dir "$WORK/$name-n$i" --listen "$grpc" \
      --metrics-listen "127.0.0.1:$(free_port)" --wire-listen "$wire" \
      --cluster "$name" --etcd "$ETCD" --node-id "n$i" >"$WORK/$name-n$i.out" 2>"$WORK/$name-n$i.log" &
    PIDS+=("$!"); NODE_PIDS[$name]="${NODE_PIDS[$name]} $!"
    if [[ $i == 1 ]]; then GRPC[$name]=$grpc; WIRE[$name]=$wire; fi
  done
  for _ in $(seq 1 300); do
    "$BIN" seq create-namespace --addr "${GRPC[$name]}" bench --id-hi 300000 --section-size 10000 \
      --step 1000 >/dev/null 2>&1 && break
    sleep 0.1
  done
  # Serving once every node owns sections and the lock-delays passed.
  for _ in $(seq 1 300); do
    local owners
    owners=$("$BIN" ctl route --addr "${GRPC[$name]}" 2>/dev/null | grep -c "^node.*sections=[1-9]" || true)
    if [[ $owners == "$nodes" ]] && "$BIN" seq next --addr "${GRPC[$name]}" --ns bench 1 150000 299999 >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  die "cluster $name did not serve"
}
cpu_ticks() { # cpu_ticks PID...: utime + stime of the processes
  local total=0 pid
  for pid in "$@"; do
    total=$(( total + $(awk '{print $14 + $15}' "/proc/$pid/stat") ))
  done
  echo "$total"
}
start_cluster one 1
start_cluster three 3
HZ=$(getconf CLK_TCK)

echo "| case ($CONNECTIONS connections, smart client over $PROTOCOL) | 1 node ops/s | 3 nodes ops/s | 3/1 | server CPU µs per id, 1 node | 3 nodes | etcd writes per 1M ids, 1 node | 3 nodes |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for case in seq-next seq-fanout; do
  declare -A OPS=() CPU=() WRITES=()
  for round in $(seq 1 "$ROUNDS"); do
    for name in one three; do
      # shellcheck disable=SC2086
      before_cpu=$(cpu_ticks ${NODE_PIDS[$name]}); before_rev=$(revision)
      if [[ $PROTOCOL == wire ]]; then target="imstate+wire-cluster://${WIRE[$name]}"
      else target="imstate+cluster://${GRPC[$name]}"; fi
      "$BIN" bench --target "$target" --workload "$case" --ns bench \
        --keys 300000 --connections "$CONNECTIONS" --duration "$DURATION" --warmup 0 --quiet \
        --json-out "$WORK/run.json" >/dev/null
      # shellcheck disable=SC2086
      after_cpu=$(cpu_ticks ${NODE_PIDS[$name]}); after_rev=$(revision)
      [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$name $case: errors"
      ops=$(field "$WORK/run.json" ops_per_sec)
      ids=$(python3 -c "print(float($(field "$WORK/run.json" items_per_sec)) * $DURATION)")
      OPS[$name]+="$ops "
      CPU[$name]+="$(python3 -c "print(($after_cpu - $before_cpu) / $HZ * 1e6 / $ids)") "
      echo "$name $case: ops/s $ops, ids $ids, etcd revisions $before_rev -> $after_rev" >&2
      WRITES[$name]+="$(python3 -c "print(($after_rev - $before_rev) * 1e6 / $ids)") "
    done
  done
  # shellcheck disable=SC2086
  python3 -c "import sys; o1,o3,c1,c3,w1,w3=map(float,sys.argv[2:]); print(f'| {sys.argv[1]} | {o1:,.0f} | {o3:,.0f} | {o3/o1:.2f} | {c1:.1f} | {c3:.1f} | {w1:,.0f} | {w3:,.0f} |')" \
    "$( [[ $case == seq-next ]] && echo 'Next' || echo 'NextBatch(100)')" \
    "$(median ${OPS[one]})" "$(median ${OPS[three]})" "$(median ${CPU[one]})" \
    "$(median ${CPU[three]})" "$(median ${WRITES[one]})" "$(median ${WRITES[three]})"
done
