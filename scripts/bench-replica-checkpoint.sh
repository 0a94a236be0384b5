#!/usr/bin/env bash
# What a checkpoint of N presence sessions costs the node that takes the writes, in three
# setups run one after the other on this machine:
#   single  one embedded node (its own checkpoints: today's single-node mode);
#   own     a 2-node cluster with presence.replica_checkpoints = false: n2 drained, so n1 is
#           primary of every slot and n2 replica of every slot; n1 copies its sessions itself;
#   parts   the same cluster with presence.replica_checkpoints = true (the default): n2
#           builds the parts of n1's slots from its copy and sends them; n1's checkpoints
#           take them instead of copying its sessions (seed 004's checkpoint node).
# Each setup is loaded with N sessions, then takes paced logins (re-logins of those uids) for
# DURATION seconds with presence.checkpoint_log_bytes small enough that automatic
# checkpoints of all N sessions happen inside the window. Reported: login p99 and p99.9 over
# the window, the CPU seconds the primary (and the replica) spent in it, the checkpoints
# written in it and the last one's duration.
#
# Usage: scripts/bench-replica-checkpoint.sh
# Environment: SESSIONS [5000000], RATE [5000] logins/s, DURATION [60] s,
# CHECKPOINT_BYTES [8388608] (presence.checkpoint_log_bytes), CONNECTIONS [32],
# SETUPS ["single own parts"].
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SESSIONS=${SESSIONS:-5000000}
RATE=${RATE:-5000}
DURATION=${DURATION:-60}
CHECKPOINT_BYTES=${CHECKPOINT_BYTES:-8388608}
CONNECTIONS=${CONNECTIONS:-32}
SETUPS=${SETUPS:-single own parts}
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
command -v python3 >/dev/null || die "python3 is needed"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate
bench_setup replica-checkpoint
start_etcd

declare -A GRPC WIRE METRICS PID
start_node() { # start_node SETUP NODE (SETUP single: embedded)
  local setup=$1 node=$2 parts=true
  GRPC[$setup-$node]=127.0.0.1:$(free_port)
  WIRE[$setup-$node]=127.0.0.1:$(free_port)
  METRICS[$setup-$node]=127.0.0.1:$(free_port)
  local args=(serve --data-dir "$WORK/$setup-$node" --listen "${GRPC[$setup-$node]}"
    --wire-listen "${WIRE[$setup-$node]}" --metrics-listen "${METRICS[$setup-$node]}")
  [[ $setup != single ]] && args+=(--cluster "$setup" --etcd "$ETCD" --node-id "$node")
  [[ $setup == own ]] && parts=false
  IMSTATE_PRESENCE__CHECKPOINT_LOG_BYTES=$CHECKPOINT_BYTES IMSTATE_CLUSTER__LEASE_TTL_MS=2000 \
    IMSTATE_PRESENCE__REPLICA_CHECKPOINTS=$parts \
    "$BIN" "${args[@]}" >"$WORK/$setup-$node.out" 2>>"$WORK/$setup-$node.log" &
  PIDS+=("$!"); PID[$setup-$node]=$!
}
# metric SETUP NODE NAME [MATCH]: the sum of a metric's samples on a node (those whose labels
# contain MATCH).
metric() {
  curl -s "http://${METRICS[$1-$2]}/metrics" |
    awk -v name="$3" -v match_="${4:-}" '($1 == name || index($1, name "{") == 1) &&
      index($1, match_) { sum += $NF } END { print sum + 0 }'
}
# cpu PID: CPU seconds (user + system) the process has used.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
# Waits until n1 is primary and n2 replica of every slot, in sync.
wait_one_primary() { # wait_one_primary SETUP
  local route
  for _ in $(seq 1 1200); do
    route=$("$BIN" ctl route --addr "${GRPC[$1-n1]}" 2>/dev/null || true)
    if grep -qP '^node\tn1\t.*primary_slots=[1-9]' <<<"$route" &&
      grep -qP '^node\tn2\t.*primary_slots=0\t' <<<"$route" &&
      ! grep -q '^slots.*lag=\(syncing\|no-stream\)' <<<"$route" &&
      grep -q '^slots.*lag=[0-9]*rec/' <<<"$route"; then
      return 0
    fi
    sleep 0.25
  done
  die "setup $1: n1 never became primary of every slot with n2 in sync: $route"
}

