#!/usr/bin/env bash
# GPU acceptance tests, run on the GPU machine from the repository root, after scripts/device-pack.sh has
# filled .device/ here (the device tool carries it). Prints a PASS/FAIL line per case and a summary; logs go
# to $OUT (the device tool brings that folder back).
#
#   scripts/device-test.sh [SECTION...]     sections: cuda refuse gpumap plugin infer bert agent (default:
#                                           all), and, only when named: agentbig (BERT-large and 64 GiB under
#                                           the agent), container (GPU containers under runc),
#                                           multigpu (two GPUs: a split model and NCCL; needs two),
#                                           reliability (stasis killed after CRIU's exit, a damaged
#                                           chunk not reused, bench/reuse-check.sh gpu), bertleave
#                                           (BERT-base's --leave-running case alone),
#                                           migrate (BERT moved by stasis migrate between namespaces, and
#                                           bench/migrate.sh bert), ncclrefuse and migratebench (one part of
#                                           multigpu or of migrate, for a short call),
#                                           agentbench and agentcost (the agent's benchmark,
#                                           bench/agent-dump-restore.sh speed / $AGENTCOST_PARTS),
#                                           and, only when named: bench (the GPU benchmark), storebench
#                                           (the chunk store's throughput on a BERT checkpoint), export and
#                                           import (restore on another machine: export on one, bring the
#                                           pieces back from $OUT into .device/import/, import on a new one)
#
# cuda..bert take about 6 minutes on the H200 and agent about 3.5 (the device tool allows 10 per call: run
# them in two calls); agentbig about 2.5, bench about 5, agentbench about 5.
#
# Every workload verifies itself after the restore: the CUDA programs check their device memory, streams,
# events, graphs and pools; BERT's per-step losses must equal an uninterrupted run's byte for byte; the
# inference server must give the same answers.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/stasis-device-out}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/stasis-device-logs.XXXXXX)
SECTIONS=(${@:-cuda refuse gpumap plugin infer bert agent})
results=()
# Each verdict also goes to $OUT at once, so a run cut short by the device tool's time limit still reports.
pass() { echo "PASS $1"; results+=("PASS $1"); echo "PASS $1" >>"$OUT/progress.txt"; }
fail() { echo "FAIL $1: $2"; results+=("FAIL $1: $2"); echo "FAIL $1: $2" >>"$OUT/progress.txt"; }

# ---- setup ---------------------------------------------------------------------------------------------
setup() {
    export PATH="/usr/local/nvidia/bin:/usr/local/cuda/bin:$PATH"
    export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}:$ROOT/.device/lib"
    mkdir -p /opt/criu /opt/stasis/bin
    for f in .device/criu-debs/*.deb; do dpkg -x "$f" /opt/criu; done
    local libs=/opt/criu/usr/lib/x86_64-linux-gnu:/opt/criu/lib/x86_64-linux-gnu
    # CRIU 4.2 built on the development machine, with the libraries of the packages; 4.1 from them as fallback.
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$libs" "$ROOT/.device/criu" >/opt/stasis/bin/criu
    chmod +x /opt/stasis/bin/criu
    if ! /opt/stasis/bin/criu --version >/dev/null 2>&1; then
        echo "note: the carried CRIU 4.2 does not run here; using the packaged CRIU"
        printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec /opt/criu/usr/sbin/criu "$@"\n' "$libs" >/opt/stasis/bin/criu
    fi
    export PATH="/opt/stasis/bin:$PATH"
    xz -dc .device/stasis.xz >/opt/stasis/bin/stasis && chmod +x /opt/stasis/bin/stasis
    cp .device/stasis-workload /opt/stasis/bin/
    # Beside the binary, where `stasis run` finds it.
    cp .device/libstasis-agent.so /opt/stasis/bin/
    mkdir -p /opt/stasis/criu-plugins && cp .device/criu-plugins/*.so /opt/stasis/criu-plugins/
    # Every stasis call is bounded, so a hang shows as a failure instead of eating the run.
    STASIS="timeout 300 /opt/stasis/bin/stasis"
    criu --version | head -n 1
    criu check 2>&1 | tail -n 1
    $STASIS check >"$LOGS/check.txt" 2>&1 && pass "stasis check" || fail "stasis check" "$(tail -n 3 "$LOGS/check.txt")"
    cat "$LOGS/check.txt"
    GPU_UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -n 1)
    # QUICK=1: a short call that needs neither the CUDA workload nor the layout check.
    [[ ${QUICK:-} == 1 ]] && return
    echo "MIG mode: $(nvidia-smi --query-gpu=mig.mode.current --format=csv,noheader | head -n 1); capability minors: $(head -n 6 /proc/driver/nvidia-caps/mig-minors 2>/dev/null | tr '\n' ';')"
    nvcc -O2 -arch=sm_90 -o /opt/stasis/bin/cuda-workload Workloads/cuda/cuda-workload.cu -lcuda >"$LOGS/nvcc.txt" 2>&1 \
        && pass "nvcc cuda-workload" || fail "nvcc cuda-workload" "$(head -n 20 "$LOGS/nvcc.txt")"
    # Our declarations of the checkpoint API's argument structures against the real cuda.h.
    gcc -I/usr/local/cuda/include -ISources/CStasisCUDA/include -o /tmp/layout-check scripts/device/layout-check.c \
        Sources/CStasisCUDA/cuda_steps.c >"$LOGS/layout.txt" 2>&1 && /tmp/layout-check >>"$LOGS/layout.txt" 2>&1 \
        && pass "checkpoint API layout matches cuda.h" || fail "checkpoint API layout" "$(cat "$LOGS/layout.txt")"
}

# ---- helpers -------------------------------------------------------------------------------------------
wait_gone() { for _ in $(seq 1000); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; return 1; }
tree_pids() { echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' '; }
kill_tree() { for p in $(tree_pids "$1"); do kill -9 "$p" 2>/dev/null; done; wait_gone "$1"; }

# Asks a workload in DIR to verify itself; prints its verdict.
verify() {
    local pid=$1 dir=$2
    rm -f "$dir/result"
    kill -USR1 "$pid" 2>/dev/null || { echo "FAIL not running"; return; }
    # VERIFY_TRIES: 20 per second; a workload holding tens of GiB compares them on the host (minutes).
    for _ in $(seq "${VERIFY_TRIES:-600}"); do [[ -e $dir/result ]] && break; sleep 0.05; done
    cat "$dir/result" 2>/dev/null || echo "FAIL no answer"
}

# dump (which ends the tree) + restore + verify, for a running workload.
round_trip() {
    local name=$1 pid=$2 dir=$3; shift 3
    local pids; pids=$(tree_pids "$pid")
    if ! $STASIS dump "$pid" -D "$dir/ckpt" "$@" >"$dir/dump.txt" 2>&1; then fail "$name" "dump: $(tail -n 8 "$dir/dump.txt")"; return 1; fi
    for p in $pids; do wait_gone "$p" || { fail "$name" "PID $p still there after the dump"; return 1; }; done
    if ! $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1; then fail "$name" "restore: $(tail -n 8 "$dir/restore.txt")"; return 1; fi
    local verdict; verdict=$(verify "$pid" "$dir")
    [[ $verdict == PASS* ]] || { fail "$name" "after restore: $verdict"; return 1; }
    return 0
}

start_cuda() {  # MODE DIR [ARGS...] -> prints PID
    local mode=$1 dir=$2; shift 2
    /opt/stasis/bin/cuda-workload "$mode" --dir "$dir" --daemon "$@"
}

# Which NVIDIA device files the process maps, how often and how much (evidence for detecting managed memory).
record_maps() {
    python3 - "$2" >"$LOGS/maps-$1.txt" 2>&1 <<'PY'
import collections, sys
count, kib = collections.Counter(), collections.Counter()
for line in open(f"/proc/{sys.argv[1]}/maps"):
    fields = line.split()
    if len(fields) >= 6 and fields[5].startswith("/dev/nvidia"):
        start, end = (int(x, 16) for x in fields[0].split("-"))
        count[fields[5]] += 1
        kib[fields[5]] += (end - start) // 1024
for name in sorted(count):
    print(f"{name}: {count[name]} mappings, {kib[name]} KiB")
PY
    echo "maps of $1: $(tr '\n' ';' <"$LOGS/maps-$1.txt")"
}

# The dump's line about what an agent moved, if any.
agent_line() { grep -h 'agent:' "$1" 2>/dev/null | sed 's/^ *//' | head -n 1; }

