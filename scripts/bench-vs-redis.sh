#!/usr/bin/env bash
# imstate vs Redis, side by side, on this machine: throughput ratios per workload (--compare),
# memory per session, and restart time with N sessions. Writes the section "imstate vs Redis"
# of docs/benchmarks.md and the chart docs/bench-vs-redis.png.
#
# Usage: scripts/bench-vs-redis.sh
# Environment (defaults in brackets):
#   DURATION [5] measured seconds per run     ROUNDS [3] rounds per case (alternating targets)
#   WARMUP [1] warm-up seconds per run         CONNECTIONS [50]
#   KEYS [1000000] ids / preloaded uids         SESSIONS [1000000] for memory and restart
#   CASES [all workloads + seq-next:16]         OUT [a temp dir] where JSON and logs are kept
#   DURABLE_CASES [seq-next,presence-login,mixed] the cases run again against Redis with an
#                                               append-only file (0 or empty: skip)
#   DOCS [1] 0 = do not touch docs/benchmarks.md (only print)
#
# Redis runs with no persistence for the first table (--save "" --appendonly no), then with
# `appendonly yes` and `appendfsync everysec` (what people run for counters they care about;
# imstate at its default `presence.fsync = batch:10ms`), then `appendfsync always` (imstate
# with `presence.fsync = always`); the restart test asks it for one explicit SAVE. imstate
# runs as released (`serve`, default config, temp data dir). Everything started here is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
ROOT=$(pwd)

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-50}
KEYS=${KEYS:-1000000}
SESSIONS=${SESSIONS:-1000000}
CASES=${CASES:-seq-next,seq-next:16,seq-fanout,presence-login,presence-heartbeat-batch,presence-lookup-batch,mixed}
DOCS=${DOCS:-1}
DURABLE_CASES=${DURABLE_CASES-seq-next,presence-login,mixed}
[[ $DURABLE_CASES == 0 ]] && DURABLE_CASES=""
# Extra environment for imstate (`KEY=VALUE` words), e.g. its presence fsync policy.
IMSTATE_ENV=()
FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/imstate-bench.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK/imstate-data" "$WORK/redis"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- tools -------------------------------------------------------------------------------
apt_install() {
  apt-get install -y "$@" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$@" >/dev/null; }
}
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  step "installing redis-server"
  apt_install redis-server
fi
if [[ ! -f $FONT ]]; then
  step "installing fonts-dejavu-core (chart text)"
  apt_install fonts-dejavu-core
fi
step "cargo build --release -p imstate"
cargo build --release -p imstate
BIN=$ROOT/target/release/imstate

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
now_ns() { date +%s%N; }

# ---- servers -----------------------------------------------------------------------------
REDIS_PID=""; IMSTATE_PID=""
start_redis() { # start_redis DIR [extra args]: starts redis-server, waits for PING
  local dir=$1; shift
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
    --daemonize no --logfile "$dir/redis.log" "$@" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  wait_redis_ready
}
wait_redis_ready() {
  local i
  for i in $(seq 1 6000); do
    if [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] &&
      redis-cli -p "$REDIS_PORT" INFO persistence 2>/dev/null | grep -q '^loading:0'; then
      return 0
    fi
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server exited (see its log)"
    sleep 0.005
  done
  die "redis-server did not become ready"
}
stop_redis() {
  redis-cli -p "$REDIS_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  wait "$REDIS_PID" 2>/dev/null || true
}
start_imstate() { # start_imstate DATA_DIR: starts the node, waits for "imstate listening on"
  local data=$1 log=$WORK/imstate.log
  : >"$log"
  env "${IMSTATE_ENV[@]}" "$BIN" serve --data-dir "$data" --listen "127.0.0.1:$IMSTATE_PORT" \
    --metrics-listen "127.0.0.1:$METRICS_PORT" --wire-listen "127.0.0.1:$WIRE_PORT" >>"$log" 2>&1 &
  IMSTATE_PID=$!
  PIDS+=("$IMSTATE_PID")
  local i
  for i in $(seq 1 60000); do
    grep -q "imstate listening on" "$log" && return 0
    kill -0 "$IMSTATE_PID" 2>/dev/null || { cat "$log" >&2; die "imstate exited"; }
    sleep 0.001
  done
  die "imstate did not start"
}
stop_imstate() { # SIGTERM: drain, flush, fsync, exit 0
  kill -TERM "$IMSTATE_PID" 2>/dev/null || true
  wait "$IMSTATE_PID" 2>/dev/null || true
}

REDIS_PORT=$(free_port)
IMSTATE_PORT=$(free_port)
WIRE_PORT=$(free_port)
METRICS_PORT=$(free_port)
REDIS=127.0.0.1:$REDIS_PORT
# The bench talks to imstate's wire listener (its hot-path protocol); gRPC stays on IMSTATE_PORT.
IMSTATE=127.0.0.1:$WIRE_PORT

