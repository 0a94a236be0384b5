#!/usr/bin/env bash
# A local cluster for a newcomer: etcd and three imstate nodes on loopback.
#
#   scripts/cluster.sh up       builds (release), starts etcd and nodes n1 n2 n3, waits until
#                               they serve; prints their addresses
#   scripts/cluster.sh status   ctl status of each node, then the route table
#   scripts/cluster.sh down     stops the nodes (SIGTERM) and etcd
#
# Everything lives under CLUSTER_DIR (default ./imstate-cluster): data dirs, logs, pids.
# Ports: etcd 2379/2380; node i: gRPC 7i00, wire 7i02, metrics 7i01 (i = 1, 2, 3).
# Installs etcd-server (Debian) when etcd is missing. Environment: CLUSTER (name, default
# demo), LEASE_TTL_MS (default 3000).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${CLUSTER_DIR:-$ROOT/imstate-cluster}
NAME=${CLUSTER:-demo}
TTL=${LEASE_TTL_MS:-3000}
BIN=$ROOT/target/release/imstate
ETCD=127.0.0.1:2379

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

stop_pid() { # stop_pid FILE: SIGTERM the process in FILE (if ours and alive), wait up to 10 s
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

up() {
  if ! command -v etcd >/dev/null 2>&1; then
    echo "installing etcd-server"
    apt-get install -y -q etcd-server >/dev/null || { apt-get update -q && apt-get install -y -q etcd-server >/dev/null; }
  fi
  cargo build --release -p imstate
  mkdir -p "$DIR"
  if [[ -f $DIR/etcd.pid ]] && kill -0 "$(cat "$DIR/etcd.pid")" 2>/dev/null; then
    echo "etcd already running"
  else
    etcd --name imstate-demo --data-dir "$DIR/etcd" \
      --listen-client-urls "http://$ETCD" --advertise-client-urls "http://$ETCD" \
      --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
      --initial-cluster imstate-demo=http://127.0.0.1:2380 >"$DIR/etcd.log" 2>&1 &
    echo $! >"$DIR/etcd.pid"
    for _ in $(seq 1 100); do
      (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null && break
      sleep 0.1
    done
  fi
  for i in 1 2 3; do
    if [[ -f $DIR/n$i.pid ]] && kill -0 "$(cat "$DIR/n$i.pid")" 2>/dev/null; then
      echo "n$i already running"; continue
    fi
    IMSTATE_CLUSTER__LEASE_TTL_MS=$TTL "$BIN" serve --data-dir "$DIR/n$i" \
      --listen "127.0.0.1:7${i}00" --metrics-listen "127.0.0.1:7${i}01" \
      --wire-listen "127.0.0.1:7${i}02" \
      --cluster "$NAME" --etcd "$ETCD" --node-id "n$i" >"$DIR/n$i.out" 2>"$DIR/n$i.log" &
    echo $! >"$DIR/n$i.pid"
  done
  for i in 1 2 3; do
    for _ in $(seq 1 300); do
      grep -q "imstate listening on" "$DIR/n$i.out" 2>/dev/null && break
      kill -0 "$(cat "$DIR/n$i.pid")" 2>/dev/null || { cat "$DIR/n$i.log" >&2; die "n$i exited"; }
      sleep 0.1
    done
  done
  # Serving once the route table is written and the first lock-delay has passed.
  for _ in $(seq 1 200); do
    "$BIN" seq current --addr 127.0.0.1:7100 1 >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "cluster $NAME up: etcd $ETCD; nodes n1 127.0.0.1:7100, n2 127.0.0.1:7200, n3 127.0.0.1:7300 (wire 7x02, metrics 7x01)"
  echo "try: $BIN seq next --addr 127.0.0.1:7200 1 2 3    and    $BIN ctl route --addr 127.0.0.1:7100"
}

status() {
  for i in 1 2 3; do
    echo "== n$i"
    "$BIN" ctl status --addr "127.0.0.1:7${i}00" 2>&1 | grep -E "role|node_id|lease_valid|sections_owned|route_version|error" || true
  done
  echo "== route"
  "$BIN" ctl route --addr 127.0.0.1:7100 2>&1 | grep -v "^route" || true
}

down() {
  for i in 1 2 3; do stop_pid "$DIR/n$i.pid"; done
  stop_pid "$DIR/etcd.pid"
  echo "cluster down (data kept in $DIR; remove it to start afresh)"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) die "usage: scripts/cluster.sh up|status|down" ;;
esac
