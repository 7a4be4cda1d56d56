#!/usr/bin/env bash
# The chunk store on the GPU machine (16 cores) with a real BERT-large training checkpoint: ingest and rebuild
# throughput against the thread count, the codecs, and the raw disk read, as bench/store-throughput.sh does on
# the development machine. Run by `scripts/device-bench.sh storebench` (after its setup); about 5 minutes.
#
# Images: BERT-large training paused mid-run, checkpointed as CRIU's cuda plugin would (the driver's lock and
# checkpoint through bench/cuda-ckpt.c, then plain `criu dump`) into $BENCH_DIR (a disk). Store on the same
# disk, and on tmpfs (/dev/shm) for the tmpfs rows; rebuilds go to /dev/shm, as `restore --rebuild-dir /dev/shm` does.
# Raw JSON lines go to $RAW (default $OUT/store-device.jsonl); bench/plot_throughput.py --set bert makes
# the tables and the plot from them.
#
# Environment: BENCH_DIR (/tmp), THREADS ("1 2 4 8 16 32"), CODECS ("none lz4 zstd:1 zstd:3"), ROUNDS (1).
set -uo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-/opt/stasis/bin/stasis-store-bench}
CKPT=/opt/stasis/bin/cuda-ckpt
BENCH_DIR=${BENCH_DIR:-/tmp}
THREADS=(${THREADS:-1 2 4 8 16 32})
CODECS=(${CODECS:-none lz4 zstd:1 zstd:3})
ROUNDS=${ROUNDS:-1}
RAW=${RAW:-${OUT:-/tmp}/store-device.jsonl}
CORES=$(nproc)
gcc -O2 -ISources/CStasisCUDA/include -o $CKPT bench/cuda-ckpt.c Sources/CStasisCUDA/cuda_steps.c || exit 1
work=$BENCH_DIR/stasis-store-device
shm_store=/dev/shm/stasis-store-device
rm -rf "$work" "$shm_store"; mkdir -p "$work"
trap 'rm -rf "$work" "$shm_store" /dev/shm/stasis-store-rebuilt' EXIT
: >"$RAW"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }'; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
record() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(json.loads(sys.argv[2])); print(json.dumps(d, sort_keys=True))' "$1" "$2" >>"$RAW"; }
wait_gone() { for _ in $(seq 1000); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; return 1; }

echo "making the BERT-large images ..."
run=$(mktemp -d)
pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 Workloads/torch/bert_train.py --dir "$run" --size large --steps 8 --pause-at 4 --daemon) || exit 1
$CKPT lock "$pid" && $CKPT checkpoint "$pid" || { echo "driver checkpoint failed"; exit 1; }
mkdir -p "$work/img-bert"
criu dump -t "$pid" -D "$work/img-bert" -o ../dump.log || { tail -n 5 "$work/dump.log"; exit 1; }
wait_gone "$pid"
bytes=$(du -sb "$work/img-bert" | cut -f1)
echo "images: $(ls "$work/img-bert" | wc -l) files, $bytes bytes"

for round in $(seq "$ROUNDS"); do
    drop_caches; t=$(now); cat "$work/img-bert"/* >/dev/null; s=$(since "$t")
    record "{\"command\":\"cat\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s,\"threads\":1}" "{\"set\":\"bert\",\"round\":$round}"
done
cat "$work/img-bert"/* >/dev/null  # back in the page cache: ingest reads what CRIU has just written

echo "codecs ($CORES threads) ..."
for codec in "${CODECS[@]}"; do
    for round in $(seq "$ROUNDS"); do
        rm -rf "$work/store"
        out=$("$BENCH" ingest --images "$work/img-bert" --store "$work/store" --compress "$codec" --threads "$CORES") && \
            record "$out" "{\"set\":\"bert\",\"round\":$round,\"phase\":\"codecs\"}"
        out=$("$BENCH" rebuild --images "$work/img-bert" --store "$work/store" --threads "$CORES" --into /dev/shm/stasis-store-rebuilt --cache cold --no-compare) && \
            record "$out" "{\"set\":\"bert\",\"round\":$round,\"phase\":\"codecs\"}"
        rm -rf /dev/shm/stasis-store-rebuilt
    done
done

echo "threads ..."
for round in $(seq "$ROUNDS"); do
    for threads in "${THREADS[@]}"; do
        rm -rf "$work/store"
        out=$("$BENCH" ingest --images "$work/img-bert" --store "$work/store" --compress lz4 --threads "$threads") && \
            record "$out" "{\"set\":\"bert\",\"round\":$round,\"phase\":\"threads\"}"
        for cache in cold warm; do
            # The last round of the largest thread count also compares every rebuilt byte with the images.
            compare=--no-compare; [[ $threads == "${THREADS[-1]}" && $cache == cold ]] && compare=""
            out=$("$BENCH" rebuild --images "$work/img-bert" --store "$work/store" --threads "$threads" --into /dev/shm/stasis-store-rebuilt --cache $cache $compare) && \
                record "$out" "{\"set\":\"bert\",\"round\":$round,\"phase\":\"threads\"}"
            rm -rf /dev/shm/stasis-store-rebuilt
        done
        out=$("$BENCH" ingest --images "$work/img-bert" --store "$shm_store" --compress lz4 --threads "$threads") && \
            record "$out" "{\"set\":\"bert\",\"round\":$round,\"phase\":\"threads-tmpfs\"}"
        rm -rf "$shm_store"
    done
done
for readers in 1 $((2 * CORES)); do
    drop_caches; t=$(now); find "$work/store/chunks" -type f -print0 | xargs -0 -P "$readers" -n 64 cat >/dev/null; s=$(since "$t")
    record "{\"command\":\"cat-chunks\",\"cache\":\"cold\",\"plainBytes\":$bytes,\"seconds\":$s,\"threads\":$readers}" "{\"set\":\"bert\",\"round\":1}"
done
python3 bench/plot_throughput.py "$RAW" --set bert 2>&1 || true
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $CORES cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r); store and images in $BENCH_DIR ($(df --output=source "$BENCH_DIR" | tail -n1)); rebuilds into /dev/shm"