keep_logs() { cp "$1"/*.txt "$LOGS/" 2>/dev/null; for f in "$1"/*.txt; do [[ -e $f ]] && mv "$LOGS/$(basename "$f")" "$LOGS/$2-$(basename "$f")"; done; cp "$1/log" "$LOGS/$2-workload.log" 2>/dev/null; true; }

# A CUDA program (started through LAUNCHER) checkpointed twice with --leave-running, verified each time,
# then each checkpoint restored and verified: LABEL names the results.
leave_running_twice() {
    local label=$1 launcher=$2
    local dir; dir=$(mktemp -d /tmp/stasis-$label-leave.XXXXXX)
    local pid; pid=$($launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 1024)
    if $STASIS dump "$pid" -D "$dir/one" --leave-running >"$dir/dump1.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]] \
        && $STASIS dump "$pid" -D "$dir/two" --leave-running >"$dir/dump2.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]]; then
        pass "$label --leave-running twice, process keeps running $(agent_line "$dir/dump2.txt")"
        kill_tree "$pid"
        if $STASIS restore -D "$dir/two" >"$dir/restore2.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            kill_tree "$pid"
            $STASIS restore -D "$dir/one" >"$dir/restore1.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]] \
                && pass "$label restore of each of two checkpoints" || fail "$label restore of the first checkpoint" "$(tail -n 5 "$dir/restore1.txt")"
        else
            fail "$label restore of the second checkpoint" "$(tail -n 5 "$dir/restore2.txt")"
        fi
    else
        fail "$label --leave-running" "$(tail -n 5 "$dir"/dump*.txt)"
    fi
    keep_logs "$dir" "$label-leave"
    kill_tree "$pid"
}

# ---- sections ------------------------------------------------------------------------------------------
section_cuda() {
    for mode in buffers streams events graph vmm pool pinned threads tree; do
        local dir; dir=$(mktemp -d /tmp/stasis-cuda-$mode.XXXXXX)
        local pid; pid=$(start_cuda "$mode" "$dir") || { fail "cuda $mode" "did not start: $(tail -n 5 "$dir/log")"; continue; }
        local before; before=$(verify "$pid" "$dir")
        if [[ $before != PASS* ]]; then fail "cuda $mode" "before the dump: $before"
        elif round_trip "cuda $mode" "$pid" "$dir"; then pass "cuda $mode: $(grep -h 'gpu:' "$dir/dump.txt" | sed 's/^ *//')"; fi
        keep_logs "$dir" "cuda-$mode"
        kill_tree "$pid"
    done

    # --leave-running, and two checkpoints of one process; then restore the first one.
    leave_running_twice cuda ""
}

section_refuse() {
    for mode in managed ipc; do
        local dir; dir=$(mktemp -d /tmp/stasis-refuse-$mode.XXXXXX)
        local pid; pid=$(start_cuda "$mode" "$dir") || { fail "refuse $mode" "did not start"; continue; }
        record_maps "$mode" "$pid"
        if $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1; then
            # The driver took it: then the restore must work too.
            wait_gone "$pid"
            if $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]]; then
                # The driver carries an exported (not imported) IPC buffer; the job was not lost either way.
                pass "refuse $mode: not refused: the driver checkpointed it and it verified after restore"
            else
                fail "refuse $mode" "not refused, and the restore failed: $(tail -n 5 "$dir/restore.txt")"
            fi
        else
            local verdict; verdict=$(verify "$pid" "$dir")
            # Managed memory is refused before the driver is asked (the process is never locked).
            [[ $mode == managed ]] && ! grep -q "uses managed (unified) memory" "$dir/dump.txt" && verdict="FAIL not refused up front: $(head -c 300 "$dir/dump.txt")"
            [[ $verdict == PASS* ]] && [[ ! -e $dir/ckpt ]] \
                && pass "refuse $mode: $(grep -m1 'error' "$dir/dump.txt" | cut -c1-200); process still running and verified" \
                || fail "refuse $mode" "refused but the process is not well: $verdict"
        fi
        keep_logs "$dir" "refuse-$mode"
        kill_tree "$pid"
    done
}

section_gpumap() {
    local dir; dir=$(mktemp -d /tmp/stasis-gpumap.XXXXXX)
    local pid; pid=$(start_cuda buffers "$dir")
    record_maps buffers "$pid"
    $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 || fail "gpu-map" "dump: $(tail -n 5 "$dir/dump.txt")"
    wait_gone "$pid"
    # A GPU this machine does not have: refused before anything is restored.
    if $STASIS restore -D "$dir/ckpt" --gpu-map "$GPU_UUID=GPU-00000000-1111-2222-3333-444444444444" >"$dir/bad.txt" 2>&1; then
        fail "gpu-map unknown target" "accepted"
    else
        [[ ! -e /proc/$pid ]] && pass "gpu-map unknown target refused: $(grep -m1 error "$dir/bad.txt" | cut -c1-160)" \
            || fail "gpu-map unknown target" "refused, but PID $pid exists"
    fi
    if $STASIS restore -D "$dir/ckpt" --gpu-map "GPU-00000000-1111-2222-3333-444444444444=0" >"$dir/bad2.txt" 2>&1; then
        fail "gpu-map unknown source" "accepted"
    else
        [[ ! -e /proc/$pid ]] && pass "gpu-map unknown source refused: $(grep -m1 error "$dir/bad2.txt" | cut -c1-160)" \
            || fail "gpu-map unknown source" "refused, but PID $pid exists"
    fi
    # The device's own UUID: the remapping table goes to the driver.
    if $STASIS restore -D "$dir/ckpt" --gpu-map "$GPU_UUID=$GPU_UUID" >"$dir/restore.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]]; then
        pass "gpu-map onto the same UUID"
    else
        fail "gpu-map onto the same UUID" "$(tail -n 5 "$dir/restore.txt")"
    fi
    keep_logs "$dir" "gpumap"
    kill_tree "$pid"
}

