#!/usr/bin/env bash
# What TLS costs on the wire port: two nodes (plain and TLS, same build, default config),
# the same bench against each, alternating round by round; prints ops/s medians and p99s and
# the TLS/plain ratio per case as a markdown table.
#
# Usage: scripts/bench-wire-tls.sh
# Environment (defaults in brackets):
#   DURATION [5] measured seconds per run    ROUNDS [3] rounds per case
#   CASES [seq-next:1,seq-next:16,presence-login:1]  workload:inflight, 50 connections each
#   KEYS [1000000]
# Certificates are made with openssl in a temp dir; everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-seq-next:1,seq-next:16,presence-login:1}
KEYS=${KEYS:-1000000}

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
WORK=$(mktemp -d /tmp/imstate-tls-bench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v openssl >/dev/null || die "openssl is needed to make the test certificates"
command -v python3 >/dev/null || die "python3 is needed to read the bench's JSON"
cargo build --release -p imstate >&2
BIN=$ROOT/target/release/imstate

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$WORK/ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
  -CAcreateserial -days 2 -extfile "$WORK/ext" -out "$WORK/server.pem" 2>/dev/null
printf '[tls]\ncert_file = "%s"\nkey_file = "%s"\n' "$WORK/server.pem" "$WORK/server.key" \
  >"$WORK/tls.toml"

start_node() { # start_node NAME [serve args...]: sets WIRE to the node's wire address
  local name=$1; shift
  WIRE=127.0.0.1:$(free_port)
  "$BIN" serve --data-dir "$WORK/$name" --listen "127.0.0.1:$(free_port)" \
    --metrics-listen "127.0.0.1:$(free_port)" --wire-listen "$WIRE" "$@" \
    >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  local i
  for i in $(seq 1 3000); do
    grep -qs "imstate listening on" "$WORK/$name.log" && return 0
    sleep 0.01
  done
  cat "$WORK/$name.log" >&2
  die "node $name did not start"
}
start_node plain; PLAIN=$WIRE
start_node tls --config "$WORK/tls.toml"; TLS=$WIRE

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])" "$1" "$2"; }
median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }

echo "| case (50 connections) | plain ops/s | TLS ops/s | TLS/plain | plain p99 µs | TLS p99 µs |"
echo "|---|---:|---:|---:|---:|---:|"
IFS=, read -ra cases <<<"$CASES"
for case in "${cases[@]}"; do
  workload=${case%%:*}; inflight=${case##*:}
  plain_ops=(); tls_ops=(); plain_p99=(); tls_p99=()
  for round in $(seq 1 "$ROUNDS"); do
    for side in plain tls; do
      if [[ $side == plain ]]; then target=$PLAIN; flags=(); else target=$TLS; flags=(--tls-ca "$WORK/ca.pem"); fi
      "$BIN" bench --target "imstate://$target" "${flags[@]}" --workload "$workload" \
        --connections 50 --inflight "$inflight" --keys "$KEYS" --duration "$DURATION" \
        --quiet --json-out "$WORK/run.json" >/dev/null
      [[ $(field "$WORK/run.json" errors) == 0 ]] || die "$side $case: errors"
      if [[ $side == plain ]]; then
        plain_ops+=("$(field "$WORK/run.json" ops_per_sec)"); plain_p99+=("$(field "$WORK/run.json" p99_us)")
      else
        tls_ops+=("$(field "$WORK/run.json" ops_per_sec)"); tls_p99+=("$(field "$WORK/run.json" p99_us)")
      fi
    done
  done
  p=$(median "${plain_ops[@]}"); t=$(median "${tls_ops[@]}")
  python3 -c "import sys; p,t,pp,tp=map(float,sys.argv[2:]); print(f'| {sys.argv[1]} | {p:,.0f} | {t:,.0f} | {t/p:.2f} | {pp:,.0f} | {tp:,.0f} |')" \
    "$workload ${inflight} in flight" "$p" "$t" "$(median "${plain_p99[@]}")" "$(median "${tls_p99[@]}")"
done
