#!/usr/bin/env bash
# Soak: a node under steady mixed load for a long time must keep its memory, its file
# descriptors and its latency flat. Runs `imstate serve` on a temporary data directory and, in
# segments, two `imstate bench` loads side by side:
#   - mixed: a group message send (LookupBatch of 100 uids, then NextBatch for them);
#   - presence-login with a short ttl: logins that refresh, and sessions that expire (churn
#     through the registry, the log, checkpoints and the expiry wheel).
# After each segment it samples the server's RSS and open descriptors and each load's ops/s
# and p99, prints a table, and at the end checks the growth against the bounds below.
#
# Usage: scripts/soak.sh            (SOAK_SECONDS=1800 SOAK_SEGMENT=60 by default)
#        SOAK_SECONDS=30 SOAK_SEGMENT=10 scripts/soak.sh   (the short run of scripts/test.sh)
# Knobs: SOAK_SECONDS, SOAK_SEGMENT, SOAK_MIXED_RATE (default 2000/s), SOAK_LOGIN_RATE
# (default 2000/s), SOAK_KEYS (default 100000), SOAK_TTL (login ttl seconds, default 5),
# IMSTATE (the binary; built in release when unset).
# Bounds: RSS at the end <= RSS after the first segment * 1.25 + 32 MiB; descriptors at the
# end <= after the first segment + 16. Exit 1 when a bound is broken or a load reports errors.
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECONDS=${SOAK_SECONDS:-1800}
SOAK_SEGMENT=${SOAK_SEGMENT:-60}
SOAK_MIXED_RATE=${SOAK_MIXED_RATE:-2000}
SOAK_LOGIN_RATE=${SOAK_LOGIN_RATE:-2000}
SOAK_KEYS=${SOAK_KEYS:-100000}
SOAK_TTL=${SOAK_TTL:-5}

if [ -z "${IMSTATE:-}" ]; then
  cargo build --release -q -p imstate
  IMSTATE=target/release/imstate
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Ports: let the node pick, and read them from its announcement.
"$IMSTATE" serve --data-dir "$work/data" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --wire-listen 127.0.0.1:0 >"$work/stdout" 2>"$work/stderr" &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q "wire listening" "$work/stdout" 2>/dev/null && break
  sleep 0.1
done
wire=$(sed -n 's/^imstate wire listening on //p' "$work/stdout")
[ -n "$wire" ] || { echo "soak: the node did not start"; cat "$work/stderr"; exit 1; }

rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$server_pid/status"; }
fds() { ls "/proc/$server_pid/fd" | wc -l; }
field() { # field FILE KEY: a number from a bench --json-out file
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])" "$1" "$2"
}

segments=$(( (SOAK_SECONDS + SOAK_SEGMENT - 1) / SOAK_SEGMENT ))
echo "soak: $segments segments of ${SOAK_SEGMENT}s against $wire (pid $server_pid)"
printf '%-8s %-9s %-5s %-12s %-10s %-12s %-10s\n' segment rss_mib fds mixed_ops/s mixed_p99 \
  login_ops/s login_p99
first_rss=""; first_fds=""; errors=0
for segment in $(seq 1 "$segments"); do
  "$IMSTATE" bench --target "imstate://$wire" --workload mixed --keys "$SOAK_KEYS" --preload 0 \
    --rate "$SOAK_MIXED_RATE" --connections 8 --duration "$SOAK_SEGMENT" --warmup 0 --quiet \
    --json-out "$work/mixed.json" >/dev/null &
  mixed_pid=$!
  "$IMSTATE" bench --target "imstate://$wire" --workload presence-login --keys "$SOAK_KEYS" \
    --ttl "$SOAK_TTL" --rate "$SOAK_LOGIN_RATE" --connections 8 --duration "$SOAK_SEGMENT" \
    --warmup 0 --quiet --json-out "$work/login.json" >/dev/null
  wait "$mixed_pid"
  rss=$(rss_mib); open=$(fds)
  for load in mixed login; do
    errors=$(( errors + $(field "$work/$load.json" errors) ))
  done
  printf '%-8s %-9s %-5s %-12.0f %-10.0f %-12.0f %-10.0f\n' "$segment" "$rss" "$open" \
    "$(field "$work/mixed.json" ops_per_sec)" "$(field "$work/mixed.json" p99_us)" \
    "$(field "$work/login.json" ops_per_sec)" "$(field "$work/login.json" p99_us)"
  if [ -z "$first_rss" ]; then first_rss=$rss; first_fds=$open; fi
done

status=0
rss_bound=$(python3 -c "print(round($first_rss * 1.25 + 32, 1))")
if python3 -c "import sys; sys.exit(0 if $rss <= $rss_bound else 1)"; then :; else
  echo "soak: RSS grew from $first_rss MiB to $rss MiB (bound $rss_bound MiB)"; status=1
fi
if [ "$open" -gt $(( first_fds + 16 )) ]; then
  echo "soak: open descriptors grew from $first_fds to $open"; status=1
fi
if [ "$errors" -gt 0 ]; then echo "soak: the loads reported $errors errors"; status=1; fi
if ! kill -0 "$server_pid" 2>/dev/null; then echo "soak: the node died"; status=1; fi
[ "$status" -eq 0 ] && echo "soak: flat (RSS $first_rss -> $rss MiB, fds $first_fds -> $open)"
exit "$status"
