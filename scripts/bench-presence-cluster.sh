#!/usr/bin/env bash
# Presence figures of cluster mode on this machine:
#  1. login throughput (peak, --connections x 1 in flight) and p99 at half of each one's peak,
#     for one embedded node, a 3-node cluster under presence.replication = "sync" and one
#     under "async", through the wire protocol (the smart client for the clusters), rounds
#     alternating between the three;
#  2. resync time of a replica holding N sessions: a 2-node cluster (each node primary of half
#     the slots and replica of the other half) is loaded with N sessions, one node is killed
#     with kill -9 and restarted, and once its lease lapsed the survivor is primary of every
#     slot and the restarted node becomes its replica: it syncs all N sessions by snapshot
#     (the node's log line "replica in sync from a snapshot" gives sessions and elapsed_ms).
#
# Usage: scripts/bench-presence-cluster.sh
# Environment: DURATION [4] s per run, ROUNDS [3], CONNECTIONS [32], KEYS [1000000] uids the
# logins draw from, SESSIONS ["1000000 10000000"] for the resync rows (empty: skip them),
# PART [all] or login or resync.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DURATION=${DURATION:-4}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-32}
KEYS=${KEYS:-1000000}
SESSIONS=${SESSIONS-1000000 10000000}
PART=${PART:-all}
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
command -v python3 >/dev/null || die "python3 is needed"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate
bench_setup presence-bench
now_ns() { date +%s%N; }
start_etcd

declare -A GRPC WIRE NODE_PID
start_node() { # start_node CLUSTER NODE REPLICATION (CLUSTER "-": embedded)
  local cluster=$1 node=$2 replication=$3 grpc wire
  grpc=${GRPC[$cluster-$node]:-127.0.0.1:$(free_port)}
  wire=${WIRE[$cluster-$node]:-127.0.0.1:$(free_port)}
  GRPC[$cluster-$node]=$grpc; WIRE[$cluster-$node]=$wire
  local args=(serve --data-dir "$WORK/$cluster-$node" --listen "$grpc" --wire-listen "$wire"
    --metrics-listen "127.0.0.1:$(free_port)")
  [[ $cluster != - ]] && args+=(--cluster "$cluster" --etcd "$ETCD" --node-id "$node")
  IMSTATE_PRESENCE__REPLICATION=$replication IMSTATE_CLUSTER__LEASE_TTL_MS=2000 \
    "$BIN" "${args[@]}" >"$WORK/$cluster-$node.out" 2>>"$WORK/$cluster-$node.log" &
  PIDS+=("$!"); NODE_PID[$cluster-$node]=$!
}
# Waits until slots are placed over NODES nodes and every replica is in sync.
wait_in_sync() { # wait_in_sync CLUSTER NODES
  local route
  for _ in $(seq 1 1200); do
    route=$("$BIN" ctl route --addr "${GRPC[$1-n1]}" 2>/dev/null || true)
    if [[ $(grep -c '^node.*primary_slots=[1-9]' <<<"$route") == "$2" ]] &&
      ! grep -q '^slots.*lag=\(syncing\|no-stream\)' <<<"$route" &&
      { [[ $2 == 1 ]] || grep -q '^slots.*lag=[0-9]*rec/' <<<"$route"; }; then
      return 0
    fi
    sleep 0.25
  done
  die "cluster $1 never had its replicas in sync: $route"
}