# Plain CRIU with nothing but the stasis plugin: dump, restore; then --leave-running. Every CRIU call is
# bounded (CRIU may ignore SIGTERM, hence -k) and so is each driver step of the plugin; CRIU's logs and
# output go straight to $OUT, so they come back even from a run cut short.
section_plugin() {
    local dir; dir=$(mktemp -d /tmp/stasis-plugin.XXXXXX)
    local pid; pid=$(start_cuda buffers "$dir" --mem 512)
    local criu="timeout -k 5 60 env STASIS_CUDA_STEP_TIMEOUT_S=30 criu"
    mkdir -p "$dir/img" "$dir/img2"
    if $criu dump -t "$pid" -D "$dir/img" -L /opt/stasis/criu-plugins -v4 -o "$OUT/plugin-dump.log" >"$OUT/plugin-criu.txt" 2>&1 && wait_gone "$pid" \
        && $criu restore -D "$dir/img" -L /opt/stasis/criu-plugins -d -v4 -o "$OUT/plugin-restore.log" >>"$OUT/plugin-criu.txt" 2>&1 \
        && [[ $(verify "$pid" "$dir") == PASS* ]]; then
        pass "plain criu + stasis plugin: dump and restore of a CUDA process"
    else
        fail "plain criu + stasis plugin" "$(tail -n 5 "$OUT/plugin-criu.txt"; grep -h 'Error' "$OUT"/plugin-*.log | tail -n 5)"
    fi
    if $criu dump -t "$pid" -D "$dir/img2" -L /opt/stasis/criu-plugins --leave-running -v4 -o "$OUT/plugin-dump2.log" >>"$OUT/plugin-criu.txt" 2>&1 \
        && [[ $(verify "$pid" "$dir") == PASS* ]]; then
        pass "plain criu + stasis plugin: --leave-running, the process keeps its GPU"
    else
        fail "plain criu + stasis plugin --leave-running" "$(tail -n 5 "$OUT/plugin-criu.txt")"
    fi
    kill_tree "$pid"
}

section_infer() {
    local dir; dir=$(mktemp -d /tmp/stasis-infer.XXXXXX)
    local srv=Workloads/torch/infer_server.py
    local pid; pid=$(python3 $srv serve --dir "$dir" --daemon) || { fail "inference server" "did not start: $(tail -n 5 "$dir/log")"; return; }
    record_maps infer "$pid"
    local a1 b1; a1=$(python3 $srv ask --dir "$dir" --name a1 --tokens "101 7592 2088 102") ; b1=$(python3 $srv ask --dir "$dir" --name b1 --tokens "101 2023 2003 1037 3231 102")
    if $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1; then
        local a2 b2; a2=$(python3 $srv ask --dir "$dir" --name a2 --tokens "101 7592 2088 102"); b2=$(python3 $srv ask --dir "$dir" --name b2 --tokens "101 2023 2003 1037 3231 102")
        [[ -n $a1 && $a1 == "$a2" && $b1 == "$b2" ]] && pass "inference server: same answers after restore ($(grep -h 'gpu:' "$dir/dump.txt" | sed 's/^ *//'))" \
            || fail "inference server" "answers differ: '${a1:0:60}' vs '${a2:0:60}'"
    else
        fail "inference server" "$(tail -n 5 "$dir"/dump.txt "$dir"/restore.txt 2>/dev/null)"
    fi
    keep_logs "$dir" "infer"
    kill_tree "$pid"
}

section_bert() {
    for size in base large; do
        local steps=30 pause=15
        local ref; ref=$(mktemp -d /tmp/stasis-bert-ref-$size.XXXXXX)
        local run; run=$(mktemp -d /tmp/stasis-bert-run-$size.XXXXXX)
        CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size $size --steps $steps >"$ref/out.txt" 2>&1 \
            || { fail "bert-$size reference run" "$(tail -n 5 "$ref/out.txt" "$ref/log" 2>/dev/null)"; continue; }
        local pid; pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 Workloads/torch/bert_train.py --dir "$run" --size $size --steps $steps --pause-at $pause --daemon) \
            || { fail "bert-$size" "did not start: $(tail -n 5 "$run/log")"; continue; }
        if $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$run/ckpt" >"$run/restore.txt" 2>&1; then
            touch "$run/go"
            for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
            if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
                pass "bert-$size: $(wc -l <"$run/losses.txt") losses identical to an uninterrupted run; $(grep -h 'gpu:\|time:' "$run/dump.txt" | sed 's/^ *//' | tr '\n' ' ')"
            else
                fail "bert-$size" "losses differ (or the run did not finish): $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ')"
            fi
        else
            fail "bert-$size" "$(tail -n 6 "$run"/dump.txt "$run"/restore.txt 2>/dev/null)"
        fi
        cp "$run/dump.txt" "$LOGS/bert-$size-dump.txt" 2>/dev/null; cp "$run/restore.txt" "$LOGS/bert-$size-restore.txt" 2>/dev/null
        cp "$run/log" "$LOGS/bert-$size-workload.log" 2>/dev/null
        [[ -e /proc/$pid ]] && kill_tree "$pid"
        rm -rf "$run/ckpt"
        [[ $size == base ]] && bert_leave_running "$ref" $steps $pause
    done
}

# BERT-base checkpointed twice with --leave-running: it trains on to the same losses; then the first checkpoint,
# restored (with the files it writes, losses.txt and step-times.txt, put back as they were then: files outside
# a checkpoint are the user's, and CRIU refuses open files whose size changed), trains to the same losses again.
bert_leave_running() {
    local ref=$1 steps=$2 pause=$3
    local run; run=$(mktemp -d /tmp/stasis-bert-leave.XXXXXX)
    local pid; pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 Workloads/torch/bert_train.py --dir "$run" --size base --steps $steps --pause-at $pause --daemon) \
        || { fail "bert-base --leave-running" "did not start: $(tail -n 5 "$run/log")"; return; }
    if $STASIS dump "$pid" -D "$run/one" --leave-running >"$run/dump1.txt" 2>&1 && $STASIS dump "$pid" -D "$run/two" --leave-running >"$run/dump2.txt" 2>&1; then
        # The files it writes, as they were at the checkpoint (CRIU refuses a restore whose open files changed size).
        mkdir -p "$run/at-checkpoint" && cp "$run"/*.txt "$run/at-checkpoint/"
        touch "$run/go"
        for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
        if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
            pass "bert-base --leave-running twice: trains on to the same losses"
            wait_gone "$pid"
            cp "$run"/at-checkpoint/*.txt "$run/"; rm -f "$run/done"
            if $STASIS restore -D "$run/one" >"$run/restore1.txt" 2>&1; then
                for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
                cmp -s "$ref/losses.txt" "$run/losses.txt" && pass "bert-base: the first of two checkpoints, restored, trains to the same losses" \
                    || fail "bert-base first checkpoint" "losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ')"
            else
                fail "bert-base restore of the first checkpoint" "$(tail -n 6 "$run/restore1.txt"); CRIU: $(grep -h 'Error' "$(ls -td /var/lib/stasis/restore/*/ | head -n 1)criu-restore.log" 2>/dev/null | tail -n 6)"
            fi
        else
            fail "bert-base --leave-running" "losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ')"
        fi
    else
        fail "bert-base --leave-running" "$(tail -n 6 "$run"/dump*.txt)"
    fi
    cp "$run/dump1.txt" "$LOGS/bert-leave-dump1.txt" 2>/dev/null; cp "$run/log" "$LOGS/bert-leave-workload.log" 2>/dev/null
    [[ -e /proc/$pid ]] && kill_tree "$pid"
    rm -rf "$run/one" "$run/two"
}

