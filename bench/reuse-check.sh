#!/usr/bin/env bash
# What checking reused chunks costs: a chunk the store already has is read back and checked the first time a
# dump reuses it, then marked (mode 0400) and trusted (docs/FORMAT.md). One running process is checkpointed
# three times with --leave-running into one store, its memory unchanged:
#   1. every chunk is new (written);
#   2. every chunk is reused for the first time (each read, decoded and hashed once);
#   3. every chunk is reused again (only its mark is looked at).
# Dump 3 is what every dump of an unchanged job cost before the check; dump 2 - dump 3 is the check's price,
# paid once per chunk.
#
#   bench/reuse-check.sh cpu [GIB]   stasis-workload holding GIB (default 1) of random bytes; needs a release
#                                    build here (swift build -c release, or BIN=its directory) and CRIU
#   bench/reuse-check.sh gpu [GIB]   cuda-workload holding GIB (default 8) under `stasis run` (the agent's chunk
#                                    path), on the GPU machine after scripts/device-test.sh's setup
# The store is on /dev/shm (STORE_ROOT to change). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-cpu}
if [[ $kind == gpu ]]; then
    gib=${2:-8}
    STASIS=${STASIS:-/opt/stasis/bin/stasis}
    start() { $STASIS run -- /opt/stasis/bin/cuda-workload buffers --dir "$1" --daemon --mem $((gib * 1024)); }
else
    gib=${2:-1}
    export PATH="/usr/local/sbin:$PATH"
    BIN=${BIN:-$(swift build -c release --show-bin-path)}
    STASIS=$BIN/stasis
    start() { "$BIN/stasis-workload" memory --dir "$1" --daemon --mem $((gib * 1024)) --fill random; }
fi
root=$(mktemp -d "${STORE_ROOT:-/dev/shm}/stasis-reuse.XXXXXX")
pid=""
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; rm -rf "$root"' EXIT
export STASIS_STORE=$root/store
pid=$(start "$root")
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))' "$@"; }
echo "| dump | chunks | total (s) | CRIU (s) | devices (s) | new | reused | note |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
notes=("all written" "first reuse: each chunk read back and checked" "reused again: only the mark is looked at")
for n in 1 2 3; do
    $STASIS dump "$pid" -D "$root/ckpt$n" --leave-running --json >"$root/dump$n.json"
    echo "| $n | $(json "$root/dump$n.json" "store['newChunks'] + store['reusedChunks']") | $(json "$root/dump$n.json" "'%.2f' % timings['total']") | $(json "$root/dump$n.json" "'%.2f' % timings['criu']") | $(json "$root/dump$n.json" "'%.2f' % timings['devices']") | $(json "$root/dump$n.json" "store['newChunks']") | $(json "$root/dump$n.json" "store['reusedChunks']") | ${notes[$((n - 1))]} |"
done
rm -f "$root/result"; kill -USR1 "$pid"
for _ in $(seq 600); do [[ -e $root/result ]] && break; sleep 0.1; done
echo
echo "workload after three checkpoints: $(cat "$root/result" 2>/dev/null || echo "FAIL no answer")"
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $kind, $gib GiB; host: $(nproc) cores; store on $(df --output=source "$root" | tail -n1)"