if [[ $PART == all || $PART == login ]]; then
  start_node - single sync
  for n in n1 n2 n3; do start_node sync "$n" sync; start_node async "$n" async; done
  for _ in $(seq 1 100); do "$BIN" ctl status --addr "${GRPC[--single]}" >/dev/null 2>&1 && break; sleep 0.1; done
  wait_in_sync sync 3
  wait_in_sync async 3
  declare -A TARGET=([single]="imstate://${WIRE[--single]}"
    [sync]="imstate+wire-cluster://${WIRE[sync-n1]}" [async]="imstate+wire-cluster://${WIRE[async-n1]}")
  declare -A PEAK=() P99=()
  for round in $(seq 1 "$ROUNDS"); do
    for setup in single sync async; do
      "$BIN" bench --target "${TARGET[$setup]}" --workload presence-login --keys "$KEYS" \
        --connections "$CONNECTIONS" --inflight 1 --duration "$DURATION" --warmup 1 --quiet \
        --json-out "$WORK/run.json" >/dev/null
      [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$setup: errors"
      PEAK[$setup]+="$(field "$WORK/run.json" ops_per_sec) "
      echo "round $round $setup: peak $(field "$WORK/run.json" ops_per_sec) ops/s" >&2
    done
  done
  for round in $(seq 1 "$ROUNDS"); do
    for setup in single sync async; do
      # shellcheck disable=SC2086
      half=$(python3 -c "print(round($(median ${PEAK[$setup]}) / 2))")
      "$BIN" bench --target "${TARGET[$setup]}" --workload presence-login --keys "$KEYS" \
        --connections "$CONNECTIONS" --inflight 1 --duration "$DURATION" --warmup 1 \
        --rate "$half" --quiet --json-out "$WORK/run.json" >/dev/null
      [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$setup: errors at half load"
      P99[$setup]+="$(field "$WORK/run.json" p99_us) "
      echo "round $round $setup: p99 $(field "$WORK/run.json" p99_us) µs at $half ops/s" >&2
    done
  done
  echo "| setup (wire, $CONNECTIONS connections x 1) | login ops/s (median of $ROUNDS) | vs one node | p99 at half load |"
  echo "|---|---:|---:|---:|"
  # shellcheck disable=SC2086
  single=$(median ${PEAK[single]})
  for setup in single sync async; do
    # shellcheck disable=SC2086
    python3 -c "import sys; o,s,p=map(float,sys.argv[2:]); print(f'| {sys.argv[1]} | {o:,.0f} | {o/s:.2f} | {p/1000:.2f} ms |')" \
      "$setup" "$(median ${PEAK[$setup]})" "$single" "$(median ${P99[$setup]})"
  done
  for pid in "${PIDS[@]:1}"; do kill "$pid" 2>/dev/null || true; done
fi

if [[ $PART == all || $PART == resync ]] && [[ -n $SESSIONS ]]; then
  echo
  echo "| sessions | load (wire smart client, $CONNECTIONS connections) | replica resync by snapshot | sessions/s | replica RSS after |"
  echo "|---:|---:|---:|---:|---:|"
  for n in $SESSIONS; do
    name=resync$n
    start_node "$name" n1 sync; start_node "$name" n2 sync
    wait_in_sync "$name" 2
    t0=$(now_ns)
    "$BIN" bench --target "imstate+wire-cluster://${WIRE[$name-n1]}" --workload presence-lookup-batch \
      --preload "$n" --keys "$n" --duration 1 --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
    t1=$(now_ns)
    wait_in_sync "$name" 2
    kill -9 "${NODE_PID[$name-n2]}"; wait "${NODE_PID[$name-n2]}" 2>/dev/null || true
    : >"$WORK/$name-n2.log"
    start_node "$name" n2 sync
    line=""
    for _ in $(seq 1 2400); do
      line=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$name-n2.log" | grep 'replica in sync from a snapshot' |
        grep "sessions=$n " || true)
      [[ -n $line ]] && break
      sleep 0.25
    done
    [[ -n $line ]] || die "the restarted node never resynced $n sessions"
    ms=$(sed 's/.*elapsed_ms=\([0-9]*\).*/\1/' <<<"$line")
    rss=$(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/${NODE_PID[$name-n2]}/status")
    python3 -c "import sys; n,l,ms=map(float,sys.argv[1:4]); print(f'| {n:,.0f} | {l:.1f} s | {ms/1000:.1f} s | {n/(ms/1000):,.0f} | {sys.argv[4]} MiB |')" \
      "$n" "$(python3 -c "print(($t1 - $t0) / 1e9)")" "$ms" "$rss"
    kill "${NODE_PID[$name-n1]}" "${NODE_PID[$name-n2]}" 2>/dev/null || true
    wait "${NODE_PID[$name-n1]}" "${NODE_PID[$name-n2]}" 2>/dev/null || true
  done
fi