# ---- 1. throughput ratios ----------------------------------------------------------------
step "starting redis-server on $REDIS and imstate on $IMSTATE"
start_redis "$WORK/redis"
start_imstate "$WORK/imstate-data"

COMPARE_CMD=(imstate bench --compare --imstate "$IMSTATE" --redis "$REDIS"
  --cases "$CASES" --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP"
  --connections "$CONNECTIONS" --keys "$KEYS" --half-load --quiet
  --json-out "$OUT/compare.json" --markdown-out "$OUT/compare.md"
  --chart-out "$OUT/bench-vs-redis.png")
step "${COMPARE_CMD[*]}"
"$BIN" "${COMPARE_CMD[@]:1}" | tee "$OUT/compare.txt"

# Which way Redis serves a fan-out best: both, once each, for the record.
FANOUT_CMD=(imstate bench --target "redis://$REDIS" --workload seq-fanout --duration "$DURATION"
  --warmup "$WARMUP" --connections "$CONNECTIONS" --keys "$KEYS" --quiet)
step "Redis fan-out: pipelined INCR vs EVALSHA"
FANOUT_PIPELINE=$("$BIN" "${FANOUT_CMD[@]:1}" --redis-fanout pipeline | awk 'NR==2 {print $7}')
FANOUT_LUA=$("$BIN" "${FANOUT_CMD[@]:1}" --redis-fanout lua | awk 'NR==2 {print $7}')
echo "pipeline ${FANOUT_PIPELINE} ids/s, lua ${FANOUT_LUA} ids/s" >&2
stop_redis
stop_imstate

# ---- 1b. against Redis with an append-only file ------------------------------------------
# durable_compare NAME REDIS_APPENDFSYNC IMSTATE_PRESENCE_FSYNC: fresh servers, the durable
# cases, a table of their own.
DURABLE_CMDS=()
durable_compare() {
  local name=$1 appendfsync=$2 fsync=$3
  step "Redis appendonly yes, appendfsync $appendfsync; imstate presence.fsync=$fsync"
  rm -rf "$WORK/redis" "$WORK/imstate-data"
  start_redis "$WORK/redis" --appendonly yes --appendfsync "$appendfsync"
  IMSTATE_ENV=("IMSTATE_PRESENCE__FSYNC=$fsync")
  start_imstate "$WORK/imstate-data"
  IMSTATE_ENV=()
  local cmd=(imstate bench --compare --imstate "$IMSTATE" --redis "$REDIS"
    --cases "$DURABLE_CASES" --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP"
    --connections "$CONNECTIONS" --keys "$KEYS" --quiet
    --json-out "$OUT/compare-$name.json" --markdown-out "$OUT/compare-$name.md")
  DURABLE_CMDS+=("IMSTATE_PRESENCE__FSYNC=$fsync (Redis --appendonly yes --appendfsync $appendfsync) ${cmd[*]}")
  "$BIN" "${cmd[@]:1}" | tee "$OUT/compare-$name.txt"
  stop_redis
  stop_imstate
}
if [[ -n $DURABLE_CASES ]]; then
  durable_compare aof-everysec everysec batch:10ms
  durable_compare aof-always always always
fi

# ---- 2. memory per session ---------------------------------------------------------------
step "memory: $SESSIONS sessions into fresh servers"
rm -rf "$WORK/redis" "$WORK/imstate-data"
start_redis "$WORK/redis"
start_imstate "$WORK/imstate-data"
MEMORY_CMD=(imstate bench --memory --sessions "$SESSIONS" --imstate "$IMSTATE"
  --imstate-pid "$IMSTATE_PID" --redis "$REDIS" --connections "$CONNECTIONS"
  --json-out "$OUT/memory.json")
step "${MEMORY_CMD[*]}"
"$BIN" "${MEMORY_CMD[@]:1}" | tee "$OUT/memory.txt"
MEM_IMSTATE=$(awk '$1 ~ /^imstate:/ {print $6}' "$OUT/memory.txt")
MEM_REDIS=$(awk '$1 ~ /^redis:/ {print $6}' "$OUT/memory.txt")
MEM_RATIO=$(awk '/^ratio/ {print $NF}' "$OUT/memory.txt")

# ---- 3. restart with the same sessions ---------------------------------------------------
step "restart: imstate recovers $SESSIONS sessions; Redis loads an RDB of them"
stop_imstate
t0=$(now_ns)
start_imstate "$WORK/imstate-data"
t1=$(now_ns)
RESTART_IMSTATE=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
RECOVERED=$(grep -o 'recovered presence registry.*' "$WORK/imstate.log" | sed 's/\x1b\[[0-9;]*m//g' |
  grep -o 'sessions=[0-9]*' | head -1)
