#!/usr/bin/env bash
# The main job, end to end: install CRIU if needed, build stasis (release), start a workload that builds
# state, checkpoint it, make sure it is gone, restore it, and have it verify its own state.
# Needs root. Usage: scripts/demo.sh [MEMORY_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
MEM_MIB=${1:-512}

./scripts/install-criu.sh
export PATH="/usr/local/sbin:$PATH"
echo "== building stasis (release)"
swift build -c release 2>&1 | tail -n 1
BIN=$(swift build -c release --show-bin-path)
STASIS=$BIN/stasis

work=$(mktemp -d /tmp/stasis-demo.XXXXXX)
pid=""
cleanup() { [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== stasis check"
"$STASIS" check

echo "== starting a workload: a counter appending to an open file, over $MEM_MIB MiB of patterned memory"
pid=$("$BIN/stasis-workload" counter --dir "$work" --daemon --mem "$MEM_MIB" --file "$work/counter.txt")
sleep 1
before=$(tail -n 1 "$work/counter.txt")
echo "   PID $pid, counter at $before"

echo "== stasis dump $pid -D $work/checkpoint"
"$STASIS" dump "$pid" -D "$work/checkpoint"
for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.05; done
if [[ -e /proc/$pid ]]; then echo "   PID $pid still exists (waiting for init to reap it)"; else echo "   PID $pid is gone"; fi
at_dump=$(tail -n 1 "$work/counter.txt")

echo "== stasis inspect / verify"
"$STASIS" inspect "$work/checkpoint"
"$STASIS" verify "$work/checkpoint"

echo "== stasis restore -D $work/checkpoint"
"$STASIS" restore -D "$work/checkpoint"

echo "== asking the restored workload to verify itself"
rm -f "$work/result"
kill -USR1 "$pid"
for _ in $(seq 200); do [[ -e "$work/result" ]] && break; sleep 0.05; done
verdict=$(cat "$work/result" 2>/dev/null || echo "FAIL no answer")
after=$(tail -n 1 "$work/counter.txt")
echo "   counter: $before before the dump, $at_dump at the dump, $after now"
echo "   workload says: $verdict"
if [[ $verdict == PASS* && $after -gt $at_dump ]]; then
    echo "DEMO PASSED: the process continued from its checkpoint with its memory, file and counter intact"
else
    echo "DEMO FAILED"
    exit 1
fi
