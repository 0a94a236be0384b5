#!/usr/bin/env bash
# What a checkpoint of N presence sessions costs the node that takes the writes, in up to four
# setups run one after the other on this machine:
#   single  one embedded node (its own checkpoints: today's single-node mode);
#   own     a 2-node cluster with presence.replica_checkpoints = false: n2 drained, so n1 is
#           primary of every slot and n2 replica of every slot; n1 copies its sessions itself;
#   parts   the same cluster with presence.replica_checkpoints = true: n2 builds the parts
#           of n1's slots from its copy and sends them; n1's checkpoints take them instead of
#           copying its sessions (seed 004's checkpoint node);
#   quiet   the same cluster with no checkpoint at all (presence.checkpoint_log_bytes = 0):
#           what the logins cost with no checkpoint anywhere, the baseline for "the primary
#           does not notice".
# Each setup is loaded with N sessions, then takes paced logins (re-logins of those uids) for
# DURATION seconds with presence.checkpoint_log_bytes small enough that automatic
# checkpoints of all N sessions happen inside the window. Reported: login p99 and p99.9 over
# the window, the CPU seconds the primary (and the replica) spent in it, the checkpoints
# written in it and the last one's duration.
#
# Usage: scripts/bench-replica-checkpoint.sh
# Environment: SESSIONS [5000000], RATE [5000] logins/s, DURATION [60] s per window,
# ROUNDS [3] (windows alternate between the setups, all loaded and running at once),
# CHECKPOINT_BYTES [8388608] (presence.checkpoint_log_bytes), CONNECTIONS [32],
# SETUPS ["single own parts"; "quiet" is the fourth], KEEP (a directory to copy the nodes'
# logs to), PIN (1: the node taking the writes, n1 of every setup, runs on CPU 0 alone and
# everything else (the replica n2, etcd, the load generator) on CPU 1, a stand-in on this
# 2-core machine for the design's premise of a node per machine), REPLICATION [sync]
# (presence.replication of the cluster setups: async takes the replica's acknowledgements off
# the login path, to tell what the primary notices itself from what its logins wait for).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SESSIONS=${SESSIONS:-5000000}
RATE=${RATE:-5000}
DURATION=${DURATION:-60}
CHECKPOINT_BYTES=${CHECKPOINT_BYTES:-8388608}
CONNECTIONS=${CONNECTIONS:-32}
SETUPS=${SETUPS:-single own parts}
REPLICATION=${REPLICATION:-sync}
ROUNDS=${ROUNDS:-3}
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
command -v python3 >/dev/null || die "python3 is needed"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate
PIN=${PIN:-0}
if [[ $PIN == 1 ]]; then
  command -v taskset >/dev/null || die "PIN=1 needs taskset (util-linux)"
  (( $(nproc --all) >= 2 )) || die "PIN=1 needs 2 CPUs"
  taskset -p -c 1 $$ >/dev/null # this shell and every process it starts: CPU 1
fi
bench_setup replica-checkpoint
start_etcd

