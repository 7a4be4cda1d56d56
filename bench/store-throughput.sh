#!/usr/bin/env bash
# The chunk store on real CRIU images: compression ratio and speed of each codec, ingest and rebuild
# throughput against the thread count, the raw disk read it should keep up with, and the size a second
# checkpoint of a running job adds to the store.
#
#   sudo bench/store-throughput.sh        (needs root, CRIU, Swift; about 15 minutes on 2 cores)
#
# Environment: BENCH_DIR (default /var/tmp: a disk, not tmpfs), ROUNDS (3; the tables give the median),
# THREADS (default: 1 .. nproc, then 2 and 4 x nproc, over-subscribed: I/O waits can overlap), PY_MB (200: the Python process's data),
# WL_MIB (1024: the C workload's random memory), GAP_S (10: seconds between the two checkpoints of a running
# job), RESULTS (default /var/tmp/stasis-store-throughput: raw JSON lines and the CSV), PNG
# (docs/store-throughput.png).
#
# Images: plain `criu dump` of (a) an idle python3 that imported some of the standard library and holds
# PY_MB MB of data (3/10 random bytes, 3/10 word-like text, 2/10 small Python objects, 2/10 zero-filled
# pages it has written) and (b) `stasis-workload memory` with WL_MIB MiB of random bytes. "all" is both.
#
# Every ingest goes into a fresh store (so dedup against an earlier run hides nothing) and reads images that
# are in the page cache (warm), as in a dump, where the ingester reads what CRIU has just written; the time
# includes making the chunks durable (ChunkIngester.finish: one syncfs, renames, directory fsyncs). Rebuilds
# read the store after `sync; echo 3 > /proc/sys/vm/drop_caches` (cold: a restore on a machine that did not
# take the checkpoint) or after reading every chunk once (warm); the rebuilt files are compared with the
# originals afterwards (not timed), and their fsync is timed apart (`restore --rebuild-dir` hands them to CRIU unsynced).
# The "disk read" baseline is `cat` of the same image files, cold; `cp` cold, with and without a sync; and
# `cat` of the lz4 store's chunk files, cold, by 1 and 2 x nproc readers (GB/s there in plain image bytes).
# The thread sweep also ingests into a store on tmpfs (/dev/shm), which leaves out the disk writes.
# Second checkpoints: the page layout of two plain `criu dump --leave-running` of the Python job (idle, and
# rewriting 16 MB each second), and, when this tree's `stasis dump` has --store, the store growth of two
# `stasis dump --leave-running` of four running jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
[[ $(id -u) == 0 ]] || { echo "run as root (CRIU and drop_caches need it)" >&2; exit 1; }
BENCH_DIR=${BENCH_DIR:-/var/tmp}
ROUNDS=${ROUNDS:-3}
CORES=$(nproc)
THREADS=(${THREADS:-$(seq 1 "$CORES") $((2 * CORES)) $((4 * CORES))})
PY_MB=${PY_MB:-200}
WL_MIB=${WL_MIB:-1024}
GAP_S=${GAP_S:-10}
CODECS=(none lz4 zstd:1 zstd:3 zstd:9)
RESULTS=${RESULTS:-/var/tmp/stasis-store-throughput}
PNG=${PNG:-docs/store-throughput.png}

echo "building ..." >&2
swift build -c release --product stasis-store-bench >&2
swift build --product stasis-workload >&2
BENCH=$(swift build -c release --show-bin-path)/stasis-store-bench
WORKLOAD=$(swift build --show-bin-path)/stasis-workload
# `stasis dump --store` for the second-checkpoint part; skipped when this tree's stasis cannot do it.
STASIS=""
if swift build --product stasis >&2 2>/dev/null; then
    candidate=$(swift build --show-bin-path)/stasis
    "$candidate" dump --help 2>/dev/null | grep -q -- '--store' && STASIS=$candidate
fi

