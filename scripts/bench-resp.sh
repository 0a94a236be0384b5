#!/usr/bin/env bash
# redis-benchmark (a tool we did not write) pointed at imstate's RESP port and at Redis, in one
# run: `INCR` on random keys, 50 clients, pipeline 1 and 16, against Redis with no persistence,
# with `appendonly yes` + `appendfsync everysec`, and with `appendfsync always`. imstate needs
# no such setting for sequences: every INCR is below a durable max_seq (S2), so after a crash
# no value is ever handed out again, whatever the row. Writes the section "redis-benchmark
# against the RESP port" of docs/benchmarks.md.
#
# Usage: scripts/bench-resp.sh
# Environment (defaults in brackets):
#   ROUNDS [3] rounds per row (the order of the two targets flips every round)
#   REQUESTS_P1 [200000]  REQUESTS_P16 [2000000] requests per redis-benchmark run
#   CLIENTS [50]  RANGE [1000000] keys are counter:<random below RANGE> (redis-benchmark -r)
#   DOCS [1] 0 = do not touch docs/benchmarks.md (only print)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=lib/bench-common.sh
. scripts/lib/bench-common.sh
ROUNDS=${ROUNDS:-3}
REQUESTS_P1=${REQUESTS_P1:-200000}
REQUESTS_P16=${REQUESTS_P16:-2000000}
CLIENTS=${CLIENTS:-50}
RANGE=${RANGE:-1000000}
DOCS=${DOCS:-1}

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

if ! command -v redis-benchmark >/dev/null || ! command -v redis-server >/dev/null; then
  step "installing redis-server and redis-tools"
  apt-get install -y redis-server redis-tools >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y redis-server redis-tools >/dev/null; }
fi
step "cargo build --release -p imstate"
cargo build --release -p imstate
BIN=$(pwd)/target/release/imstate

WORK=$(mktemp -d /tmp/imstate-bench-resp.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
REDIS_PORT=$(free_port)
RESP_PORT=$(free_port)
GRPC_PORT=$(free_port)

start_redis() { # start_redis [extra args]
  rm -rf "$WORK/redis" && mkdir -p "$WORK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save "" \
    --appendonly no --daemonize no --logfile "$WORK/redis/redis.log" "$@" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  local i
  for i in $(seq 1 2000); do
    [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && return 0
    sleep 0.005
  done
  die "redis-server did not start"
}
stop_redis() {
  redis-cli -p "$REDIS_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  wait "$REDIS_PID" 2>/dev/null || true
}
start_imstate() { # a fresh node, with the namespace `counter` for redis-benchmark's keys
  rm -rf "$WORK/imstate-data"
  "$BIN" serve --data-dir "$WORK/imstate-data" --listen "127.0.0.1:$GRPC_PORT" \
    --metrics-listen 127.0.0.1:0 --wire-listen 127.0.0.1:0 \
    --resp-listen "127.0.0.1:$RESP_PORT" >"$WORK/imstate.log" 2>&1 &
  IMSTATE_PID=$!
  PIDS+=("$IMSTATE_PID")
  local i
  for i in $(seq 1 2000); do
    grep -q "imstate resp listening on" "$WORK/imstate.log" && break
    sleep 0.005
  done
  "$BIN" seq create-namespace counter --id-hi "$RANGE" --addr "127.0.0.1:$GRPC_PORT" >/dev/null
}
stop_imstate() {
  kill -TERM "$IMSTATE_PID" 2>/dev/null || true
  wait "$IMSTATE_PID" 2>/dev/null || true
}
# rps PORT PIPELINE REQUESTS: redis-benchmark's requests per second for INCR.
rps() {
  redis-benchmark -p "$1" -t incr -c "$CLIENTS" -P "$2" -n "$3" -r "$RANGE" --csv 2>/dev/null |
    awk -F'"' '$2 == "INCR" {print $4}'
}
median() { sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

ROWS=$WORK/rows.md
: >"$ROWS"
# row NAME REDIS_ARGS...: both pipelines, ROUNDS rounds each, fresh servers per row.
row() {
  local name=$1; shift
  step "Redis $name"
  start_redis "$@"
  start_imstate
  local pipeline requests round a b
  for pipeline in 1 16; do
    requests=$REQUESTS_P1
    [[ $pipeline == 16 ]] && requests=$REQUESTS_P16
    : >"$WORK/i" && : >"$WORK/r" && : >"$WORK/ratio"
    for round in $(seq 1 "$ROUNDS"); do
      if ((round % 2)); then
        a=$(rps "$RESP_PORT" "$pipeline" "$requests"); b=$(rps "$REDIS_PORT" "$pipeline" "$requests")
      else
        b=$(rps "$REDIS_PORT" "$pipeline" "$requests"); a=$(rps "$RESP_PORT" "$pipeline" "$requests")
      fi
      [[ -n $a && -n $b ]] || die "redis-benchmark gave no result (see $WORK/imstate.log)"
      echo "$a" >>"$WORK/i"; echo "$b" >>"$WORK/r"
      awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f\n", a / b}' >>"$WORK/ratio"
      echo "  P=$pipeline round $round: imstate $a rps, Redis $b rps" >&2
    done
    printf '| %s | %s | %s | %s | **%s** (rounds %s) |\n' "$name" "$pipeline" \
      "$(median <"$WORK/i")" "$(median <"$WORK/r")" "$(median <"$WORK/ratio")" \
      "$(paste -sd, "$WORK/ratio" | sed 's/,/, /g')" >>"$ROWS"
  done
  stop_redis
  stop_imstate
}
row "no persistence"
row "appendonly yes, appendfsync everysec" --appendonly yes --appendfsync everysec
row "appendonly yes, appendfsync always" --appendonly yes --appendfsync always

MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
REDIS_VERSION=$(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-)
SECTION=$WORK/section.md
{
  echo "## redis-benchmark against the RESP port (issue #12)"
  echo
  echo "Written by \`scripts/bench-resp.sh\` on $(date -u +%Y-%m-%d): $(nproc) vCPU $MODEL;"
  echo "redis-benchmark, imstate and Redis $REDIS_VERSION share the cores. Each row starts fresh"
  echo "servers; each round runs both targets back to back (the order flips every round); the"
  echo "ratio is imstate / Redis requests per second, median of rounds. imstate runs its default"
  echo "configuration with \`--resp-listen\` and a namespace \`counter\` of $RANGE ids, so"
  echo "redis-benchmark's keys \`counter:<12 digits>\` are ids of it; its INCR is durable in every row"
  echo "(served below a durable max_seq), so only the Redis side changes from row to row."
  echo
  echo '```sh'
  echo "ROUNDS=$ROUNDS REQUESTS_P1=$REQUESTS_P1 REQUESTS_P16=$REQUESTS_P16 CLIENTS=$CLIENTS RANGE=$RANGE scripts/bench-resp.sh"
  echo "# each run: redis-benchmark -p PORT -t incr -c $CLIENTS -P {1,16} -n {$REQUESTS_P1,$REQUESTS_P16} -r $RANGE --csv"
  echo '```'
  echo
  echo "| Redis | pipeline | imstate INCR/s | Redis INCR/s | ratio imstate / Redis |"
  echo "|---|---|---|---|---|"
  cat "$ROWS"
} >"$SECTION"
cat "$SECTION"
if [[ $DOCS == 1 ]]; then
  write_docs_section bench-resp "$SECTION"
  step "wrote docs/benchmarks.md"
fi