# Only BERT-base's --leave-running case (and its reference run), when named.
section_bertleave() {
    local ref; ref=$(mktemp -d /tmp/stasis-bert-ref-base.XXXXXX)
    CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size base --steps 30 >"$ref/out.txt" 2>&1 \
        || { fail "bert-base reference run" "$(tail -n 5 "$ref/out.txt")"; return; }
    bert_leave_running "$ref" 30 15
}

# Restore on another machine, step 1: checkpoint a small CUDA program in a fixed directory (its files must be
# at the same paths there) and bring it back through $OUT, compressed and cut into 12 MiB pieces.
EXPORT_DIR=/tmp/stasis-export
section_export() {
    rm -rf $EXPORT_DIR && mkdir -p $EXPORT_DIR
    # streams: queued work on several streams, and little pattern data (random data does not compress).
    local pid; pid=$(start_cuda streams $EXPORT_DIR) || { fail "export" "did not start"; return; }
    if ! $STASIS dump "$pid" -D $EXPORT_DIR/ckpt >"$LOGS/export-dump.txt" 2>&1; then fail "export" "$(tail -n 5 "$LOGS/export-dump.txt")"; return; fi
    wait_gone "$pid"
    # The checkpoint as one file (its chunks are in this machine's store), beside the workload's own files;
    # with the program's binary: CRIU wants the very file the process runs (nvcc's output may differ there).
    $STASIS export $EXPORT_DIR/ckpt -o $EXPORT_DIR/ckpt.bundle >"$LOGS/export-bundle.txt" 2>&1 \
        || { fail "export" "stasis export: $(tail -n 3 "$LOGS/export-bundle.txt")"; return; }
    tar -C / -cf - --exclude="${EXPORT_DIR#/}/ckpt" "${EXPORT_DIR#/}" opt/stasis/bin/cuda-workload | xz -T0 -9 >/tmp/export.tar.xz
    local size; size=$(stat -c %s /tmp/export.tar.xz)
    # What comes back must then travel out again with the carried binaries (.device/, ~38 MiB) inside the
    # device tool's 64 MiB.
    if (( size > 24 * 1024 * 1024 )); then
        fail "export" "the compressed checkpoint is $size bytes, more than the 24 MiB that can travel back out"
        return
    fi
    split -b 12M -d /tmp/export.tar.xz "$OUT/export.tar.xz.part-"
    pass "export: checkpoint of a CUDA program, $(du -sb $EXPORT_DIR/ckpt | cut -f1) bytes, $size compressed, in $OUT"
}

# Step 2, on a freshly started machine: carry the pieces in .device/import/ and restore them there.
section_import() {
    ls .device/import/export.tar.xz.part-* >/dev/null 2>&1 || { fail "import" "no .device/import/export.tar.xz.part-*"; return; }
    rm -rf $EXPORT_DIR
    cat .device/import/export.tar.xz.part-* | xz -dc | tar -C / -xf -
    $STASIS import $EXPORT_DIR/ckpt.bundle -D $EXPORT_DIR/ckpt >"$LOGS/import-bundle.txt" 2>&1 \
        || { fail "import" "stasis import: $(tail -n 3 "$LOGS/import-bundle.txt")"; return; }
    local pid; pid=$(python3 -c 'import json; print(json.load(open("/tmp/stasis-export/ckpt/manifest.json"))["processTree"]["rootPID"])')
    if $STASIS restore -D $EXPORT_DIR/ckpt >"$LOGS/import-restore.txt" 2>&1; then
        local verdict; verdict=$(verify "$pid" $EXPORT_DIR)
        [[ $verdict == PASS* ]] && pass "import: restored on another machine (GPU $GPU_UUID) and verified" \
            || fail "import" "after restore: $verdict"
    else
        fail "import" "$(tail -n 6 "$LOGS/import-restore.txt")"
    fi
    kill_tree "$pid" 2>/dev/null
}

# ---- the agent: the same workloads started by `stasis run`, their device memory moved by the agent ----------
RUN="/opt/stasis/bin/stasis run --"

