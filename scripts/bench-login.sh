#!/usr/bin/env bash
# Logins against Redis with AOF, in one run (issue #13): the login ops/s ratio and the p99 at
# half load, imstate `presence.fsync = batch:10ms` against Redis `appendfsync everysec`, and
# imstate `always` against Redis `always`; restart time after kill -9 with N sessions; the disk
# the presence log uses (preallocation included); context switches per acknowledged login.
#
# Usage: scripts/bench-login.sh
# Environment (defaults in brackets):
#   ROUNDS [5] rounds per case (alternating targets)   DURATION [4] measured s per run
#   CONNECTIONS [50]   WARMUP [1]   SESSIONS ["1000000 10000000"] for the restart rows
#   OLD_BIN [unset]    another imstate binary (say, the commit before a change): its rows are
#                      measured in the same run, against the same Redis, for a before/after
#   OUT [a temp dir]   where JSON, markdown and logs are kept
#   PRELOAD_SECONDS [12] untimed logins first, past the first 64 MiB segment
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
CONNECTIONS=${CONNECTIONS:-50}
SESSIONS=${SESSIONS:-"1000000 10000000"}
OLD_BIN=${OLD_BIN:-}
PRELOAD_SECONDS=${PRELOAD_SECONDS:-12}

step() { printf '\n==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/imstate-login.XXXXXX)
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"/data-* "$WORK"/redis-*
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v redis-server >/dev/null || apt-get install -y -q redis-server >/dev/null
command -v python3 >/dev/null || die "python3 is needed"
step "cargo build --release -p imstate"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now_ns() { date +%s%N; }

start_redis() { # start_redis NAME FSYNC -> sets RP (port), RPID
  local dir=$WORK/redis-$1
  mkdir -p "$dir"
  RP=$(free_port)
  redis-server --port "$RP" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly yes \
    --appendfsync "$2" --daemonize no --logfile "$dir/redis.log" &
  RPID=$!
  PIDS+=("$RPID")
  for _ in $(seq 1 2000); do
    [[ $(redis-cli -p "$RP" PING 2>/dev/null) == PONG ]] && return 0
    sleep 0.005
  done
  die "redis-server did not start"
}
start_imstate() { # start_imstate BIN NAME FSYNC -> sets WP (wire port), IPID
  local bin=$1 data=$WORK/data-$2 log=$WORK/imstate-$2.log
  WP=$(free_port)
  : >"$log"
  IMSTATE_PRESENCE__FSYNC=$3 "$bin" serve --data-dir "$data" --listen "127.0.0.1:$(free_port)" \
    --metrics-listen "127.0.0.1:$(free_port)" --wire-listen "127.0.0.1:$WP" >>"$log" 2>&1 &
  IPID=$!
  PIDS+=("$IPID")
  for _ in $(seq 1 60000); do
    grep -q "imstate wire listening on" "$log" && return 0
    kill -0 "$IPID" 2>/dev/null || { cat "$log" >&2; die "imstate exited"; }
    sleep 0.001
  done
  die "imstate did not start"
}
context_switches() { # voluntary + involuntary context switches of every thread of PID
  cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'
}

# ---- 1. login ratios and p99 at half load ---------------------------------------------------
compare() { # compare LABEL BIN IMSTATE_FSYNC REDIS_FSYNC
  local label=$1 bin=$2 fsync=$3 rfsync=$4
  start_redis "$label" "$rfsync"
  start_imstate "$bin" "$label" "$fsync"
  # Past the first segment (64 MiB of log), where a long-running node lives: preallocated
  # segments start with the second one.
  step "$label: $PRELOAD_SECONDS s of logins to fill the first segment"
  "$BIN" bench --target "imstate://127.0.0.1:$WP" --workload presence-login \
    --duration "$PRELOAD_SECONDS" --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
  step "$label: imstate presence.fsync=$fsync vs Redis appendfsync $rfsync"
  "$BIN" bench --compare --imstate "127.0.0.1:$WP" --redis "127.0.0.1:$RP" \
    --cases presence-login --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" \
    --connections "$CONNECTIONS" --half-load --quiet --json-out "$OUT/$label.json" \
    --markdown-out "$OUT/$label.md" >"$OUT/$label.txt"
  # Wake-ups: the node's context switches over one more run at full speed, per login.
  local before after
  before=$(context_switches "$IPID")
  "$BIN" bench --target "imstate://127.0.0.1:$WP" --workload presence-login \
    --duration "$DURATION" --warmup 0 --connections "$CONNECTIONS" --quiet \
    --json-out "$OUT/$label-single.json" >/dev/null
  after=$(context_switches "$IPID")
  python3 - "$OUT/$label.json" "$OUT/$label-single.json" "$label" "$fsync" "$rfsync" "$before" "$after" <<'EOF' >>"$OUT/rows.md"
import json, sys
path, single, label, fsync, rfsync, before, after = sys.argv[1:]
data = json.load(open(path))
case = data["summary"][0]
half = data["half_load"][0]
rounds = ", ".join(f"{r:.2f}" for r in case["ratios"])
loaded = json.load(open(single))
logins = (loaded[0] if isinstance(loaded, list) else loaded)["ops"] or 1
switches = (int(after) - int(before)) / logins
print(f"| {label} | `{fsync}` vs `{rfsync}` | {case['imstate_median']:,.0f} | {case['redis_median']:,.0f} "
      f"| **{case['ratio_median']:.2f}** ({rounds}) | {half['imstate']['p99_us']/1000:.2f} "
      f"/ {half['redis']['p99_us']/1000:.2f} | {switches:.2f} |")
EOF
  kill -TERM "$IPID"; wait "$IPID" 2>/dev/null || true
  redis-cli -p "$RP" SHUTDOWN NOSAVE >/dev/null 2>&1 || true; wait "$RPID" 2>/dev/null || true
}
: >"$OUT/rows.md"
compare new-batch "$BIN" batch:10ms everysec
compare new-always "$BIN" always always
if [[ -n $OLD_BIN ]]; then
  compare old-batch "$OLD_BIN" batch:10ms everysec
  compare old-always "$OLD_BIN" always always
fi

# ---- 2. restart after kill -9, and disk -----------------------------------------------------
: >"$OUT/restart.md"
for n in $SESSIONS; do
  for variant in new ${OLD_BIN:+old}; do
    bin=$BIN; [[ $variant == old ]] && bin=$OLD_BIN
    rm -rf "$WORK/data-restart"
    start_imstate "$bin" restart batch:10ms
    step "$variant: loading $n sessions"
    "$BIN" bench --target "imstate://127.0.0.1:$WP" --workload presence-lookup-batch \
      --preload "$n" --keys "$n" --duration 1 --warmup 0 --connections "$CONNECTIONS" --quiet >/dev/null
    disk=$(du -sb "$WORK/data-restart/presence" | cut -f1)
    spare=$(stat -c %s "$WORK/data-restart/presence/wal-spare.prealloc" 2>/dev/null || echo 0)
    kill -9 "$IPID"; wait "$IPID" 2>/dev/null || true
    t0=$(now_ns)
    start_imstate "$bin" restart batch:10ms
    t1=$(now_ns)
    seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", (b - a) / 1e9}')
    echo "| $variant | $n | $seconds s | $((disk / 1048576)) MiB | $((spare / 1048576)) MiB |" >>"$OUT/restart.md"
    kill -TERM "$IPID"; wait "$IPID" 2>/dev/null || true
  done
done

# ---- 3. the report --------------------------------------------------------------------------
MODEL=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
{
  echo "Written by \`scripts/bench-login.sh\` on $(date -u +%Y-%m-%d): $(nproc) vCPU $MODEL,"
  echo "Redis $(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-) with \`appendonly yes\`; presence-login, $CONNECTIONS connections x 1,"
  echo "$ROUNDS rounds of $DURATION s alternating, medians; p99 paced at half of imstate's peak."
  echo "\`ROUNDS=$ROUNDS DURATION=$DURATION CONNECTIONS=$CONNECTIONS SESSIONS=\"$SESSIONS\"${OLD_BIN:+ OLD_BIN=...} scripts/bench-login.sh\`"
  echo
  echo "| build | fsync imstate vs Redis | imstate logins/s | Redis logins/s | ratio (rounds) | p99 ms at half load, imstate / Redis | context switches per login |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  cat "$OUT/rows.md"
  echo
  echo "| build | sessions | restart after kill -9 until ready | presence dir on disk | of which the spare segment |"
  echo "|---|---:|---:|---:|---:|"
  cat "$OUT/restart.md"
} | tee "$OUT/report.md"
