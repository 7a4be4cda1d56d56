#!/usr/bin/env bash
# The main job, end to end: install CRIU if needed, build stasis (release) and its agent, start a workload
# under `stasis run` that builds state, checkpoint it, make sure it is gone, restore it, and have it verify
# its own state. On a machine with an NVIDIA GPU and nvcc the workload is a CUDA program holding device
# memory, which the agent moves out and back itself; elsewhere a CPU process (the agent stays idle in it).
# Needs root. Usage: scripts/demo.sh [MEMORY_MIB]
set -euo pipefail
cd "$(dirname "$0")/.."
MEM_MIB=${1:-512}

./scripts/install-criu.sh
./scripts/install-build-deps.sh
export PATH="/usr/local/sbin:$PATH:/usr/local/cuda/bin"
echo "== building stasis (release: several minutes on 2 cores the first time)"
# What it builds, as it builds it: a line at every tenth of the compiler's steps, its full log kept.
build_log=$(mktemp /tmp/stasis-demo-build.XXXXXX)
if ! swift build -c release 2>&1 | tee "$build_log" | awk '
    /^\[[0-9]+\/[0-9]+\]/ { split(substr($1, 2), n, "/"); step = int(n[1] * 10 / n[2])
                             if (step > shown) { shown = step; printf "   %3d%%  %s %s\n", step * 10, $2, $3; fflush() } }
    /^Build complete/      { print "   " $0; fflush() }'; then
    tail -n 30 "$build_log" >&2
    echo "the build failed (its log: $build_log)" >&2
    exit 1
fi
rm -f "$build_log"
BIN=$(swift build -c release --show-bin-path)
STASIS=$BIN/stasis
export STASIS_AGENT_LIBRARY=$(./scripts/build-agent.sh)

work=$(mktemp -d /tmp/stasis-demo.XXXXXX)
# The demo's chunks go to a store of its own, removed with the rest (a real job uses /var/lib/stasis/store).
export STASIS_STORE="$work/store"
pid=""
cleanup() { [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== stasis check"
"$STASIS" check

gpu=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null; then gpu=1; fi
if [[ $gpu == 1 ]]; then
    echo "== building the CUDA workload"
    nvcc -O2 -o "$work/cuda-workload" Workloads/cuda/cuda-workload.cu -lcuda
    echo "== starting a CUDA workload: $MEM_MIB MiB of patterned device memory, kernels checking it in a loop"
    pid=$("$STASIS" run -- "$work/cuda-workload" buffers --dir "$work" --daemon --mem "$MEM_MIB")
    echo "   PID $pid"
else
    echo "== starting a workload: a counter appending to an open file, over $MEM_MIB MiB of patterned memory"
    pid=$("$STASIS" run -- "$BIN/stasis-workload" counter --dir "$work" --daemon --mem "$MEM_MIB" --file "$work/counter.txt")
    sleep 1
    before=$(tail -n 1 "$work/counter.txt")
    echo "   PID $pid, counter at $before"
fi

echo "== stasis dump $pid -D $work/checkpoint"
"$STASIS" dump "$pid" -D "$work/checkpoint"
for _ in $(seq 100); do [[ -e /proc/$pid ]] || break; sleep 0.05; done
if [[ -e /proc/$pid ]]; then echo "   PID $pid still exists (waiting for init to reap it)"; else echo "   PID $pid is gone"; fi
[[ $gpu == 1 ]] || at_dump=$(tail -n 1 "$work/counter.txt")

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
echo "   workload says: $verdict"
if [[ $gpu == 1 ]]; then
    [[ $verdict == PASS* ]] && { echo "DEMO PASSED: the CUDA process continued from its checkpoint with its device memory intact (moved by its agent)"; exit 0; }
    echo "DEMO FAILED"; exit 1
fi
after=$(tail -n 1 "$work/counter.txt")
echo "   counter: $before before the dump, $at_dump at the dump, $after now"
if [[ $verdict == PASS* && $after -gt $at_dump ]]; then
    echo "DEMO PASSED: the process continued from its checkpoint with its memory, file and counter intact"
else
    echo "DEMO FAILED"
    exit 1
fi