# A reference run of BERT (SIZE, extra environment), computed once per combination.
bert_reference() {
    local size=$1 env=$2 ref=/tmp/stasis-bert-ref-$1-${2//[^a-z]/}
    if [[ ! -s $ref/losses.txt ]]; then
        mkdir -p "$ref"
        env $env CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size "$size" --steps 30 >"$ref/out.txt" 2>&1 || return 1
    fi
    echo "$ref"
}

# The GPU hashed the chunks of the dump in DIR/ckpt, and the CPU agrees: `stasis verify` recomputes every
# chunk's SHA-256 from the store.
gpu_digests_checked() {
    local label=$1 dir=$2
    if ! grep -q 'hashed on the GPU' "$dir/dump.txt"; then
        fail "$label: GPU digests" "the dump did not hash on the GPU: $(agent_line "$dir/dump.txt")"
    elif $STASIS verify "$dir/ckpt" >"$dir/verify.txt" 2>&1; then
        pass "$label: GPU digests confirmed by stasis verify ($(tail -n 1 "$dir/verify.txt" | cut -c1-100))"
    else
        fail "$label: GPU digests" "stasis verify: $(tail -n 3 "$dir/verify.txt")"
    fi
}

# BERT under the agent: checkpoint at step 15, restore, train to 30; losses must equal the reference's.
agent_bert() {
    local size=$1 env=$2 label=$3
    local ref; ref=$(bert_reference "$size" "$env") || { fail "$label reference run" "did not finish"; return; }
    local run; run=$(mktemp -d /tmp/stasis-agent-bert.XXXXXX)
    local pid; pid=$(env $env CUBLAS_WORKSPACE_CONFIG=:4096:8 $RUN python3 Workloads/torch/bert_train.py --dir "$run" --size "$size" --steps 30 --pause-at 15 --daemon) \
        || { fail "$label" "did not start: $(tail -n 5 "$run/log")"; return; }
    if $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$run/ckpt" >"$run/restore.txt" 2>&1; then
        touch "$run/go"
        for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
        if cmp -s "$ref/losses.txt" "$run/losses.txt" && grep -q 'agent:' "$run/dump.txt"; then
            pass "$label: 30 losses identical; $(agent_line "$run/dump.txt"); $(grep -h 'time:' "$run/dump.txt" | sed 's/^ *//'); restore $(grep -h 'time:' "$run/restore.txt" | sed 's/^ *//')"
        else
            fail "$label" "losses differ or no agent line: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ') $(agent_line "$run/dump.txt")"
        fi
        gpu_digests_checked "$label" "$run"
    else
        fail "$label" "$(tail -n 6 "$run"/dump.txt "$run"/restore.txt 2>/dev/null)"
    fi
    keep_logs "$run" "agent-$label"
    [[ -e /proc/$pid ]] && kill_tree "$pid"
    rm -rf "$run/ckpt"
}

section_agent() {
    # The store on tmpfs: the 64 GiB case does not fit the disk.
    export STASIS_STORE=/dev/shm/stasis-agent-store
    rm -rf $STASIS_STORE
    for mode in buffers streams events graph vmm pool pinned threads tree; do
        local dir; dir=$(mktemp -d /tmp/stasis-agent-$mode.XXXXXX)
        local pid; pid=$($RUN /opt/stasis/bin/cuda-workload "$mode" --dir "$dir" --daemon) || { fail "agent cuda $mode" "did not start: $(tail -n 5 "$dir/log")"; continue; }
        local before; before=$(verify "$pid" "$dir")
        if [[ $before != PASS* ]]; then fail "agent cuda $mode" "before the dump: $before"
        elif round_trip "agent cuda $mode" "$pid" "$dir"; then
            pass "agent cuda $mode: $(agent_line "$dir/dump.txt" || true) $(grep -h 'gpu:' "$dir/dump.txt" | sed 's/^ *//')"
            [[ $mode == buffers ]] && gpu_digests_checked "agent cuda $mode" "$dir"
        fi
        keep_logs "$dir" "agent-cuda-$mode"
        kill_tree "$pid"
    done

    # --leave-running twice: the agent refills from the store and the program goes on; then each checkpoint
    # restores.
    leave_running_twice agent "$RUN"
    local dir pid

    # A dump that fails after the agent gave its memory back (a fault injected in CRIU's post-dump step):
    # the program must get its memory back and verify.
    dir=$(mktemp -d /tmp/stasis-agent-fail.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 512)
    if STASIS_FAULT=post-dump $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1; then
        fail "agent rollback" "the injected fault did not fail the dump"
    else
        local verdict; verdict=$(verify "$pid" "$dir")
        [[ $verdict == PASS* && ! -e $dir/ckpt ]] && pass "agent rollback: a dump failing after the evacuation leaves the program running and verified ($(grep -m1 error "$dir/dump.txt" | cut -c1-120))" \
            || fail "agent rollback" "$verdict; $(tail -n 3 "$dir/dump.txt")"
    fi
    keep_logs "$dir" "agent-fail"
    kill_tree "$pid"

    # Managed memory is still refused up front; a CUDA IPC exporter runs with --no-backing and takes the
    # driver path.
    dir=$(mktemp -d /tmp/stasis-agent-managed.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload managed --dir "$dir" --daemon)
    if ! $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 && grep -q "managed (unified) memory" "$dir/dump.txt" && [[ $(verify "$pid" "$dir") == PASS* ]]; then
        pass "agent refuses managed memory up front; the program runs on"
    else
        fail "agent managed" "$(tail -n 3 "$dir/dump.txt")"
    fi
    kill_tree "$pid"
    dir=$(mktemp -d /tmp/stasis-agent-ipc.XXXXXX)
    if pid=$(/opt/stasis/bin/stasis run --no-backing -- /opt/stasis/bin/cuda-workload ipc --dir "$dir" --daemon); then
        round_trip "agent ipc --no-backing" "$pid" "$dir" && pass "agent ipc with --no-backing: the driver carries it"
        kill_tree "$pid"
    else
        fail "agent ipc --no-backing" "did not start: $(tail -n 3 "$dir/log")"
    fi

    # The inference server under the agent.
    dir=$(mktemp -d /tmp/stasis-agent-infer.XXXXXX)
    local srv=Workloads/torch/infer_server.py
    pid=$($RUN python3 $srv serve --dir "$dir" --daemon) || { fail "agent inference server" "did not start: $(tail -n 5 "$dir/log")"; }
    if [[ -n $pid ]]; then
        local a1; a1=$(python3 $srv ask --dir "$dir" --name a1 --tokens "101 7592 2088 102")
        if $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1; then
            local a2; a2=$(python3 $srv ask --dir "$dir" --name a2 --tokens "101 7592 2088 102")
            [[ -n $a1 && $a1 == "$a2" ]] && pass "agent inference server: same answer after restore; $(agent_line "$dir/dump.txt")" \
                || fail "agent inference server" "answers differ: '${a1:0:60}' vs '${a2:0:60}'"
        else
            fail "agent inference server" "$(tail -n 5 "$dir"/dump.txt "$dir"/restore.txt 2>/dev/null)"
        fi
        keep_logs "$dir" "agent-infer"
        kill_tree "$pid"
    fi

    agent_bert base "" "agent bert-base"
    agent_bert base "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" "agent bert-base expandable segments"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# The reliability fixes on the GPU: stasis killed after CRIU's exit leaves a checkpoint that restores
# (through the driver and under the agent), and a damaged chunk of device memory in the store is not reused
# by the next dump (the agent's chunk path), then the cost of checking reused chunks (bench/reuse-check.sh).
section_reliability() {
    export STASIS_STORE=/dev/shm/stasis-reliability-store
    rm -rf $STASIS_STORE
    local dir pid launcher label
    for label in driver agent; do
        launcher=""; [[ $label == agent ]] && launcher=$RUN
        dir=$(mktemp -d /tmp/stasis-killed-$label.XXXXXX)
        pid=$($launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 2048)
        STASIS_FAULT=criu-exited-kill $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1
        if wait_gone "$pid" && $STASIS verify "$dir/ckpt" >"$dir/verify.txt" 2>&1 && $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1 \
            && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            pass "$label: stasis killed after CRIU's exit, the checkpoint verifies and restores"
        else
            fail "$label: killed after CRIU's exit" "$(tail -n 3 "$dir"/verify.txt "$dir"/restore.txt 2>/dev/null)"
        fi
        keep_logs "$dir" "killed-$label"
        kill_tree "$pid"
    done
    # A chunk of device memory damaged in the store between two checkpoints of an unchanged program, before
    # any dump reused it (a fresh store: the cases above wrote the same chunks, and a chunk checked at its first
    # reuse is trusted after that).
    rm -rf $STASIS_STORE
    dir=$(mktemp -d /tmp/stasis-damaged.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 1024)
    if $STASIS dump "$pid" -D "$dir/one" --leave-running >"$dir/dump1.txt" 2>&1; then
        local chunk; chunk=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print([c for f in m["files"] if f["path"].startswith("gpu/") for c in f.get("chunks", []) if c][0])' "$dir/one/manifest.json")
        local file=$STASIS_STORE/chunks/${chunk:0:2}/$chunk
        printf '\xff\xff\xff\xff' | dd of="$file" bs=1 seek=4000 conv=notrunc status=none
        if $STASIS dump "$pid" -D "$dir/two" >"$dir/dump2.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$dir/two" >"$dir/restore.txt" 2>&1 \
            && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            pass "agent: a damaged chunk in the store is written again by the next dump, which restores ($(agent_line "$dir/dump2.txt"))"
        else
            fail "agent: damaged chunk" "$(tail -n 3 "$dir"/dump2.txt "$dir"/restore.txt 2>/dev/null)"
        fi
    else
        fail "agent: damaged chunk" "first dump: $(tail -n 3 "$dir/dump1.txt")"
    fi
    keep_logs "$dir" "damaged"
    kill_tree "$pid"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
    STASIS=/opt/stasis/bin/stasis bench/reuse-check.sh gpu 16 2>&1 | tee "$OUT/reuse-check.txt"
}

# The agent's large cases: BERT-large training, and a process holding 64 GiB of device memory.
section_agentbig() {
    export STASIS_STORE=/dev/shm/stasis-agent-store
    rm -rf $STASIS_STORE
    agent_bert large "" "agent bert-large"

    # 64 GiB of device memory.
    local dir pid
    dir=$(mktemp -d /tmp/stasis-agent-big.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 65536) || { fail "agent 64 GiB" "did not start: $(tail -n 5 "$dir/log")"; }
    if [[ -n $pid ]]; then
        VERIFY_TRIES=6000 round_trip "agent 64 GiB" "$pid" "$dir" && pass "agent 64 GiB process: $(agent_line "$dir/dump.txt"); $(grep -h 'time:' "$dir/dump.txt" | sed 's/^ *//'); restore $(grep -h 'time:' "$dir/restore.txt" | sed 's/^ *//')"
        keep_logs "$dir" "agent-big"
        kill_tree "$pid"
    fi
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# GPU containers under runc (Debian's, carried): a CUDA workload in a container that sees the host's programs
# and libraries and the NVIDIA device nodes (scripts/device/container-bundle.sh).
#  - runc checkpoint and restore with the stasis plugin loaded through the container's CRIU configuration;
#  - the same with the workload started by `stasis run` (the plugin then takes the driver path for it);
#  - `stasis dump --container` and `stasis restore` of the same container (the driver path, or the agent's
#    under `stasis run`, reached in the container's network namespace), verified after the restore.
section_container() {
    mkdir -p /opt/runc && for f in .device/runc-debs/*.deb; do dpkg -x "$f" /opt/runc; done
    local runclibs=/opt/runc/usr/lib/x86_64-linux-gnu:/opt/runc/lib/x86_64-linux-gnu
    local runc="env LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs PATH=/opt/stasis/bin:$PATH /opt/runc/usr/sbin/runc"
    $runc --version | head -n 1
    local label launcher way
    for label in plain agent; do
        launcher=""; [[ $label == agent ]] && launcher="/opt/stasis/bin/stasis run --"
        # Each way on a container of its own, stasis's first.
        for way in stasis runc; do
            local dir; dir=$(mktemp -d /tmp/stasis-container-$label-$way.XXXXXX)
            local id=stasis-gpu-$label-$way
            scripts/device/container-bundle.sh "$dir/bundle" "$dir/data" /opt/stasis/criu-plugins -- \
                $launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir/data" --mem 1024 >"$dir/bundle.txt" 2>&1
            if ! $runc --log "$dir/runc.log" run -d --bundle "$dir/bundle" $id </dev/null >/dev/null 2>&1; then
                fail "runc container ($label, $way)" "did not start: $(tail -n 3 "$dir/runc.log") $(cat "$dir/bundle.txt")"; continue
            fi
            for _ in $(seq 600); do [[ -e $dir/data/ready ]] && break; sleep 0.1; done
            local pid; pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
            local before; before=$(verify "$pid" "$dir/data")
            if [[ $way == runc && $label == agent ]]; then
                # The plugin refuses a process under `stasis run` (the driver's restore of one failed here):
                # runc's checkpoint fails and the container runs on.
                if ! STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" checkpoint --image-path "$dir/img" --work-path "$dir/work" $id >"$dir/ckpt.txt" 2>&1 \
                    && grep -q 'stasis run' "$dir/plugin.log" && [[ $(verify "$pid" "$dir/data") == PASS* ]]; then
                    pass "runc checkpoint of a GPU container under stasis run refused by the plugin; the container runs on"
                else
                    fail "runc GPU container (agent)" "not refused, or the container did not run on: $(tail -n 3 "$dir/plugin.log" 2>/dev/null | tr '\n' ' ')"
                fi
                cp "$dir/plugin.log" "$LOGS/container-$label-plugin.txt" 2>/dev/null
            elif [[ $way == runc ]]; then
                # runc and CRIU with the stasis plugin, which logs its helper's steps to plugin.log.
                if [[ $before == PASS* ]] && STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" checkpoint --image-path "$dir/img" --work-path "$dir/work" $id >"$dir/ckpt.txt" 2>&1 \
                    && STASIS_CUDA_PLUGIN_LOG=$dir/plugin.log $runc --log "$dir/runc.log" restore -d --image-path "$dir/img" --work-path "$dir/work2" --bundle "$dir/bundle" $id </dev/null >/dev/null 2>&1; then
                    pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
                    local verdict; verdict=$(verify "$pid" "$dir/data")
                    [[ $verdict == PASS* ]] && pass "runc checkpoint + restore of a GPU container with the stasis plugin ($label): $verdict; $(grep -c 'stasis_cuda' "$dir/work/dump.log") plugin lines in CRIU's log" \
                        || fail "runc GPU container ($label)" "after restore: $verdict; plugin: $(tail -n 4 "$dir/plugin.log" 2>/dev/null | tr '\n' ' ')"
                else
                    fail "runc GPU container ($label)" "before: $before; $(tail -n 3 "$dir/runc.log"); $(grep -h Error "$dir"/work*/*.log 2>/dev/null | tail -n 4)"
                fi
                cp "$dir/plugin.log" "$LOGS/container-$label-plugin.txt" 2>/dev/null
            else
                # stasis through runc: the GPU steps find the container's processes under their new PIDs.
                if [[ $before == PASS* ]] && PATH=/opt/runc/usr/sbin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs $STASIS dump --container $id -D "$dir/ckpt" >"$dir/sdump.txt" 2>&1 \
                    && PATH=/opt/runc/usr/sbin:$PATH LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$runclibs $STASIS restore -D "$dir/ckpt" >"$dir/srestore.txt" 2>&1; then
                    pid=$($runc state $id | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
                    local verdict2; verdict2=$(verify "$pid" "$dir/data")
                    [[ $verdict2 == PASS* ]] && pass "stasis dump --container + restore of a GPU container ($label): $verdict2; $(agent_line "$dir/sdump.txt") $(grep -h 'gpu:' "$dir/sdump.txt" | sed 's/^ *//')" \
                        || fail "stasis GPU container ($label)" "after restore: $verdict2"
                else
                    fail "stasis GPU container ($label)" "before: $before; $(tail -n 4 "$dir/sdump.txt" "$dir/srestore.txt" 2>/dev/null)"
                fi
                cp "$dir/sdump.txt" "$LOGS/container-$label-sdump.txt" 2>/dev/null; cp "$dir/srestore.txt" "$LOGS/container-$label-srestore.txt" 2>/dev/null
            fi
            cp "$dir"/work*/*.log "$LOGS/" 2>/dev/null
            $runc kill $id KILL >/dev/null 2>&1; sleep 0.5; $runc delete -f $id >/dev/null 2>&1
        done
    done
}

# Several GPUs (issue 8; needs a machine with two, the nvidia-h200-x2 kind). Each run pauses at step 15,
# is dumped (its tree gone), restored, told to go on, and its 30 losses must equal a reference run's.
#  - two_gpu_train.py: one process, a model split over cuda:0 and cuda:1 with copies between them: through
#    the driver, restored with the GPUs swapped (--gpu-map 0=1,1=0), and under `stasis run`;
#  - ddp_bert_train.py: two processes, data-parallel BERT-base over NCCL: through the driver and under
#    `stasis run` (a refusal is recorded with its words: which part of NCCL's state the driver or the agent
#    will not take);
#  - the time to checkpoint and restore two GPUs at once against one (bert_train.py on one GPU).
# Where the uninterrupted run of SCRIPT with ARGS keeps its losses: one per script and arguments (a
# launcher's environment changes no result).
multi_gpu_reference() {  # SCRIPT [SCRIPT ARGS...]
    local script=$1; shift
    echo "/tmp/stasis-multi-ref-$(basename "$script" .py)-$(echo "$*" | md5sum | cut -c1-8)"
}

multi_gpu_case() {  # LABEL SCRIPT LAUNCHER RESTORE_ARGS [SCRIPT ARGS...]
    local label=$1 script=$2 launcher=$3 restore_args=$4; shift 4
    local ref; ref=$(multi_gpu_reference "$script" "$@")
    if [[ ! -s $ref/losses.txt ]]; then
        mkdir -p "$ref"
        timeout 240 python3 "$script" --dir "$ref" --steps 30 "$@" >"$ref/out.txt" 2>&1 || { fail "$label reference" "$(tail -n 3 "$ref/out.txt")"; return; }
    fi
    local run; run=$(mktemp -d /tmp/stasis-multi.XXXXXX)
    local pid; pid=$($launcher python3 "$script" --dir "$run" --steps 30 --pause-at 15 --daemon "$@") || { fail "$label" "did not start: $(tail -n 5 "$run/log")"; return; }
    local pids; pids=$(tree_pids "$pid")
    # Evidence for what the driver maps per GPU (managed-memory detection) and the job's TCP sockets.
    for p in $pids; do record_maps "multi-$label-$p" "$p" >/dev/null; done
    ss -tanpe >"$run/sockets-before.txt" 2>&1
    if $STASIS dump "$pid" -D "$run/ckpt" --tcp-established >"$run/dump.txt" 2>&1 && wait_gone "$pid" \
        && $STASIS restore -D "$run/ckpt" $restore_args >"$run/restore.txt" 2>&1; then
        touch "$run/go"
        for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
        if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
            pass "$label: 30 losses identical; $(grep -h 'gpu:' "$run/dump.txt" | sed 's/^ *//'); $(agent_line "$run/dump.txt"); dump $(grep -h 'time:' "$run/dump.txt" | sed 's/^ *//'); restore $(grep -h 'time:' "$run/restore.txt" | sed 's/^ *//')"
        else
            fail "$label" "losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' '); $(tail -n 3 "$run/log")"
        fi
    else
        fail "$label" "$(tail -n 6 "$run"/dump.txt "$run"/restore.txt 2>/dev/null | tr '\n' ' ')"
        ss -tanpe >"$run/sockets-after.txt" 2>&1
        for log in $(grep -ho 'full log: [^ ]*' "$run"/dump.txt "$run"/restore.txt 2>/dev/null | cut -d' ' -f3); do
            cp "$log" "$run/criu-$(basename "$(dirname "$log")").txt" 2>/dev/null
        done
    fi
    keep_logs "$run" "multi-$label"
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    [[ -e /proc/$pid ]] && kill_tree "$pid"
    rm -rf "$run/ckpt"
}

# A job stasis must refuse before touching it (WHY: words the refusal must contain): the dump fails, and the
# job, told to go on, still trains to the reference's 30 losses: nothing lost.
multi_gpu_refused() {  # LABEL WHY SCRIPT LAUNCHER [SCRIPT ARGS...]
    local label=$1 why=$2 script=$3 launcher=$4; shift 4
    local ref; ref=$(multi_gpu_reference "$script" "$@")
    local run; run=$(mktemp -d /tmp/stasis-multi.XXXXXX)
    local pid; pid=$($launcher python3 "$script" --dir "$run" --steps 30 --pause-at 15 --daemon "$@") || { fail "$label" "did not start: $(tail -n 5 "$run/log")"; return; }
    local pids; pids=$(tree_pids "$pid")
    # Evidence: what of NCCL each process maps (the sign stasis looks for without the agents).
    for p in $pids; do echo "$p: $(grep -i nccl /proc/$p/maps 2>/dev/null | awk '{print $6}' | sort -u | tr '\n' ' ')"; done >"$run/nccl-maps.txt"
    if $STASIS dump "$pid" -D "$run/ckpt" --tcp-established >"$run/dump.txt" 2>&1; then
        fail "$label" "the dump was not refused; NCCL mapped: $(cut -c1-300 "$run/nccl-maps.txt" | tr '\n' ';')"
    elif ! grep -q "$why" "$run/dump.txt"; then
        fail "$label" "refused, but not for '$why': $(tail -n 3 "$run/dump.txt" | tr '\n' ' ')"
    else
        touch "$run/go"
        for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
        # Without a reference run (a short device call), the job must still reach its 30th step.
        local same; if [[ -s $ref/losses.txt ]]; then cmp -s "$ref/losses.txt" "$run/losses.txt" && same=1; else [[ $(wc -l <"$run/losses.txt") == 30 ]] && same=1; fi
        if [[ -n ${same:-} ]] && [[ ! -e $run/ckpt ]]; then
            pass "$label: refused before anything was touched ($(grep -h 'error:' "$run/dump.txt" | cut -c1-220)); the job went on to 30 identical losses"
        else
            fail "$label" "refused, but the job did not go on as before: $(diff "$ref/losses.txt" "$run/losses.txt" 2>&1 | head -n 3 | tr '\n' ' ')"
        fi
    fi
    keep_logs "$run" "multi-$label"
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
}

section_multigpu() {
    local STASIS="timeout 200 /opt/stasis/bin/stasis"
    local gpus; gpus=$(nvidia-smi -L | wc -l)
    if (( gpus < 2 )); then fail "multigpu" "needs two GPUs, this machine has $gpus"; return; fi
    export STASIS_STORE=/dev/shm/stasis-multi-store
    rm -rf $STASIS_STORE
    multi_gpu_case "two GPUs, one process" Workloads/torch/two_gpu_train.py "" ""
    multi_gpu_case "two GPUs, one process, restored with the GPUs swapped" Workloads/torch/two_gpu_train.py "" "--gpu-map 0=1,1=0"
    multi_gpu_case "two GPUs, one process, under stasis run" Workloads/torch/two_gpu_train.py "$RUN" ""
    # The same state on one GPU, for the comparison of one GPU against two.
    multi_gpu_case "the split model on one GPU, under stasis run (for the comparison)" Workloads/torch/two_gpu_train.py "$RUN" "" --devices cuda:0,cuda:0
    # NCCL's peer-to-peer transport shares device memory between the ranks; driver 580 checkpoints it but
    # cannot restore it (CUDA_ERROR_NOT_SUPPORTED, seen here): refused up front, by stasis or by the agents.
    # Without it (NCCL_P2P_DISABLE=1, and NCCL_CUMEM_ENABLE=0 for host buffers the driver allocates) what passes between the GPUs is host memory, and the job checkpoints.
    multi_gpu_case "NCCL data-parallel BERT-base, two processes, no P2P" Workloads/torch/ddp_bert_train.py \
        "env NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0" "" --gpus 2
    multi_gpu_case "NCCL data-parallel BERT-base, two processes, no P2P, under stasis run" Workloads/torch/ddp_bert_train.py \
        "env NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0 $RUN" "" --gpus 2
    multi_gpu_refused "NCCL with P2P refused" "peer-to-peer" Workloads/torch/ddp_bert_train.py "" --gpus 2
    multi_gpu_refused "NCCL with P2P under stasis run refused by the agents" "NCCL P2P" Workloads/torch/ddp_bert_train.py "$RUN" --gpus 2
    # Two GPUs at once against one: BERT-base on one GPU, then the two-process job (the same model per GPU).
    multi_gpu_case "one GPU, BERT-base (for the comparison)" Workloads/torch/bert_train.py "$RUN" "" --size base
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# Live migration (issue 7) between two hosts on this machine: the root namespaces and a receiver in a
# network namespace joined by a veth pair, with a PID namespace of its own. BERT-base, paused at step 15, is
# moved by `stasis migrate` (through the driver, and under `stasis run` with the agent), told to go on there,
# and its 30 losses must equal an uninterrupted run's. Then bench/migrate.sh bert: the same against CRIU's
# page-server, with downtime and bytes.
ensure_ip() {
    command -v ip >/dev/null || { mkdir -p /opt/iproute && cp -r .device/iproute/. /opt/iproute/ \
        && printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/iproute/lib exec /opt/iproute/ip "$@"\n' >/opt/stasis/bin/ip && chmod +x /opt/stasis/bin/ip; }
}

# Only the driver path's refusal of NCCL with P2P (section multigpu has it among the rest).
section_ncclrefuse() {
    multi_gpu_refused "NCCL with P2P refused" "peer-to-peer" Workloads/torch/ddp_bert_train.py "" --gpus 2
}

# Only bench/migrate.sh bert (section migrate runs it after its tests).
section_migratebench() {
    ensure_ip
    STASIS=/opt/stasis/bin/stasis WORKLOAD=/opt/stasis/bin/stasis-workload PLUGINS=/opt/stasis/criu-plugins \
        timeout 300 bench/migrate.sh bert 2>&1 | tee "$OUT/migrate-bench.txt"
}

section_migrate() {
    ensure_ip
    local ns=stasis-dev-migrate here=10.251.0.1 there=10.251.0.2
    ip netns add $ns && ip link add sdm0 type veth peer name sdm1 && ip link set sdm1 netns $ns \
        && ip addr add $here/24 dev sdm0 && ip link set sdm0 up && ip -n $ns addr add $there/24 dev sdm1 \
        && ip -n $ns link set sdm1 up && ip -n $ns link set lo up || { fail "migrate" "cannot make the network namespaces: $(ip -V 2>&1)"; return; }
    local token=/tmp/stasis-migrate-token
    head -c 32 /dev/urandom | base64 >$token && chmod 600 $token
    local ref; ref=$(bert_reference base "") || { fail "migrate reference run" "did not finish"; return; }
    local label launcher
    for label in driver agent; do
        launcher=""; [[ $label == agent ]] && launcher=$RUN
        local run; run=$(mktemp -d /tmp/stasis-migrate-$label.XXXXXX)
        rm -rf /dev/shm/stasis-mig-there /dev/shm/stasis-mig-here
        ip netns exec $ns unshare --pid --fork --kill-child --mount-proc sh -c \
            "/opt/stasis/bin/stasis serve --listen $there:7070 --token-file $token --store /dev/shm/stasis-mig-there --directory /dev/shm/stasis-mig-received >$run/serve.txt 2>&1; sleep 100000" &
        local receiver=$!
        sleep 1
        local pid; pid=$($launcher python3 Workloads/torch/bert_train.py --dir "$run" --size base --steps 30 --pause-at 15 --daemon) \
            || { fail "migrate ($label)" "did not start: $(tail -n 5 "$run/log")"; kill -9 $receiver; continue; }
        if $STASIS migrate "$pid" --to $there:7070 --token-file $token --store /dev/shm/stasis-mig-here >"$run/migrate.txt" 2>&1 && wait_gone "$pid"; then
            touch "$run/go"
            for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
            if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
                pass "migrate BERT-base ($label) to another network and PID namespace: 30 losses identical; $(sed 's/^ *//' "$run/migrate.txt" | tr '\n' ' ')"
            else
                fail "migrate ($label)" "losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' '); $(tail -n 3 "$run/log")"
            fi
        else
            fail "migrate ($label)" "$(tail -n 6 "$run/migrate.txt" | tr '\n' ' '); receiver: $(tail -n 3 "$run/serve.txt" | tr '\n' ' ')"
            [[ -e /proc/$pid ]] && kill_tree "$pid"
        fi
        cp "$run/migrate.txt" "$LOGS/migrate-$label.txt" 2>/dev/null; cp "$run/serve.txt" "$LOGS/migrate-$label-serve.txt" 2>/dev/null
        kill -9 $receiver 2>/dev/null; wait $receiver 2>/dev/null
    done
    ip link del sdm0 2>/dev/null; ip netns del $ns 2>/dev/null
    rm -rf /dev/shm/stasis-mig-*
    STASIS=/opt/stasis/bin/stasis WORKLOAD=/opt/stasis/bin/stasis-workload PLUGINS=/opt/stasis/criu-plugins \
        timeout 300 bench/migrate.sh bert 2>&1 | tee "$OUT/migrate-bench.txt"
}

# Not a test: the baseline-against-stasis benchmark (bench/gpu-dump-restore.sh), when asked for by name.
section_bench() {
    STASIS=/opt/stasis/bin/stasis bench/gpu-dump-restore.sh 2>&1 | tee "$OUT/bench.txt"
}

# Not a test: the agent's benchmark (bench/agent-dump-restore.sh), when asked for by name.
section_agentbench() {
    STASIS=/opt/stasis/bin/stasis bench/agent-dump-restore.sh speed 2>&1 | tee "$OUT/agentbench.txt"
}
section_agentcost() {
    STASIS=/opt/stasis/bin/stasis bench/agent-dump-restore.sh ${AGENTCOST_PARTS:-memory overhead} 2>&1 | tee "$OUT/agentcost.txt"
}

# Not a test: the chunk store's throughput on this machine's cores with a BERT-large checkpoint
# (bench/store-device.sh), when asked for by name.
section_storebench() {
    xz -dc .device/stasis-store-bench.xz >/opt/stasis/bin/stasis-store-bench && chmod +x /opt/stasis/bin/stasis-store-bench
    OUT=$OUT bench/store-device.sh 2>&1 | tee "$OUT/storebench.txt"
}

setup
for section in "${SECTIONS[@]}"; do
    echo "== $section"
    started=$SECONDS
    "section_$section"
    echo "== $section took $((SECONDS - started)) s"
done

echo
echo "== summary"
printf '%s\n' "${results[@]}" | tee "$OUT/summary.txt"
passed=$(printf '%s\n' "${results[@]}" | grep -c '^PASS')
failed=$(printf '%s\n' "${results[@]}" | grep -c '^FAIL')
echo "$passed passed, $failed failed" | tee -a "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
[[ $failed -eq 0 ]]