declare -A GRPC WIRE METRICS PID TARGET
start_node() { # start_node SETUP NODE (SETUP single: embedded)
  local setup=$1 node=$2 parts=true checkpoint_bytes=$CHECKPOINT_BYTES
  GRPC[$setup-$node]=127.0.0.1:$(free_port)
  WIRE[$setup-$node]=127.0.0.1:$(free_port)
  METRICS[$setup-$node]=127.0.0.1:$(free_port)
  local args=(serve --data-dir "$WORK/$setup-$node" --listen "${GRPC[$setup-$node]}"
    --wire-listen "${WIRE[$setup-$node]}" --metrics-listen "${METRICS[$setup-$node]}")
  [[ $setup != single ]] && args+=(--cluster "$setup" --etcd "$ETCD" --node-id "$node")
  [[ $setup == own || $setup == quiet ]] && parts=false
  [[ $setup == quiet ]] && checkpoint_bytes=0
  local pin=()
  [[ $PIN == 1 && $node == n1 ]] && pin=(taskset -c 0)
  IMSTATE_PRESENCE__CHECKPOINT_LOG_BYTES=$checkpoint_bytes IMSTATE_CLUSTER__LEASE_TTL_MS=2000 \
    IMSTATE_PRESENCE__REPLICA_CHECKPOINTS=$parts IMSTATE_PRESENCE__REPLICATION=$REPLICATION \
    "${pin[@]}" "$BIN" "${args[@]}" >"$WORK/$setup-$node.out" 2>>"$WORK/$setup-$node.log" &
  PIDS+=("$!"); PID[$setup-$node]=$!
}
# metric SETUP NODE NAME [MATCH]: the sum of a metric's samples on a node (those whose labels
# contain MATCH).
metric() {
  [[ -n ${METRICS[$1-$2]:-} ]] || { echo 0; return; }
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

for setup in $SETUPS; do
  start_node "$setup" n1
  if [[ $setup == single ]]; then
    TARGET[$setup]=imstate://${WIRE[$setup-n1]}
    for _ in $(seq 1 100); do "$BIN" ctl status --addr "${GRPC[$setup-n1]}" >/dev/null 2>&1 && break; sleep 0.1; done
  else
    start_node "$setup" n2
    TARGET[$setup]=imstate+wire-cluster://${WIRE[$setup-n1]}
    for _ in $(seq 1 100); do "$BIN" ctl status --addr "${GRPC[$setup-n1]}" >/dev/null 2>&1 && break; sleep 0.1; done
    # n2 drains: it gives its primaries to n1 and stays the replica of every slot.
    "$BIN" ctl drain n2 --addr "${GRPC[$setup-n1]}" >/dev/null
    wait_one_primary "$setup"
  fi
  t0=$(date +%s)
  "$BIN" bench --target "${TARGET[$setup]}" --workload presence-lookup-batch --preload "$SESSIONS" \
    --keys "$SESSIONS" --duration 1 --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
  echo "$setup: $SESSIONS sessions loaded in $(( $(date +%s) - t0 )) s" >&2
  [[ $setup == single ]] || wait_one_primary "$setup"
done

# Windows alternate between the setups (all of them stay up: the machine's noise is shared).
echo "| round | setup | login p99 | login p99.9 | primary CPU | replica CPU | checkpoints | last checkpoint | slots from parts |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
declare -A P99 P999 CPU
for round in $(seq 1 "$ROUNDS"); do
  for setup in $SETUPS; do
    checkpoints0=$(metric "$setup" n1 imstate_checkpoints_total 'log="presence"')
    parts0=$(metric "$setup" n1 imstate_presence_checkpoint_part_slots_total)
    cpu0=$(cpu "${PID[$setup-n1]}")
    replica_cpu0=$([[ $setup == single ]] && echo 0 || cpu "${PID[$setup-n2]}")
    "$BIN" bench --target "${TARGET[$setup]}" --workload presence-login --keys "$SESSIONS" \
      --connections "$CONNECTIONS" --inflight 1 --rate "$RATE" --duration "$DURATION" --warmup 1 \
      --quiet --json-out "$WORK/run.json" >/dev/null
    cpu1=$(cpu "${PID[$setup-n1]}")
    replica_cpu1=$([[ $setup == single ]] && echo 0 || cpu "${PID[$setup-n2]}")
    [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$setup: the logins reported errors"
    checkpoints=$(python3 -c "print(int($(metric "$setup" n1 imstate_checkpoints_total 'log="presence"') - $checkpoints0))")
    parts=$(metric "$setup" n1 imstate_presence_checkpoint_part_slots_total)
    last=$(curl -s "http://${METRICS[$setup-n1]}/metrics" |
      awk '$1 ~ /^imstate_checkpoint_last_duration_seconds\{log="presence"/ { print $NF }')
    p99=$(field "$WORK/run.json" p99_us); p999=$(field "$WORK/run.json" p999_us)
    P99[$setup]+="$p99 "; P999[$setup]+="$p999 "
    CPU[$setup]+="$(python3 -c "print($cpu1 - $cpu0)") "
    date -u +%H:%M:%S.%N >&2 # when the window ended, to line up with the KEEP logs
    python3 -c "import sys; a=sys.argv
cpu=float(a[6])-float(a[5]); rcpu=float(a[8])-float(a[7])
print(f'| {a[1]} | {a[2]} | {float(a[3])/1000:.2f} ms | {float(a[4])/1000:.2f} ms | {cpu:.1f} s | {rcpu:.1f} s | {a[9]} | {float(a[10]):.2f} s | {int(float(a[12])-float(a[11]))} |')" \
      "$round" "$setup" "$p99" "$p999" "$cpu0" "$cpu1" "$replica_cpu0" "$replica_cpu1" \
      "$checkpoints" "${last:-0}" "$parts0" "$parts"
  done
done
echo
echo "| setup | login p99 (median of $ROUNDS) | login p99.9 (median) | primary CPU per window (median) |"
echo "|---|---:|---:|---:|"
for setup in $SETUPS; do
  # shellcheck disable=SC2086
  python3 -c "import sys; print(f'| {sys.argv[1]} | {float(sys.argv[2])/1000:.2f} ms | {float(sys.argv[3])/1000:.2f} ms | {float(sys.argv[4]):.1f} s |')" \
    "$setup" "$(median ${P99[$setup]})" "$(median ${P999[$setup]})" "$(median ${CPU[$setup]})"
done
# KEEP=DIR keeps the nodes' logs (to line slow windows up with checkpoints and parts).
if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP"; cp "$WORK"/*.log "$KEEP"/; fi
