#!/usr/bin/env bash
# Content-defined against fixed chunks, in the same run: what the second checkpoint of a Python process whose
# memory shifted stores, and how fast a dump cuts 1 GiB into chunks either way.
#
#   bench/cdc-reuse.sh [PYTHON_MIB [MEMORY_GIB]]    (default: 256 1; needs root, CRIU and a release build)
#
# Reuse: a Python process holds PYTHON_MIB of distinct random bytes objects (1 MiB each: each is its own
# mapping), is checkpointed with --leave-running into a fresh store, then shifts its memory as a live job does
# (frees two objects in the middle, makes three new ones of 200 KiB and a few thousand small ones, so that
# mappings and heap pages come and go before most of its data), and is checkpointed again into the same
# store. Printed per chunking: the first and second checkpoint's new chunks and stored bytes, and the second's
# stored bytes as a share of the first's. The same process is used for both kinds, content first.
#
# Speed: a stasis-workload process with MEMORY_GIB of random memory is dumped (and restored, uncounted)
# ROUNDS times (default 3) with each kind, alternating, into a new store each time: through CRIU's page
# server (the default) and with its pages through files (STASIS_DUMP_PAGES=files, the path --leave-running
# takes). Images and stores go to $BENCH_DIR (default /var/tmp, a disk).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
PYTHON_MIB=${1:-256}
MEMORY_GIB=${2:-1}
ROUNDS=${ROUNDS:-3}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
BIN=$(swift build -c release --show-bin-path)
[[ -x $BIN/stasis ]] || { echo "build first: swift build -c release" >&2; exit 1; }
work=$(mktemp -d "$BENCH_DIR/stasis-cdc.XXXXXX")
pid=""
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; rm -rf "$work"' EXIT

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
wait_gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }
avg() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.2f", s / NR }'; }
field() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["store"]; print(d[sys.argv[2]])' "$1" "$2"; }

cat >"$work/shifting.py" <<'EOF'
import os, signal, sys, time
directory, megabytes = sys.argv[1], int(sys.argv[2])
# Distinct random objects of 1 MiB: above glibc's mmap threshold, so each is a mapping of its own.
blocks = [os.urandom(1 << 20) for _ in range(megabytes)]
extra = []
def shift(signum, frame):
    blocks[megabytes // 3] = None
    blocks[2 * megabytes // 3] = None
    extra.extend(os.urandom(200 << 10) for _ in range(3))
    extra.extend(os.urandom(100) for _ in range(5000))
    open(directory + "/shifted.tmp", "w").write("shifted\n")
    os.rename(directory + "/shifted.tmp", directory + "/shifted")
signal.signal(signal.SIGUSR1, shift)
open(directory + "/pid.tmp", "w").write(f"{os.getpid()}\n")
os.rename(directory + "/pid.tmp", directory + "/pid")
while True:
    time.sleep(1)
EOF

# One Python process, checkpointed twice around a shift, for each kind of chunking.
echo "### Reuse: a Python process of $PYTHON_MIB MiB, checkpointed, shifted, checkpointed again"
echo
echo "| chunks | 1st: new chunks | 1st: stored | 2nd: new chunks | 2nd: reused | 2nd: stored | 2nd stored / 1st stored |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for kind in content fixed; do
    rm -f "$work/pid" "$work/shifted"
    setsid python3 "$work/shifting.py" "$work" "$PYTHON_MIB" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 600); do [[ -s $work/pid ]] && break; sleep 0.1; done
    pid=$(cat "$work/pid")
    flags=(); [[ $kind == fixed ]] && flags=(--fixed-chunks)
    export STASIS_STORE="$work/store-$kind"
    "$BIN/stasis" dump "$pid" -D "$work/first-$kind" --leave-running --json "${flags[@]}" >"$work/first.json"
    kill -USR1 "$pid"
    for _ in $(seq 300); do [[ -e $work/shifted ]] && break; sleep 0.1; done
    [[ -e $work/shifted ]] || { echo "the Python process did not shift" >&2; exit 1; }
    "$BIN/stasis" dump "$pid" -D "$work/second-$kind" --leave-running --json "${flags[@]}" >"$work/second.json"
    "$BIN/stasis" verify "$work/second-$kind" >/dev/null
    kill -9 "$pid"; wait_gone "$pid"; pid=""
    s1=$(field "$work/first.json" storedBytes); s2=$(field "$work/second.json" storedBytes)
    printf '| %s | %s | %.1f MiB | %s | %s | %.1f MiB | %.1f %% |\n' "$kind" "$(field "$work/first.json" newChunks)" "$(echo "$s1 / 1048576" | bc -l)" \
        "$(field "$work/second.json" newChunks)" "$(field "$work/second.json" reusedChunks)" "$(echo "$s2 / 1048576" | bc -l)" "$(echo "100 * $s2 / $s1" | bc -l)"
    rm -rf "$work/first-$kind" "$work/second-$kind" "$STASIS_STORE"
done

# Dump speed: the same process, each kind and path in turn.
echo
echo "### Dump speed: $MEMORY_GIB GiB of random memory, $ROUNDS rounds, a new store each"
echo
declare -A seconds
round=0
pid=$("$BIN/stasis-workload" memory --dir "$work" --daemon --mem $((MEMORY_GIB * 1024)) --fill random)
for _ in $(seq "$ROUNDS"); do
    for kind in content fixed; do
        for path in server files; do
            flags=(); [[ $kind == fixed ]] && flags=(--fixed-chunks)
            # A new store each round, all removed at the end: removing one just before makes ext4 search
            # past the inodes it just freed on every create, which charges each chunk file ~0.4 ms.
            round=$((round + 1))
            export STASIS_STORE="$work/store-$round"
            rm -rf "$work/ckpt"
            t=$(now)
            if [[ $path == files ]]; then
                STASIS_DUMP_PAGES=files "$BIN/stasis" dump "$pid" -D "$work/ckpt" --json "${flags[@]}" >"$work/dump.json"
            else
                "$BIN/stasis" dump "$pid" -D "$work/ckpt" --json "${flags[@]}" >"$work/dump.json"
            fi
            seconds[$kind-$path]="${seconds[$kind-$path]:-} $(elapsed "$t")"
            wait_gone "$pid"
            "$BIN/stasis" restore "$work/ckpt" --json >/dev/null
        done
    done
done
rm -f "$work/result"; kill -USR1 "$pid"
for _ in $(seq 600); do [[ -e $work/result ]] && break; sleep 0.1; done
verdict=$(cat "$work/result" 2>/dev/null || echo "FAIL no answer")
kill -9 "$pid"; pid=""
echo "| path | content-defined | fixed | content / fixed |"
echo "| --- | --- | --- | --- |"
for path in server files; do
    c=$(avg ${seconds[content-$path]}); f=$(avg ${seconds[fixed-$path]})
    printf '| %s | %s s | %s s | %.2f |\n' "$path" "$c" "$f" "$(echo "$c / $f" | bc -l)"
done
echo
echo "workload after the last restore: $verdict"
[[ $verdict == PASS* ]]
