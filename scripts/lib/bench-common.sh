# Shared by the bench scripts (sourced, not run): error exit, a work directory and the
# processes started, removed and stopped on exit, free loopback ports, the bench's JSON, and
# a throwaway etcd, and writing a section of docs/benchmarks.md (write_docs_section).
#
#   bench_setup NAME   makes $WORK (/tmp/imstate-NAME.XXXXXX) and the exit trap; processes
#                      appended to PIDS are stopped on exit (only those).
#   start_etcd         starts etcd on free loopback ports, sets ETCD=HOST:PORT, waits for it.

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

bench_setup() {
  WORK=$(mktemp -d "/tmp/imstate-$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

bench_cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# field FILE KEY: a field of the first result of `imstate bench --json-out FILE`.
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0][sys.argv[2]])" "$1" "$2"; }

median() { python3 -c "import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }

start_etcd() {
  command -v etcd >/dev/null || die "etcd is needed (apt-get install etcd-server)"
  ETCD=127.0.0.1:$(free_port)
  local peer=127.0.0.1:$(free_port)
  etcd --name b --data-dir "$WORK/etcd" --listen-client-urls "http://$ETCD" \
    --advertise-client-urls "http://$ETCD" --listen-peer-urls "http://$peer" \
    --initial-advertise-peer-urls "http://$peer" --initial-cluster "b=http://$peer" \
    >"$WORK/etcd.log" 2>&1 &
  PIDS+=("$!")
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/${ETCD%:*}/${ETCD#*:}") 2>/dev/null && return 0; sleep 0.1; done
  die "etcd did not start (see $WORK/etcd.log)"
}

# write_docs_section NAME SECTION_FILE [DOC]: puts SECTION_FILE between the markers
# `<!-- NAME:begin (written by scripts/NAME.sh) -->` and `<!-- NAME:end -->` of DOC
# (docs/benchmarks.md), replacing what was there, or appends it with the markers.
write_docs_section() {
  local name=$1 section=$2 doc=${3:-docs/benchmarks.md}
  local begin="<!-- $name:begin (written by scripts/$name.sh) -->" end="<!-- $name:end -->"
  if grep -qF "$begin" "$doc"; then
    awk -v begin="$begin" -v end="$end" -v file="$section" '
      $0 == begin { print; while ((getline line < file) > 0) print line; skip = 1; next }
      $0 == end { skip = 0 }
      !skip' "$doc" >"$doc.new"
    mv "$doc.new" "$doc"
  else
    { echo; echo "$begin"; cat "$section"; echo "$end"; } >>"$doc"
  fi
}