echo "| setup | login p99 | login p99.9 | primary CPU in the window | replica CPU | checkpoints in the window | last checkpoint | slots from parts |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for setup in $SETUPS; do
  start_node "$setup" n1
  if [[ $setup == single ]]; then
    target=imstate://${WIRE[$setup-n1]}
    for _ in $(seq 1 100); do "$BIN" ctl status --addr "${GRPC[$setup-n1]}" >/dev/null 2>&1 && break; sleep 0.1; done
  else
    start_node "$setup" n2
    target=imstate+wire-cluster://${WIRE[$setup-n1]}
    for _ in $(seq 1 100); do "$BIN" ctl status --addr "${GRPC[$setup-n1]}" >/dev/null 2>&1 && break; sleep 0.1; done
    # n2 drains: it gives its primaries to n1 and stays the replica of every slot.
    "$BIN" ctl drain n2 --addr "${GRPC[$setup-n1]}" >/dev/null
    wait_one_primary "$setup"
  fi
  t0=$(date +%s)
  "$BIN" bench --target "$target" --workload presence-lookup-batch --preload "$SESSIONS" \
    --keys "$SESSIONS" --duration 1 --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
  echo "$setup: $SESSIONS sessions loaded in $(( $(date +%s) - t0 )) s" >&2
  [[ $setup == single ]] || wait_one_primary "$setup"
  checkpoints0=$(metric "$setup" n1 imstate_checkpoints_total 'log="presence"')
  parts0=$([[ $setup == single ]] && echo 0 || metric "$setup" n1 imstate_presence_checkpoint_part_slots_total)
  cpu0=$(cpu "${PID[$setup-n1]}")
  replica_cpu0=$([[ $setup == single ]] && echo 0 || cpu "${PID[$setup-n2]}")
  "$BIN" bench --target "$target" --workload presence-login --keys "$SESSIONS" \
    --connections "$CONNECTIONS" --inflight 1 --rate "$RATE" --duration "$DURATION" --warmup 1 \
    --quiet --json-out "$WORK/run.json" >/dev/null
  cpu1=$(cpu "${PID[$setup-n1]}")
  replica_cpu1=$([[ $setup == single ]] && echo 0 || cpu "${PID[$setup-n2]}")
  [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$setup: the logins reported errors"
  checkpoints=$(python3 -c "print(int($(metric "$setup" n1 imstate_checkpoints_total 'log="presence"') - $checkpoints0))")
  parts=$([[ $setup == single ]] && echo 0 || metric "$setup" n1 imstate_presence_checkpoint_part_slots_total)
  last=$(curl -s "http://${METRICS[$setup-n1]}/metrics" |
    awk '$1 ~ /^imstate_checkpoint_last_duration_seconds\{log="presence"/ { print $NF }')
  python3 -c "import sys; a=sys.argv
p99,p999=float(a[2]),float(a[3])
cpu=float(a[5])-float(a[4]); rcpu=float(a[7])-float(a[6])
print(f'| {a[1]} | {p99/1000:.2f} ms | {p999/1000:.2f} ms | {cpu:.1f} s | {rcpu:.1f} s | {a[8]} | {float(a[9]):.2f} s | {int(float(a[11])-float(a[10]))} |')" \
    "$setup" "$(field "$WORK/run.json" p99_us)" "$(field "$WORK/run.json" p999_us)" \
    "$cpu0" "$cpu1" "$replica_cpu0" "$replica_cpu1" "$checkpoints" "${last:-0}" "$parts0" "$parts"
  for node in n1 n2; do
    [[ -n ${PID[$setup-$node]:-} ]] || continue
    kill "${PID[$setup-$node]}" 2>/dev/null || true
    wait "${PID[$setup-$node]}" 2>/dev/null || true
  done
done