work=$(mktemp -d "$BENCH_DIR/stasis-store-bench.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$work" "$shm_store"
}
trap cleanup EXIT
shm_store=/dev/shm/$(basename "$work")-store
mkdir -p "$RESULTS"
RAW=$RESULTS/raw.jsonl
: >"$RAW"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
wait_file() { for _ in $(seq 1200); do [[ -s $1 ]] && return 0; sleep 0.1; done; echo "timed out waiting for $1" >&2; exit 1; }
wait_gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }
# Appends a bench JSON line to the raw results with extra fields (set, round).
# The 1-minute load average goes with it: this is a shared 2-core VM, and a busy neighbour shows there.
record() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); d["load1"]=float(open("/proc/loadavg").read().split()[0]); print(json.dumps(d, sort_keys=True))' "$1" "$2" >>"$RAW"; }
# Waits (up to QUIET_WAIT_S, default 600) for the 1-minute load average to fall below 0.5, so that the
# measurement does not start on top of someone else's build.
wait_quiet() {
    local waited=0
    while awk '{ exit !($1 >= 0.5) }' /proc/loadavg && ((waited < ${QUIET_WAIT_S:-600})); do sleep 10; waited=$((waited + 10)); done
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) (waited ${waited} s)" >&2
}

# The idle Python process: imports, PY_MB MB of mixed data, then sleeps; with CHURN_MB > 0 it also keeps
# a working set of that many MB that it rewrites with new random bytes every second (a running job).
cat >"$work/idle.py" <<'EOF'
import collections, datetime, decimal, email.message, hashlib, http.client, json, os, random, re, signal
import sqlite3, sys, time, xml.etree.ElementTree
ready, total_mb, churn_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
MB = 1 << 20
rng = random.Random(4)
random_part = os.urandom(total_mb * MB * 3 // 10)
letters = "etaoinshrdlcumwfgypbvkjxqz"
vocabulary = ["".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 11))) for _ in range(20000)]
text_part = " ".join(rng.choices(vocabulary, k=total_mb * MB * 3 // 10 // 7))
records = []
while len(records) * 420 < total_mb * MB * 2 // 10:
    i = len(records)
    records.append({"id": i, "name": rng.choice(vocabulary), "score": rng.random() * 1000, "tags": rng.sample(vocabulary, 3),
                    "when": datetime.date(2020, 1, 1) + datetime.timedelta(days=i % 2000)})
zero_part = bytearray(total_mb * MB * 2 // 10)
zero_part[:] = bytes(len(zero_part))  # write the zeros, so the pages exist and CRIU dumps them
db = sqlite3.connect(":memory:")
db.execute("create table t (k integer primary key, v text)")
db.executemany("insert into t values (?, ?)", ((i, vocabulary[i]) for i in range(len(vocabulary))))
working = bytearray(os.urandom(churn_mb * MB)) if churn_mb else None
with open(ready + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(ready + ".tmp", ready)
while True:
    time.sleep(1)
    if working is not None:
        working[:] = os.urandom(len(working))
EOF

start_python() {  # DIR CHURN_MB -> PID
    mkdir -p "$1"
    setsid python3 "$work/idle.py" "$1/ready" "$PY_MB" "$2" </dev/null >"$1/log" 2>&1 &
    wait_file "$1/ready"
    cat "$1/ready"
}

criu_images() {  # PID DIR
    mkdir -p "$2"
    criu dump -t "$1" -D "$2" -v2 -o dump.log || { tail "$2/dump.log" >&2; exit 1; }
    mv "$2/dump.log" "$2.dump.log"
    wait_gone "$1"
}

wait_quiet
echo "making images ..." >&2
load_before=$(cut -d" " -f1-3 /proc/loadavg)
pid=$(start_python "$work/py" 0); pids+=("$pid")
criu_images "$pid" "$work/img-python"
mkdir -p "$work/wl"
pid=$("$WORKLOAD" memory --dir "$work/wl" --daemon --mem "$WL_MIB" --fill random); pids+=("$pid")
criu_images "$pid" "$work/img-workload"
mkdir "$work/img-all"
for f in "$work"/img-python/*; do ln "$f" "$work/img-all/py-$(basename "$f")"; done
for f in "$work"/img-workload/*; do ln "$f" "$work/img-all/wl-$(basename "$f")"; done
for set in python workload all; do
    echo "images $set: $(ls "$work/img-$set" | wc -l) files, $(du -sb "$work/img-$set" | cut -f1) bytes ($(du -cb "$work/img-$set"/*pages-*.img | tail -n1 | cut -f1) in pages files)" >&2
done

echo "raw disk baseline ..." >&2
for set in python workload all; do
    bytes=$(du -sb "$work/img-$set" | cut -f1)
    for round in $(seq "$ROUNDS"); do
        drop_caches; t=$(now); cat "$work/img-$set"/* >/dev/null; s=$(since "$t")
        record "{\"command\":\"cat\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s,\"threads\":1}" "{\"set\":\"$set\",\"round\":$round}"
        if [[ $set == all ]]; then
            rm -rf "$work/copy"; drop_caches; t=$(now); cp -r "$work/img-$set" "$work/copy"; s=$(since "$t")
            sync; s2=$(since "$t")
            record "{\"command\":\"cp\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s,\"threads\":1}" "{\"set\":\"$set\",\"round\":$round}"
            record "{\"command\":\"cp+sync\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s2,\"threads\":1}" "{\"set\":\"$set\",\"round\":$round}"
            rm -rf "$work/copy"
        fi
    done
done

echo "codecs ..." >&2
for set in python workload; do
    for codec in "${CODECS[@]}"; do
        for round in $(seq "$ROUNDS"); do
            out=$("$BENCH" ingest --images "$work/img-$set" --store "$work/store" --compress "$codec" --threads "$CORES")
            record "$out" "{\"set\":\"$set\",\"round\":$round,\"phase\":\"codecs\"}"
            out=$("$BENCH" rebuild --images "$work/img-$set" --store "$work/store" --threads "$CORES" --into "$work/rebuilt" --cache cold)
            record "$out" "{\"set\":\"$set\",\"round\":$round,\"phase\":\"codecs\"}"
        done
    done
done

echo "threads ..." >&2
# Rounds outside, thread counts inside: a disturbance then spreads over every thread count, not one.
for round in $(seq "$ROUNDS"); do
    for threads in "${THREADS[@]}"; do
        out=$("$BENCH" ingest --images "$work/img-all" --store "$work/store" --compress lz4 --threads "$threads")
        record "$out" "{\"set\":\"all\",\"round\":$round,\"phase\":\"threads\"}"
        for cache in cold warm; do
            out=$("$BENCH" rebuild --images "$work/img-all" --store "$work/store" --threads "$threads" --into "$work/rebuilt" --cache "$cache")
            record "$out" "{\"set\":\"all\",\"round\":$round,\"phase\":\"threads\"}"
        done
        out=$("$BENCH" rebuild --images "$work/img-all" --store "$work/store" --threads "$threads" --cache cold)
        record "$out" "{\"set\":\"all\",\"round\":$round,\"phase\":\"threads\"}"
        # The same ingest into a store on tmpfs: no disk writes, no fdatasync cost; what the CPU allows.
        out=$("$BENCH" ingest --images "$work/img-all" --store "$shm_store" --compress lz4 --threads "$threads")
        record "$out" "{\"set\":\"all\",\"round\":$round,\"phase\":\"threads-tmpfs\"}"
        rm -rf "$shm_store"
    done
done
# The store's own files read raw, cold: `cat` of every chunk file, by one reader and by 2 x nproc readers.
bytes=$(du -sb "$work/img-all" | cut -f1)
for round in $(seq "$ROUNDS"); do
    for readers in 1 $((2 * CORES)); do
        drop_caches; t=$(now); find "$work/store/chunks" -type f -print0 | xargs -0 -P "$readers" -n 64 cat >/dev/null; s=$(since "$t")
        record "{\"command\":\"cat-chunks\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s,\"threads\":$readers}" "{\"set\":\"all\",\"round\":$round}"
    done
done
rm -rf "$work/store" "$work/rebuilt"

# A second checkpoint of a running job: `stasis dump --leave-running` twice into one store, GAP_S apart.
second_checkpoint() {  # NAME PID
    local store=$work/second-store
    rm -rf "$store" "$work/ck1" "$work/ck2"
    "$STASIS" dump "$2" -D "$work/ck1" --leave-running --store "$store" --json >/dev/null
    local first; first=$(du -sb "$store/chunks" | cut -f1)
    sleep "$GAP_S"
    "$STASIS" dump "$2" -D "$work/ck2" --leave-running --store "$store" --json >/dev/null
    local second; second=$(du -sb "$store/chunks" | cut -f1)
    python3 - "$work/ck1/manifest.json" "$work/ck2/manifest.json" "$first" "$second" "$1" "$GAP_S" >>"$RAW" <<'EOF'
import json, sys
one, two = (json.load(open(p))["store"] for p in sys.argv[1:3])
print(json.dumps({"command": "second", "set": sys.argv[5], "gap": float(sys.argv[6]), "codec": two["codec"],
                  "plainBytes1": one["plainBytes"], "storedBytes1": one["storedBytes"], "duBytes1": int(sys.argv[3]),
                  "plainBytes2": two["plainBytes"], "storedBytes2": two["storedBytes"], "duGrowth": int(sys.argv[4]) - int(sys.argv[3]),
                  "newChunks2": two["newChunks"], "reusedChunks2": two["reusedChunks"], "zeroChunks2": two["zeroChunks"]}, sort_keys=True))
EOF
    kill -9 "$2" 2>/dev/null || true
    wait_gone "$2"
    rm -rf "$store" "$work/ck1" "$work/ck2"
}
# Why a second checkpoint can share little: plain `criu dump --leave-running` twice, GAP_S apart, and how
# many 4 KiB pages of the second pages files sit at the same offset in the first, appear anywhere in the first,
# and how many 2 MiB fixed-offset chunks (the store's cut) reappear.
layout_check() {  # NAME PID
    rm -rf "$work/la" "$work/lb"; mkdir -p "$work/la" "$work/lb"
    criu dump -t "$2" -D "$work/la" --leave-running -o dump.log
    sleep "$GAP_S"
    criu dump -t "$2" -D "$work/lb" --leave-running -o dump.log
    kill -9 "$2" 2>/dev/null || true
    wait_gone "$2"
    python3 - "$work/la" "$work/lb" "$1" "$GAP_S" >>"$RAW" <<'EOF'
import glob, hashlib, json, sys
def pages(d):
    return b"".join(open(f, "rb").read() for f in sorted(glob.glob(d + "/pages-*.img")))
a, b = pages(sys.argv[1]), pages(sys.argv[2])
def cut(data, size):
    return [hashlib.sha256(data[i:i + size]).digest() for i in range(0, len(data), size)]
pa, pb = cut(a, 4096), cut(b, 4096)
ca, cb = cut(a, 2 << 20), cut(b, 2 << 20)
known_pages, known_chunks = set(pa), set(ca)
print(json.dumps({"command": "layout", "set": sys.argv[3], "gap": float(sys.argv[4]), "bytes1": len(a), "bytes2": len(b), "pages2": len(pb),
                  "pagesSameOffset": sum(1 for i, h in enumerate(pb) if i < len(pa) and pa[i] == h),
                  "pagesAnywhere": sum(1 for h in pb if h in known_pages),
                  "chunks2": len(cb), "chunksFound": sum(1 for h in cb if h in known_chunks)}, sort_keys=True))
EOF
    rm -rf "$work/la" "$work/lb"
}
echo "page layout of two checkpoints of the Python job ..." >&2
pid=$(start_python "$work/py-l1" 0); pids+=("$pid"); layout_check "python idle" "$pid"
pid=$(start_python "$work/py-l2" 16); pids+=("$pid"); layout_check "python, 16 MB rewritten each second" "$pid"

if [[ -n $STASIS ]]; then
    echo "second checkpoint of running jobs ..." >&2
    pid=$(start_python "$work/py-idle" 0); pids+=("$pid"); second_checkpoint "python idle" "$pid"
    pid=$(start_python "$work/py-churn" 16); pids+=("$pid"); second_checkpoint "python, 16 MB rewritten each second" "$pid"
    mkdir -p "$work/wl2"
    pid=$("$WORKLOAD" memory --dir "$work/wl2" --daemon --mem "$WL_MIB" --fill random); pids+=("$pid"); second_checkpoint "stasis-workload memory ${WL_MIB} MiB" "$pid"
    mkdir -p "$work/wl3"
    pid=$("$WORKLOAD" threads --dir "$work/wl3" --daemon --mem 256 --count 4); pids+=("$pid"); second_checkpoint "stasis-workload threads (4 x 64 MiB, ticking)" "$pid"
else
    echo "skipping the second-checkpoint part: this tree's stasis has no working 'dump --store'" >&2
fi

python3 bench/plot_throughput.py "$RAW" --csv "$RESULTS/store-throughput.csv" --png "$PNG"
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $CORES cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r); CRIU $(criu --version | awk '/Version/ {print $2}'); images and store in $BENCH_DIR ($(df --output=source "$BENCH_DIR" | tail -n1)); rounds: $ROUNDS (median); load average before / after: $load_before / $(cut -d" " -f1-3 /proc/loadavg); raw results and CSV in $RESULTS"
