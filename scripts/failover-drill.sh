#!/usr/bin/env bash
# The same failover drill against Redis + Sentinel and against an imstate cluster, under the
# same counter load (INCR on 16 keys / Next on 16 ids of one section, 8 workers, 500 ms call
# timeout, and 10 s for the SIGSTOP runs: Redis's losses depend on the client's timeout):
# kill -9 of the master/owner (restarted 15 s later), and a SIGSTOP past Sentinel's
# down-after / imstate's lease, then SIGCONT. Reports, per run, the longest time without a
# successful call and the values that repeated (duplicates) or went back (rollbacks).
#
# Redis: master + one replica (AOF, appendfsync everysec), three sentinels (quorum 2,
# down-after-milliseconds 5000, failover-timeout 10000); the clients ask a sentinel for the
# master after every failure. imstate: etcd and three nodes, lease TTL 3000 ms, the smart
# client. Usage: scripts/failover-drill.sh   (SECONDS_PER_RUN [30])
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN=${SECONDS_PER_RUN:-30}
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
apt_install() { apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }; }
command -v redis-server >/dev/null || apt_install redis-server
command -v etcd >/dev/null || apt_install etcd-server
cargo build --release -p imstate --example failover_drill >&2
BIN=$ROOT/target/release/imstate
DRILL=$ROOT/target/release/examples/failover_drill
WORK=$(mktemp -d /tmp/imstate-drill.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; die "port $1 never opened"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
ROWS=()
row() { # row SYSTEM FAULT JSON
  ROWS+=("| $1 | $2 | $(field "$3" ok) of $(field "$3" calls) | $(python3 -c "print(round($(field "$3" longest_gap_ms)))") | $(field "$3" duplicates) | $(field "$3" rollbacks) |")
}

# ---- Redis + Sentinel ---------------------------------------------------------------------
declare -A REDIS_PID
start_redis() { # start_redis PORT [replicaof PORT]
  local port=$1 dir=$WORK/redis-$1
  mkdir -p "$dir"
  { echo "port $port"; echo "bind 127.0.0.1"; echo "dir $dir"; echo "appendonly yes";
    echo "appendfsync everysec"; echo 'save ""';
    [[ $# -gt 1 ]] && echo "replicaof 127.0.0.1 $2"; } >"$dir/redis.conf"
  redis-server "$dir/redis.conf" >"$dir/log" 2>&1 &
  REDIS_PID[$port]=$!; PIDS+=("$!")
  wait_port "$port"
}
M=$(free_port); R=$(free_port)
start_redis "$M"; start_redis "$R" "$M"
SENTINELS=()
for i in 1 2 3; do
  port=$(free_port); dir=$WORK/sentinel-$i; mkdir -p "$dir"
  printf 'port %s\nbind 127.0.0.1\ndir %s\nsentinel monitor mymaster 127.0.0.1 %s 2\nsentinel down-after-milliseconds mymaster 5000\nsentinel failover-timeout mymaster 10000\n' \
    "$port" "$dir" "$M" >"$dir/sentinel.conf"
  redis-server "$dir/sentinel.conf" --sentinel >"$dir/log" 2>&1 &
  PIDS+=("$!"); wait_port "$port"; SENTINELS+=("127.0.0.1:$port")
done
SENTINEL_LIST=$(IFS=,; echo "${SENTINELS[*]}")
master_port() { redis-cli -p "${SENTINELS[0]#*:}" sentinel get-master-addr-by-name mymaster | tail -1; }
for _ in $(seq 1 100); do
  [[ $(redis-cli -p "$M" info replication | grep -c "connected_slaves:1") == 1 ]] && break; sleep 0.1
done
sleep 2

redis_run() { # redis_run FAULT TIMEOUT_MS
  local fault=$1 out=$WORK/drill.json victim
  "$DRILL" --redis-sentinels "$SENTINEL_LIST" --master mymaster --seconds "$RUN" \
    --timeout-ms "$2" >"$out" &
  local drill=$!
  sleep 5
  victim=$(master_port)
  if [[ $fault == kill ]]; then
    kill -9 "${REDIS_PID[$victim]}"
    sleep 15
    redis-server "$WORK/redis-$victim/redis.conf" >>"$WORK/redis-$victim/log" 2>&1 &
    REDIS_PID[$victim]=$!; PIDS+=("$!")
  else
    kill -STOP "${REDIS_PID[$victim]}"; sleep 8; kill -CONT "${REDIS_PID[$victim]}"
  fi
  wait "$drill"
}
echo "redis: kill -9 of the master" >&2
# The runs change the pids (restarts): they run in this shell, not in $(...), and leave
# their result in $WORK/drill.json.
redis_run kill 500
row "Redis + Sentinel" "kill -9 of the master; client timeout 500 ms" "$(cat "$WORK/drill.json")"
sleep 12
for timeout in 500 10000; do
  echo "redis: SIGSTOP of the master for 8 s, client timeout $timeout ms" >&2
  redis_run stop "$timeout"
  row "Redis + Sentinel" "SIGSTOP of the master for 8 s (down-after 5 s); client timeout $timeout ms" \
    "$(cat "$WORK/drill.json")"
  sleep 12
done

# ---- imstate cluster -----------------------------------------------------------------------
ETCD=127.0.0.1:$(free_port); PEER=127.0.0.1:$(free_port)
etcd --name d --data-dir "$WORK/etcd" --listen-client-urls "http://$ETCD" --advertise-client-urls "http://$ETCD" \
  --listen-peer-urls "http://$PEER" --initial-advertise-peer-urls "http://$PEER" --initial-cluster "d=http://$PEER" \
  >"$WORK/etcd.log" 2>&1 &
PIDS+=("$!"); wait_port "${ETCD#*:}"
declare -A NODE_PID NODE_ARGS GRPC
start_node() { # start_node i
  local i=$1
  IMSTATE_CLUSTER__LEASE_TTL_MS=3000 "$BIN" serve ${NODE_ARGS[$i]} >>"$WORK/n$i.out" 2>>"$WORK/n$i.log" &
  NODE_PID[$i]=$!; PIDS+=("$!")
}
for i in 1 2 3; do
  GRPC[$i]=127.0.0.1:$(free_port)
  NODE_ARGS[$i]="--data-dir $WORK/n$i --listen ${GRPC[$i]} --metrics-listen 127.0.0.1:$(free_port) --wire-listen 127.0.0.1:$(free_port) --cluster drill --etcd $ETCD --node-id n$i"
  start_node "$i"
done
for _ in $(seq 1 300); do "$BIN" seq current --addr "${GRPC[1]}" 0 >/dev/null 2>&1 && break; sleep 0.1; done
owner() { "$BIN" ctl route --addr "$1" | awk -F'\t' '$1 == "route" && $3 ~ /sections=\[0,/ {sub("owner=n", "", $4); print $4}'; }
imstate_run() { # imstate_run FAULT TIMEOUT_MS
  local fault=$1 out=$WORK/drill.json victim
  "$DRILL" --imstate "${GRPC[1]}" --seconds "$RUN" --timeout-ms "$2" >"$out" &
  local drill=$!
  sleep 5
  victim=$(owner "${GRPC[1]}")
  [[ -n $victim ]] || die "no owner of section 0"
  if [[ $fault == kill ]]; then
    kill -9 "${NODE_PID[$victim]}"
    sleep 15
    start_node "$victim"
  else
    kill -STOP "${NODE_PID[$victim]}"; sleep 4.5; kill -CONT "${NODE_PID[$victim]}"
  fi
  wait "$drill"
}
echo "imstate: kill -9 of the owner" >&2
imstate_run kill 500
row "imstate cluster" "kill -9 of the owner; client timeout 500 ms" "$(cat "$WORK/drill.json")"
sleep 12
for timeout in 500 10000; do
  echo "imstate: SIGSTOP of the owner for 4.5 s, client timeout $timeout ms" >&2
  imstate_run stop "$timeout"
  row "imstate cluster" "SIGSTOP of the owner for 4.5 s (1.5 x lease TTL); client timeout $timeout ms" \
    "$(cat "$WORK/drill.json")"
  sleep 12
done

echo "| system | fault | calls ok | longest time without a successful call (ms) | duplicated values | rolled-back values |"
echo "|---|---|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