echo "imstate ready in ${RESTART_IMSTATE} s ($RECOVERED)" >&2

redis-cli -p "$REDIS_PORT" SAVE >/dev/null
RDB_BYTES=$(stat -c %s "$WORK/redis/dump.rdb")
stop_redis
t0=$(now_ns)
start_redis "$WORK/redis"
t1=$(now_ns)
RESTART_REDIS=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')
REDIS_KEYS=$(redis-cli -p "$REDIS_PORT" DBSIZE)
echo "redis ready in ${RESTART_REDIS} s (keys=$REDIS_KEYS, rdb ${RDB_BYTES} bytes)" >&2
RESTART_RATIO=$(awk -v a="$RESTART_IMSTATE" -v b="$RESTART_REDIS" 'BEGIN {printf "%.2f", a / b}')
stop_redis
stop_imstate

# ---- 4. the report -----------------------------------------------------------------------
MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
MEMORY=$(free -g | awk '/^Mem:/ {print $2 " GiB"}')
REDIS_VERSION=$(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-)
SECTION=$WORK/section.md
{
  echo "## imstate vs Redis (issue: \`imstate bench\` against Redis)"
  echo
  echo "Written by \`scripts/bench-vs-redis.sh\` on $(date -u +%Y-%m-%d): $(nproc) vCPU $MODEL,"
  echo "$MEMORY RAM, $(uname -sr). Client, imstate and Redis $REDIS_VERSION share the cores."
  echo "Redis runs with no persistence (\`--save \"\" --appendonly no\`); imstate runs \`serve\` with"
  echo "its default configuration on a temp data dir (release build). Each round runs both targets"
  echo "back to back (the order flips every round); the ratio is imstate / Redis, median of rounds."
  echo
  echo '```sh'
  echo "DURATION=$DURATION ROUNDS=$ROUNDS WARMUP=$WARMUP CONNECTIONS=$CONNECTIONS KEYS=$KEYS SESSIONS=$SESSIONS scripts/bench-vs-redis.sh"
  echo "# which runs:"
  echo "${COMPARE_CMD[*]}" | sed "s#$OUT/##g"
  echo "${MEMORY_CMD[*]}" | sed "s#$OUT/##g"
  echo '```'
  echo
  cat "$OUT/compare.md"
  echo
  if [[ -n $DURABLE_CASES ]]; then
    echo "The table above is against Redis **without persistence**. The next two are against Redis"
    echo "with an append-only file, as people run it for counters they care about, on fresh servers:"
    echo
    echo "**Redis \`appendonly yes\`, \`appendfsync everysec\`** (loses up to about a second on a crash)"
    echo "against imstate's default \`presence.fsync = batch:10ms\` (a 10 ms window; seq values never"
    echo "repeat after a crash either way, \`max_seq\` is durable before it is served):"
    echo
    cat "$OUT/compare-aof-everysec.md"
    echo
    echo "**Redis \`appendonly yes\`, \`appendfsync always\`** against imstate with \`presence.fsync = always\`:"
    echo
    cat "$OUT/compare-aof-always.md"
    echo
    echo '```sh'
    printf '%s\n' "${DURABLE_CMDS[@]}" | sed "s#$OUT/##g"
    echo '```'
    echo
  fi
  echo "Redis fan-out (K = 100 INCRs per request): pipelined $FANOUT_PIPELINE ids/s, Lua EVALSHA"
  echo "$FANOUT_LUA ids/s in a separate run; the compare table uses the pipeline (\`--redis-fanout\`)."
  echo
  echo "| $SESSIONS sessions | imstate | Redis | ratio imstate / Redis |"
  echo "|---|---|---|---|"
  echo "| memory per session (imstate VmRSS delta; Redis used_memory delta) | $MEM_IMSTATE B | $MEM_REDIS B | **$MEM_RATIO** |"
  echo "| restart until ready (imstate: process start to \`imstate listening on\`, $RECOVERED; Redis: process start to PING + \`loading:0\`, RDB of $RDB_BYTES bytes, $REDIS_KEYS keys) | $RESTART_IMSTATE s | $RESTART_REDIS s | **$RESTART_RATIO** |"
  echo
  echo "![imstate / Redis](bench-vs-redis.png)"
} >"$SECTION"
cat "$SECTION"
if [[ $DOCS == 1 ]]; then
  cp "$OUT/bench-vs-redis.png" docs/bench-vs-redis.png
  write_docs_section bench-vs-redis "$SECTION"
  step "wrote docs/benchmarks.md and docs/bench-vs-redis.png (raw results in $OUT)"
fi
