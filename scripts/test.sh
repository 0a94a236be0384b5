#!/usr/bin/env bash
# The test command of the README: formatting, lints, the whole test suite, and the negative
# controls (planted bugs that the suite must catch). Installs what it needs when missing, so it
# passes on a fresh machine. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# One-shot runs gain nothing from incremental state, and it is the largest part of target/ (a
# CI run once filled its disk). Set CARGO_INCREMENTAL=1 to keep it when iterating by hand.
: "${CARGO_INCREMENTAL:=0}"
export CARGO_INCREMENTAL
disk() { df -h . | awk 'NR==2 {print "disk: " $4 " free of " $2}'; du -sh target 2>/dev/null || true; }

# Tools. protoc is vendored by the protoc-bin-vendored crate, so no system package is needed.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  step "installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi
# The soak script reads the bench's JSON with python3; the disk-full tests mount a tmpfs (root).
if ! command -v python3 >/dev/null 2>&1; then
  step "installing python3"
  apt-get update -q && apt-get install -y -q python3
fi
# Cluster tests start a real etcd (Debian's etcd-server, 3.4) on loopback.
if ! command -v etcd >/dev/null 2>&1; then
  step "installing etcd-server"
  apt-get install -y -q etcd-server || { apt-get update -q && apt-get install -y -q etcd-server; }
fi
# The RESP front door's tests drive it with Redis's own redis-cli (Debian redis-tools).
if ! command -v redis-cli >/dev/null 2>&1; then
  step "installing redis-tools"
  apt-get install -y -q redis-tools || { apt-get update -q && apt-get install -y -q redis-tools; }
fi
if cargo nextest --version >/dev/null 2>&1; then
  run_tests() { cargo nextest run --no-fail-fast "$@"; }
else
  run_tests() { cargo test --no-fail-fast "$@"; }
fi

disk
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "test suite"
run_tests --workspace

disk
# Negative controls: each planted bug (a cargo feature, never on in a release build) must make
# the suite's checkers report violations. These tests assert that they DO.
step "negative control: serve before max_seq is durable"
run_tests -p imstate-seq --features planted-serve-before-durable
run_tests -p imstate-node --features planted-serve-before-durable --test seq_crash
# ... and through the RESP front door (redis crate clients under kill -9).
run_tests -p imstate --features planted-serve-before-durable --test resp kill9

step "negative control: acknowledge before fsync"
run_tests -p imstate-log --features planted-ack-before-fsync --test crash_points
run_tests -p imstate-node --features planted-ack-before-fsync --test seq_crash

step "negative control: acknowledge a presence change before its log write"
run_tests -p imstate --features planted-presence-ack-before-log --test kill9_presence

step "negative controls: the cluster simulation catches each planted ownership bug"
run_tests -p imstate-sim --features planted-serve-without-lease --test simulation
run_tests -p imstate-sim --features planted-no-lock-delay --test simulation
run_tests -p imstate-sim --features planted-raise-without-fence --test simulation
run_tests -p imstate-sim --features planted-coalesce-unsettled --test simulation
step "negative controls: the presence simulation catches each planted replication bug"
run_tests -p imstate-sim --features planted-ack-before-replica --test simulation presence
run_tests -p imstate-sim --features planted-deposed-primary-writes --test simulation presence
run_tests -p imstate-sim --features planted-trust-replica-report --test simulation presence
step "negative control: a dead primary's replica promoted before it ever synced its tenure"
run_tests -p imstate-cluster --features planted-promote-unsynced --lib slots::tests

step "negative control: a checkpoint covers the log past its replica parts"
# (Through the binary too, by hand, a build of its own: cargo nextest run -p imstate
# --features planted-part-covers-ahead --test cluster planted_part)
run_tests -p imstate-node --features planted-part-covers-ahead planted_part

step "negative controls: the engine simulation catches each planted load/unload race"
run_tests -p imstate-node --features planted-unload-current-tenure --test engine_sim
run_tests -p imstate-node --features planted-load-overwrites-tenure --test engine_sim

step "negative control: a gateway-id reclaim frees ids that sessions hold"
run_tests -p imstate-presence --features planted-reclaim-frees-used-gateways --test model

step "negative control: the wire listener answers before its durability wait"
run_tests -p imstate --features planted-wire-ack-before-durable --test kill9_presence

step "negative control: a presence write acknowledged before its replica has it"
run_tests -p imstate-node --features planted-ack-before-replica --lib presencestore

step "negative control: a deposed presence primary keeps accepting writes"
run_tests -p imstate --features planted-deposed-primary-writes --test cluster planted_deposed

step "negative control: a Watch resume that skips the events after its position"
run_tests -p imstate-node --features planted-watch-resume-without-backlog --lib watch::tests

# The soak, short: memory, descriptors and latency stay flat under steady mixed load. The long
# run is by hand: scripts/soak.sh (SOAK_SECONDS=1800 by default).
step "soak (short): SOAK_SECONDS=30 SOAK_SEGMENT=10 scripts/soak.sh"
SOAK_SECONDS=30 SOAK_SEGMENT=10 scripts/soak.sh

disk
step "all green"
