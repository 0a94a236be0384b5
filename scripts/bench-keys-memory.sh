#!/usr/bin/env bash
# Memory per string key: KEYS distinct keys (OpenIM-style conversation ids `si_<uid>_<uid>`,
# 20 bytes) each INCRed once through the RESP port with `redis-cli --pipe`, into imstate (its
# keyed namespace `redis`, the default for RESP keys) and into Redis (no persistence), one
# after the other on fresh servers. Reports, per key: the growth of each process's resident
# memory (RSS), imstate's own count of its key tables (`imstate_seq_key_table_bytes`) and
# Redis's `used_memory`. Writes the section "Memory per string key" of docs/benchmarks.md.
#
# Usage: scripts/bench-keys-memory.sh
# Environment (defaults in brackets):
#   KEYS [10000000] distinct keys   DOCS [1] 0 = do not touch docs/benchmarks.md
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib/bench-common.sh
KEYS=${KEYS:-10000000}
DOCS=${DOCS:-1}

step() { printf '\n==> %s\n' "$*" >&2; }

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  step "installing redis-server and redis-tools"
  apt-get install -y redis-server redis-tools >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y redis-server redis-tools >/dev/null; }
fi
step "cargo build --release -p imstate"
cargo build --release -p imstate
BIN=$(pwd)/target/release/imstate
bench_setup bench-keys-memory

step "writing $KEYS INCR commands (RESP) to $WORK/incr.resp"
python3 - "$KEYS" "$WORK/incr.resp" <<'EOF'
import sys
keys, path = int(sys.argv[1]), sys.argv[2]
with open(path, "wb", buffering=1 << 20) as out:
    chunk = []
    for i in range(keys):
        key = b"si_%d_%d" % (10000000 + i, 20000000 + i)
        chunk.append(b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key))
        if len(chunk) == 100000:
            out.write(b"".join(chunk))
            chunk.clear()
    out.write(b"".join(chunk))
EOF

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# pipe PORT: sends every command, fails unless each got a reply without error.
pipe() {
  local out
  out=$(redis-cli -p "$1" --pipe <"$WORK/incr.resp" 2>&1 | tail -1)
  echo "  $out" >&2
  [[ $out == *"errors: 0, replies: $KEYS"* ]] || die "redis-cli --pipe on port $1: $out"
}

step "imstate: $KEYS keys into the keyed namespace \`redis\`"
RESP_PORT=$(free_port)
METRICS_PORT=$(free_port)
"$BIN" serve --data-dir "$WORK/imstate-data" --listen 127.0.0.1:0 --wire-listen 127.0.0.1:0 \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --resp-listen "127.0.0.1:$RESP_PORT" \
  >"$WORK/imstate.log" 2>&1 &
IMSTATE_PID=$!
PIDS+=("$IMSTATE_PID")
for _ in $(seq 1 2000); do
  grep -q "imstate resp listening on" "$WORK/imstate.log" && break
  sleep 0.005
done
redis-cli -p "$RESP_PORT" INCR warm-up >/dev/null
sleep 1
I_BASE=$(rss_kib "$IMSTATE_PID")
START=$(date +%s.%N)
pipe "$RESP_PORT"
I_SECONDS=$(python3 -c "import time; print(f'{time.time() - $START:.1f}')")
sleep 1
I_AFTER=$(rss_kib "$IMSTATE_PID")
METRICS=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics")
I_KEYS=$(awk '$1 == "imstate_seq_keys" {print $2}' <<<"$METRICS")
I_TABLE=$(awk '$1 == "imstate_seq_key_table_bytes" {print $2}' <<<"$METRICS")
[[ $(printf '%.0f' "$I_KEYS") == $((KEYS + 1)) ]] || die "imstate holds $I_KEYS keys, expected $((KEYS + 1))"
kill -TERM "$IMSTATE_PID"; wait "$IMSTATE_PID" 2>/dev/null || true

step "Redis: $KEYS keys, no persistence"
REDIS_PORT=$(free_port)
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --save "" \
  --appendonly no --daemonize no --logfile "$WORK/redis/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 2000); do
  [[ $(redis-cli -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && break
  sleep 0.005
done
used_memory() { redis-cli -p "$REDIS_PORT" INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
R_USED_BASE=$(used_memory)
R_BASE=$(rss_kib "$REDIS_PID")
START=$(date +%s.%N)
pipe "$REDIS_PORT"
R_SECONDS=$(python3 -c "import time; print(f'{time.time() - $START:.1f}')")
R_USED_AFTER=$(used_memory)
R_AFTER=$(rss_kib "$REDIS_PID")
[[ $(redis-cli -p "$REDIS_PORT" DBSIZE) == "$KEYS" ]] || die "Redis holds $(redis-cli -p "$REDIS_PORT" DBSIZE) keys"
redis-cli -p "$REDIS_PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true

per_key() { python3 -c "print(f'{($2 - $1) * $3 / $KEYS:.1f}')"; }
I_RSS=$(per_key "$I_BASE" "$I_AFTER" 1024)
I_TABLE_PER=$(python3 -c "print(f'{$I_TABLE / $KEYS:.1f}')")
R_RSS=$(per_key "$R_BASE" "$R_AFTER" 1024)
R_USED=$(per_key "$R_USED_BASE" "$R_USED_AFTER" 1)
RATIO=$(python3 -c "print(f'{$R_RSS / $I_RSS:.2f}')")
MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
REDIS_VERSION=$(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-)
SECTION=$WORK/section.md
{
  echo "## Memory per string key (issue #12)"
  echo
  echo "Written by \`scripts/bench-keys-memory.sh\` on $(date -u +%Y-%m-%d): $(nproc) vCPU $MODEL,"
  echo "Redis $REDIS_VERSION (no persistence). $KEYS distinct 20-byte keys \`si_<8 digits>_<8 digits>\`,"
  echo "each INCRed once with \`redis-cli --pipe\` through the RESP port: into imstate's keyed"
  echo "namespace \`redis\` (1,024 sections), then into Redis. Growth of resident memory (RSS)"
  echo "over the load, per key; imstate's key tables as it counts them; Redis's \`used_memory\`."
  echo
  echo '```sh'
  echo "KEYS=$KEYS scripts/bench-keys-memory.sh"
  echo '```'
  echo
  echo "| | bytes per key (RSS growth) | bytes per key (own count) | load time |"
  echo "|---|---|---|---|"
  echo "| imstate (keyed namespace) | **$I_RSS** | $I_TABLE_PER (key tables: arena + index) | $I_SECONDS s |"
  echo "| Redis | $R_RSS | $R_USED (\`used_memory\`) | $R_SECONDS s |"
  echo
  echo "Redis needs **${RATIO}x** the resident memory per key of imstate."
} >"$SECTION"
cat "$SECTION"
if [[ $DOCS == 1 ]]; then
  write_docs_section bench-keys-memory "$SECTION"
  step "wrote docs/benchmarks.md"
fi
