#!/usr/bin/env bash
# What a login costs the server, two imstate binaries side by side (and Redis with AOF beside
# them): CPU microseconds and context switches of the server process per login at a paced rate,
# the p99 at that rate, and the peak logins/s, in alternating rounds on one machine. CPU per
# request at a fixed rate is steadier than peak throughput on a shared machine: it does not
# depend on how much of the two cores the load generator and the neighbours get.
#
# Usage: scripts/bench-login-cost.sh OLD_BIN NEW_BIN
# Environment (defaults in brackets):
#   ROUNDS [4]   RATE [20000] paced logins/s   DURATION [4] measured s per run
#   CONNECTIONS [50]   FSYNC [batch:10ms] presence.fsync of both nodes
#   REDIS_FSYNC [everysec] appendfsync of the Redis beside them ("" leaves Redis out)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/bench-common.sh
[[ $# -eq 2 ]] || die "usage: scripts/bench-login-cost.sh OLD_BIN NEW_BIN"
ROUNDS=${ROUNDS:-4}
RATE=${RATE:-20000}
DURATION=${DURATION:-4}
CONNECTIONS=${CONNECTIONS:-50}
FSYNC=${FSYNC:-batch:10ms}
REDIS_FSYNC=${REDIS_FSYNC-everysec}
declare -A BINS=([old]=$1 [new]=$2) PORT=() PID=()
bench_setup login-cost

for name in old new; do
  wire=$(free_port)
  IMSTATE_PRESENCE__FSYNC=$FSYNC "${BINS[$name]}" serve --data-dir "$WORK/data-$name" \
    --listen "127.0.0.1:$(free_port)" --metrics-listen "127.0.0.1:$(free_port)" \
    --wire-listen "127.0.0.1:$wire" >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!
  PIDS+=("$!")
  PORT[$name]=imstate://127.0.0.1:$wire
done
TARGETS=(old new)
if [[ -n $REDIS_FSYNC ]]; then
  command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null
  rport=$(free_port)
  mkdir -p "$WORK/redis"
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$WORK/redis" --save "" --appendonly yes \
    --appendfsync "$REDIS_FSYNC" --daemonize no --logfile "$WORK/redis/log" &
  PID[redis]=$!
  PIDS+=("$!")
  PORT[redis]=redis://127.0.0.1:$rport
  TARGETS+=(redis)
fi
BENCH=${BINS[new]}
ready() { # ready TARGET: the node's wire port or Redis answers
  local _
  for _ in $(seq 1 3000); do
    case $1 in
      redis) [[ $(redis-cli -p "${PORT[redis]##*:}" PING 2>/dev/null) == PONG ]] && return 0 ;;
      *) grep -q "imstate wire listening on" "$WORK/$1.log" && return 0 ;;
    esac
    kill -0 "${PID[$1]}" 2>/dev/null || die "$1 exited: $(tail -5 "$WORK/$1.log" 2>/dev/null)"
    sleep 0.01
  done
  die "$1 did not start"
}
for target in "${TARGETS[@]}"; do
  ready "$target"
  # Past the first 64 MiB segment, as bench-login.sh does.
  "$BENCH" bench --target "${PORT[$target]}" --workload presence-login --duration 12 \
    --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }
declare -A CPU=() CTX=() P99=() PEAK=()
for round in $(seq 1 "$ROUNDS"); do
  for target in "${TARGETS[@]}"; do
    pid=${PID[$target]}
    cpu0=$(cpu_ticks "$pid") ctx0=$(switches "$pid")
    "$BENCH" bench --target "${PORT[$target]}" --workload presence-login --duration "$DURATION" \
      --warmup 0 --connections "$CONNECTIONS" --rate "$RATE" --quiet --json-out "$WORK/paced.json" >/dev/null
    cpu1=$(cpu_ticks "$pid") ctx1=$(switches "$pid")
    ops=$(field "$WORK/paced.json" ops)
    cpu=$(python3 -c "print(round(($cpu1 - $cpu0) * 1e6 / $(getconf CLK_TCK) / $ops, 1))")
    ctx=$(python3 -c "print(round(($ctx1 - $ctx0) / $ops, 2))")
    p99=$(field "$WORK/paced.json" p99_us)
    "$BENCH" bench --target "${PORT[$target]}" --workload presence-login --duration "$DURATION" \
      --warmup 1 --connections "$CONNECTIONS" --quiet --json-out "$WORK/peak.json" >/dev/null
    peak=$(python3 -c "print(round($(field "$WORK/peak.json" ops) / $DURATION))")
    echo "round $round $target: cpu ${cpu} us/login, ${ctx} switches/login, p99 ${p99} us at $RATE/s, peak ${peak}/s" >&2
    CPU[$target]+=" $cpu" CTX[$target]+=" $ctx" P99[$target]+=" $p99" PEAK[$target]+=" $peak"
  done
done

echo "Written by \`scripts/bench-login-cost.sh\` on $(date -u +%Y-%m-%d): $(nproc) vCPU, presence.fsync=$FSYNC${REDIS_FSYNC:+, Redis appendfsync $REDIS_FSYNC},"
echo "$CONNECTIONS connections x 1, $ROUNDS alternating rounds, medians; paced at $RATE logins/s."
echo
echo "| server | CPU µs per login | context switches per login | p99 µs at $RATE/s | peak logins/s |"
echo "|---|---:|---:|---:|---:|"
for target in "${TARGETS[@]}"; do
  # shellcheck disable=SC2086
  printf "| %s | %s | %s | %.0f | %.0f |\n" "$target" "$(median ${CPU[$target]})" "$(median ${CTX[$target]})" "$(median ${P99[$target]})" "$(median ${PEAK[$target]})"
done
