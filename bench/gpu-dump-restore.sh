#!/usr/bin/env bash
# GPU checkpoint and restore: the baseline (the driver's checkpoint API + plain CRIU, as CRIU's cuda plugin
# does it) against stasis, in one run on the GPU machine, after scripts/device-test.sh's setup.
#
#   bench/gpu-dump-restore.sh          (run by scripts/device-bench.sh bench)
#
# Workloads: cuda-workload buffers holding 8 and 32 GiB of device memory, and BERT-large training paused
# mid-run. Images (and stasis's chunk store) go to /dev/shm; stasis streams CRIU its images from the store
# (its 2026-11-29T13:09Z figures in docs/BENCHMARKS.md predate the store and rebuilt nothing).
# Each row: lock, device checkpoint, CRIU dump, image size, the process's
# host memory once checkpointed (the driver copies device memory into it), the peak memory of the tool itself,
# CRIU restore, device restore.
set -uo pipefail
cd "$(dirname "$0")/.."
STASIS=${STASIS:-/opt/stasis/bin/stasis}
CKPT=/opt/stasis/bin/cuda-ckpt
gcc -O2 -ISources/CStasisCUDA/include -o $CKPT bench/cuda-ckpt.c Sources/CStasisCUDA/cuda_steps.c || exit 1
IMG=/dev/shm/stasis-bench
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
add() { awk -v a="$1" -v b="$2" -v c="${3:-0}" 'BEGIN { printf "%.2f", a + b + c }'; }
wait_gone() { for _ in $(seq 1000); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; return 1; }
rss_gib() { awk '/VmRSS/ { printf "%.1f", $2 / 1048576 }' /proc/$1/status; }
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))' "$@"; }
# Runs a command; writes the peak resident memory of its largest process (CRIU, or stasis) in GiB to /tmp/bench-peak.
peak() {
    python3 -c 'import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
open("/tmp/bench-peak", "w").write("%.2f" % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1048576))
sys.exit(rc)' "$@"
}

rows=()
baseline() {  # NAME PID
    local name=$1 pid=$2 t
    rm -rf $IMG; mkdir -p $IMG
    t=$(now); $CKPT lock "$pid" || return 1; local lock; lock=$(since "$t")
    t=$(now); $CKPT checkpoint "$pid" || return 1; local ck; ck=$(since "$t")
    local rss; rss=$(rss_gib "$pid")
    t=$(now); peak criu dump -t "$pid" -D $IMG -v4 -o dump.log 2>/dev/null || { tail -n 5 $IMG/dump.log; return 1; }; local dump; dump=$(since "$t")
    local tool; tool=$(cat /tmp/bench-peak)
    local size; size=$(du -sb $IMG | awk '{ printf "%.1f", $1 / 1073741824 }')
    wait_gone "$pid"
    t=$(now); peak criu restore -D $IMG -d -v4 -o restore.log 2>/dev/null || { tail -n 5 $IMG/restore.log; return 1; }; local rst; rst=$(since "$t")
    tool="$tool / $(cat /tmp/bench-peak)"
    t=$(now); $CKPT restore "$pid" && $CKPT unlock "$pid" || return 1; local drst; drst=$(since "$t")
    rows+=("| $name | baseline | $lock | $ck | $dump | $(add $lock $ck $dump) | $size GiB | $rss GiB | $tool GiB | $rst | $drst | $(add $rst $drst) |")
    rm -rf $IMG
}
with_stasis() {  # NAME PID
    local name=$1 pid=$2
    # The chunk store on the same tmpfs as the baseline's images, fresh for each row (no deduplication).
    export STASIS_STORE=/dev/shm/stasis-bench-store
    rm -rf $IMG $STASIS_STORE
    peak $STASIS dump "$pid" -D $IMG --json >/tmp/bench-dump.json || return 1
    local tool; tool=$(cat /tmp/bench-peak)
    local size; size=$(du -sbc $IMG $STASIS_STORE | tail -n 1 | awk '{ printf "%.1f", $1 / 1073741824 }')
    wait_gone "$pid"
    peak $STASIS restore -D $IMG --json >/tmp/bench-restore.json || return 1
    tool="$tool / $(cat /tmp/bench-peak)"
    local d=/tmp/bench-dump.json r=/tmp/bench-restore.json
    rows+=("| $name | stasis | $(json $d "'%.2f' % gpu['lockSeconds']") | $(json $d "'%.2f' % gpu['checkpointSeconds']") | $(json $d "'%.2f' % timings['criu']") (hash+sync $(json $d "'%.2f' % (timings['hash'] + timings['sync'])")) | $(json $d "'%.2f' % timings['total']") | $size GiB | (the same driver copy) | $tool GiB | $(json $r "'%.2f' % (timings['criu'])") (verify $(json $r "'%.2f' % (timings['verify'] + timings['rebuild'])")) | $(json $r "'%.2f' % timings['devices']") | $(json $r "'%.2f' % timings['total']") |")
    rm -rf $IMG $STASIS_STORE
}
verify() {
    rm -f "$2/result"; kill -USR1 "$1"
    for _ in $(seq 600); do [[ -e $2/result ]] && break; sleep 0.05; done
    cat "$2/result" 2>/dev/null || echo "FAIL no answer"
}

for gib in 8 32; do
    dir=$(mktemp -d); pid=$(/opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem $((gib * 1024)))
    baseline "buffers ${gib} GiB" "$pid" || echo "baseline failed for $gib GiB"
    echo "after baseline: $(verify "$pid" "$dir")"
    with_stasis "buffers ${gib} GiB" "$pid" || echo "stasis failed for $gib GiB"
    echo "after stasis: $(verify "$pid" "$dir")"
    kill -9 "$pid"; wait_gone "$pid"
done

run=$(mktemp -d)
pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 Workloads/torch/bert_train.py --dir "$run" --size large --steps 8 --pause-at 4 --daemon)
baseline "BERT-large training" "$pid" || echo "baseline failed for BERT-large"
with_stasis "BERT-large training" "$pid" || echo "stasis failed for BERT-large"
touch "$run/go"; for _ in $(seq 600); do [[ -e $run/done ]] && break; sleep 0.1; done
echo "BERT-large after both: $( [[ -e $run/done ]] && echo "finished $(wc -l <"$run/losses.txt") steps" || echo "did not finish")"
kill -9 "$pid" 2>/dev/null

echo
echo "| workload | path | lock (s) | device checkpoint (s) | CRIU dump (s) | checkpoint total (s) | image | workload RSS after device checkpoint | peak RSS of CRIU or stasis, dump / restore | CRIU restore (s) | device restore (s) | restore total (s) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $(nproc) cores; $(criu --version | head -n1); images in /dev/shm"
