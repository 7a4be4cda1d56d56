#!/usr/bin/env bash
# The agent's fast path against the driver path and the baseline, in one run on the GPU machine, after
# scripts/device/lib.sh's setup (run by `scripts/device-bench.sh agentbench`).
#
#   1. Checkpoint and restore, images and store on /dev/shm, of a 32 GiB cuda-workload and of BERT-large
#      training paused mid-run, three ways on the same process: the baseline (the driver's checkpoint API +
#      plain CRIU, as CRIU's cuda plugin does it), stasis through the driver alone, and stasis with the agent
#      (the process started by `stasis run`). For the agent: evacuation and refill throughput.
#   2. Peak extra host memory during a checkpoint written to disk (the store on /var/tmp): the rise of
#      MemTotal - MemAvailable, sampled every 20 ms, for the agent and for stasis's driver path.
#   3. The agent's steady-state overhead: BERT-base training step time, cudaMalloc/cudaFree latency and an
#      inference request, each with and without the agent.
#
#   5. (ring) The staging ring's size: 32 GiB under the agent with a ring of 64 MiB (the default) and of 256 MiB.
#   6. (link) Issue 29: 32 GiB under the agent with a ring of 64 MiB and the store's reserve of
#      blank chunk files (`stasis reserve`), and with an arena (`stasis run --arena`: the evacuation copies by
#      DMA into pinned pieces the store takes), each restore verified; BERT-large likewise.
#   4. The stall of a --leave-running checkpoint of BERT-large into a store on the local disk (/var/tmp): how
#      long the job was held, against the time until the checkpoint was durable and published.
#
#   bench/agent-dump-restore.sh [speed] [memory] [overhead] [interleaved] [leave] [ring] [link]
#       (default: speed memory overhead; speed fits one device call, memory and overhead another;
#        interleaved: the training step, three runs with and three without the agent, taking turns)
#     speed: part 1, plus a 64 GiB cuda-workload under the agent, restored and verified
# Prints markdown tables.
set -uo pipefail
PARTS=" ${*:-speed memory overhead} "
cd "$(dirname "$0")/.."
STASIS=${STASIS:-/opt/stasis/bin/stasis}
RUN="$STASIS run --"
CKPT=/opt/stasis/bin/cuda-ckpt
gcc -O2 -ISources/CStasisCUDA/include -o $CKPT bench/cuda-ckpt.c Sources/CStasisCUDA/cuda_steps.c || exit 1
nvcc -O2 -o /opt/stasis/bin/alloc-latency bench/alloc-latency.cu || exit 1
IMG=/dev/shm/stasis-agentbench
now() { date +%s.%N; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
add() { awk -v a="$1" -v b="$2" -v c="${3:-0}" 'BEGIN { printf "%.2f", a + b + c }'; }
wait_gone() { for _ in $(seq 1000); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; return 1; }
json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))' "$@"; }
# used_gib: MemTotal - MemAvailable, the memory nothing can reclaim, in GiB.
used_kib() { awk '/MemTotal/ { t = $2 } /MemAvailable/ { a = $2 } END { print t - a }' /proc/meminfo; }
# Runs a command while sampling used memory; writes the peak rise in GiB to /tmp/agentbench-peak.
peak_rise() {
    local before; before=$(used_kib)
    "$@" & local job=$!
    local top=$before
    while kill -0 $job 2>/dev/null; do local u; u=$(used_kib); (( u > top )) && top=$u; sleep 0.02; done
    wait $job; local rc=$?
    awk -v a="$top" -v b="$before" 'BEGIN { printf "%.2f", (a - b) / 1048576 }' >/tmp/agentbench-peak
    return $rc
}

rows=()
baseline() {  # NAME PID
    local name=$1 pid=$2 t
    rm -rf $IMG; mkdir -p $IMG
    t=$(now); $CKPT lock "$pid" && $CKPT checkpoint "$pid" || return 1; local ck; ck=$(since "$t")
    t=$(now); criu dump -t "$pid" -D $IMG -v4 -o dump.log 2>/dev/null || { tail -n 5 $IMG/dump.log; return 1; }; local dump; dump=$(since "$t")
    wait_gone "$pid"
    t=$(now); criu restore -D $IMG -d -v4 -o restore.log 2>/dev/null || { tail -n 5 $IMG/restore.log; return 1; }; local rst; rst=$(since "$t")
    t=$(now); $CKPT restore "$pid" && $CKPT unlock "$pid" || return 1; local drst; drst=$(since "$t")
    rows+=("| $name | baseline (driver + CRIU) | $(add $ck $dump) | lock+checkpoint $ck, CRIU $dump | $(add $rst $drst) | CRIU $rst, driver $drst | | |")
    rm -rf $IMG
}
# The peer to beat: CRIU 4.2 with its own cuda plugin, which runs NVIDIA's cuda-checkpoint (lock and checkpoint
# inside the dump, restore and unlock inside the restore). Skipped where the device pack carried no plugin.
criu_cuda_plugin() {  # NAME PID
    local name=$1 pid=$2 t plugin=/opt/criu-cuda-plugin
    [[ -f $plugin/cuda_plugin.so ]] || return 0
    rm -rf $IMG; mkdir -p $IMG
    t=$(now); criu dump -t "$pid" -D $IMG -L $plugin -v4 -o dump.log 2>/dev/null || { tail -n 5 $IMG/dump.log; return 1; }; local dump; dump=$(since "$t")
    wait_gone "$pid"
    t=$(now); criu restore -D $IMG -d -L $plugin -v4 -o restore.log 2>/dev/null || { tail -n 5 $IMG/restore.log; return 1; }; local rst; rst=$(since "$t")
    rows+=("| $name | CRIU 4.2 + its cuda plugin + cuda-checkpoint | $dump | one criu dump | $rst | one criu restore | | |")
    rm -rf $IMG
}
stasis_path() {  # NAME PID LABEL
    local name=$1 pid=$2 label=$3
    export STASIS_STORE=/dev/shm/stasis-agentbench-store
    # KEEP_STORE=1: the store was made before the program started (an arena lives in it).
    [[ -n ${KEEP_STORE:-} ]] || rm -rf $STASIS_STORE
    rm -rf $IMG
    # RESERVE=SIZE: the store keeps SIZE of blank chunk files first (`stasis reserve`), timed apart.
    if [[ -n ${RESERVE:-} ]]; then
        local t; t=$(now)
        $STASIS reserve "$RESERVE" >/dev/null || return 1
        label="$label (reserve of $RESERVE made in $(since "$t") s before)"
    fi
    $STASIS dump "$pid" -D $IMG --json >/tmp/agentbench-dump.json || return 1
    wait_gone "$pid"
    $STASIS restore -D $IMG --json >/tmp/agentbench-restore.json || return 1
    local d=/tmp/agentbench-dump.json r=/tmp/agentbench-restore.json evac="" refill=""
    local agent; agent=$(json $d "len([p for p in gpu['processes'] if p.get('agent')])")
    if [[ $agent != 0 ]]; then
        evac=$(json $d "(lambda a: '%.1f GB/s (%.1f GiB in %.2f s, %.1f cores, %s)' % (sum(p['evacuatedBytes'] for p in a) / 1e9 / max(1e-9, sum(p['evacuateSeconds'] for p in a)), sum(p['evacuatedBytes'] for p in a) / 2**30, sum(p['evacuateSeconds'] for p in a), sum(p.get('evacuateCPUSeconds', 0) for p in a) / max(1e-9, sum(p['evacuateSeconds'] for p in a)), ('%d chunks from arena pieces' % sum(p.get('arenaChunks', 0) for p in a)) if any(p.get('arenaChunks') for p in a) else 'ring mapped' if all(p.get('ringMapped') for p in a) else 'ring copied'))([p['agent'] for p in gpu['processes'] if p.get('agent')])")
        refill=$(EVAC_BYTES=$(json $d "sum(p['agent']['evacuatedBytes'] for p in gpu['processes'] if p.get('agent'))") json $r "'%.1f GB/s (%.2f s%s%s)' % (float(__import__('os').environ['EVAC_BYTES']) / 1e9 / max(1e-9, deviceSteps.get('refill', 0)), deviceSteps.get('refill', 0), ', %.1f cores' % (deviceSteps['refill cpu'] / max(1e-9, deviceSteps['refill'])) if 'refill cpu' in deviceSteps else '', ', of which GPU check %.2f s' % deviceSteps['gpu check'] if 'gpu check' in deviceSteps else '')")
    fi
    rows+=("| $name | $label | $(json $d "'%.2f' % timings['total']") | devices $(json $d "'%.2f' % timings['devices']") (driver lock $(json $d "'%.2f' % gpu['lockSeconds']"), checkpoint $(json $d "'%.2f' % gpu['checkpointSeconds']")), CRIU $(json $d "'%.2f' % timings['criu']") | $(json $r "'%.2f' % timings['total']") | CRIU $(json $r "'%.2f' % timings['criu']"), devices $(json $r "'%.2f' % timings['devices']") | $evac | $refill |")
    rm -rf $IMG $STASIS_STORE
    unset STASIS_STORE
}

# The rows stasis_path, baseline and criu_cuda_plugin collected, as a table.
speed_table() {
    echo "| workload | path | checkpoint (s) | of which | restore (s) | of which | evacuation | refill |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
}

# WARM_GIB=N: write and delete N GiB on /dev/shm first. These machines are fresh VMs, and memory the guest has
# not touched yet is 2-3x slower to write (docs/BENCHMARKS.md); warming puts every path on touched memory.
if (( ${WARM_GIB:-0} > 0 )); then
    echo "== warming $WARM_GIB GiB of memory"
    dd if=/dev/zero of=/dev/shm/stasis-warm bs=1M count=$((WARM_GIB * 1024)) status=none; rm -f /dev/shm/stasis-warm
fi

if [[ $PARTS == *" speed "* ]]; then
echo "== 1. checkpoint and restore, /dev/shm"
for workload in buffers bert; do
    # agentcopy: the agent with its ring in the driver's pinned memory, which stasis copies out and in with
    # process_vm_readv/writev (two CPU copies a byte, as before the shared ring), to compare with one.
    for run in plain agent agentcopy; do
        dir=$(mktemp -d)
        launcher=""; [[ $run == agent ]] && launcher=$RUN; [[ $run == agentcopy ]] && launcher="env STASIS_AGENT_SHARED_RING=off $RUN"
        if [[ $workload == buffers ]]; then
            name="buffers 32 GiB"
            pid=$($launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 32768)
        else
            name="BERT-large training"
            pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$dir" --size large --steps 8 --pause-at 4 --daemon)
        fi
        if [[ $run == plain ]]; then
            baseline "$name" "$pid" || echo "baseline failed for $name"
            criu_cuda_plugin "$name" "$pid" || echo "CRIU's cuda plugin failed for $name"
            stasis_path "$name" "$pid" "stasis, driver path" || echo "stasis driver path failed for $name"
        elif [[ $run == agent ]]; then
            stasis_path "$name" "$pid" "stasis with the agent" || echo "stasis agent failed for $name"
        else
            stasis_path "$name" "$pid" "stasis with the agent, ring copied (process_vm_readv)" || echo "stasis agent (ring copied) failed for $name"
        fi
        kill -9 "$pid" 2>/dev/null; wait_gone "$pid"
    done
done
# 64 GiB under the agent, verified after the restore (the workload compares it all on the host: a minute).
# AGENT_BIG=0 skips it.
if [[ ${AGENT_BIG:-1} == 1 ]]; then
dir=$(mktemp -d)
pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 65536)
stasis_path "buffers 64 GiB" "$pid" "stasis with the agent" || echo "stasis agent failed for 64 GiB"
rm -f "$dir/result"; kill -USR1 "$pid"
for _ in $(seq 3000); do [[ -e $dir/result ]] && break; sleep 0.1; done
echo "buffers 64 GiB after the agent's restore: $(cat "$dir/result" 2>/dev/null || echo "FAIL no answer in 300 s")"
kill -9 "$pid" 2>/dev/null; wait_gone "$pid"
fi
speed_table
fi

if [[ $PARTS == *" memory "* ]]; then
echo "== 2. peak extra host memory, checkpoint of BERT-large to a store on disk"
mem_rows=()
for run in plain agent; do
    dir=$(mktemp -d); launcher=""; [[ $run == agent ]] && launcher=$RUN
    pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$dir" --size large --steps 8 --pause-at 4 --daemon)
    export STASIS_STORE=/var/tmp/stasis-agentbench-store; rm -rf $STASIS_STORE /var/tmp/agentbench-ckpt
    t=$(now)
    if peak_rise $STASIS dump "$pid" -D /var/tmp/agentbench-ckpt >/tmp/agentbench-diskdump.txt 2>&1; then
        mem_rows+=("| BERT-large, store on disk | $([[ $run == agent ]] && echo "stasis with the agent" || echo "stasis, driver path") | $(cat /tmp/agentbench-peak) GiB | $(since "$t") s |")
    else
        echo "disk dump failed ($run): $(tail -n 3 /tmp/agentbench-diskdump.txt)"
    fi
    kill -9 "$pid" 2>/dev/null; wait_gone "$pid"
    rm -rf $STASIS_STORE /var/tmp/agentbench-ckpt; unset STASIS_STORE
done
echo "| workload | path | peak rise of MemTotal - MemAvailable | checkpoint (s) |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${mem_rows[@]}"

fi

if [[ $PARTS == *" overhead "* ]]; then
echo "== 3. steady-state overhead"
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Training steps four ways, to tell the gate from the VMM backing: without the agent; with it; with it but
# cuMemAlloc left to the driver (the gate alone); loaded but switched off (STASIS_AGENT=off: a pass-through).
declare -A step infer
for run in plain agent nobacking off; do
    dir=$(mktemp -d)
    case $run in
        plain) launcher="" ;;
        agent) launcher="env STASIS_AGENT_LOG=1 $STASIS run --" ;;
        nobacking) launcher="$STASIS run --no-backing --" ;;
        off) launcher="env STASIS_AGENT=off $STASIS run --" ;;
    esac
    CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$dir" --size base --steps 60 >"$dir/out.txt" 2>&1
    step[$run]=$(awk -F'\t' '$1 > 10 { print $2 * 1000 }' "$dir/step-times.txt" | median)
    echo "steps ($run): $(awk -F'\t' '$1 > 10 { printf "%.1f ", $2 * 1000 }' "$dir/step-times.txt")"
    grep -h "stasis-agent" "$dir/out.txt" | tail -n 2
done
for run in plain agent; do
    launcher=""; [[ $run == agent ]] && launcher=$RUN
    $launcher /opt/stasis/bin/alloc-latency >"/tmp/alloc-$run.txt"
    srv=$(mktemp -d)
    pid=$($launcher python3 Workloads/torch/infer_server.py serve --dir "$srv" --daemon)
    for i in $(seq 30); do python3 Workloads/torch/infer_server.py ask --dir "$srv" --name "r$i" --tokens "101 7592 2088 1010 2129 2024 2017 102" >/dev/null; done
    infer[$run]=$(grep -o 'answered r[0-9]* in [0-9.]* ms' "$srv/log" | awk '{ print $4 }' | median)
    kill -9 "$pid"; wait_gone "$pid"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a / b }'; }
echo "| measure | without the agent | with the agent | ratio |"
echo "| --- | --- | --- | --- |"
echo "| BERT-base training step, median of steps 11-60 (ms) | ${step[plain]} | ${step[agent]} | $(ratio "${step[agent]}" "${step[plain]}") |"
echo "| same, agent with --no-backing (the gate alone) | ${step[plain]} | ${step[nobacking]} | $(ratio "${step[nobacking]}" "${step[plain]}") |"
echo "| same, agent loaded but STASIS_AGENT=off | ${step[plain]} | ${step[off]} | $(ratio "${step[off]}" "${step[plain]}") |"
echo "| inference request, BERT encoder, median of 30 (ms) | ${infer[plain]} | ${infer[agent]} | $(ratio "${infer[agent]}" "${infer[plain]}") |"
paste /tmp/alloc-plain.txt /tmp/alloc-agent.txt | while IFS=$'\t' read -r size m1 f1 _ m2 f2; do
    echo "| cudaMalloc + cudaFree of $size bytes, median (us) | $m1 + $f1 | $m2 + $f2 | $(awk -v a="$m2" -v b="$f2" -v c="$m1" -v d="$f1" 'BEGIN { printf "%.2f", (a + b) / (c + d) }') |"
done
# The GPU's side of the backing, in one process with both kinds of memory (no agent), kernels taking turns.
echo "| kernel | on the driver's cudaMalloc memory | on VMM memory, as the agent backs it | ratio |"
echo "| --- | --- | --- | --- |"
nvcc -O2 -o /opt/stasis/bin/vmm-kernel bench/vmm-kernel.cu -lcuda && /opt/stasis/bin/vmm-kernel
fi

if [[ $PARTS == *" leave "* ]]; then
echo "== 4. --leave-running checkpoint of BERT-large into a store on the local disk"
leave_rows=()
for run in plain agent; do
    dir=$(mktemp -d); launcher=""; [[ $run == agent ]] && launcher=$RUN
    label="stasis, driver path"; [[ $run == agent ]] && label="stasis with the agent"
    pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$dir" --size large --steps 8 --pause-at 4 --daemon)
    store=/var/tmp/stasis-leave-store; rm -rf $store /var/tmp/stasis-leave-ckpt
    sync
    if $STASIS dump "$pid" -D /var/tmp/stasis-leave-ckpt --store $store --leave-running --json >/tmp/agentbench-leave.json 2>/tmp/agentbench-leave.err; then
        d=/tmp/agentbench-leave.json
        leave_rows+=("| BERT-large, store on disk | $label | $(json $d "'%.2f' % timings['stalled']") | $(json $d "'%.2f' % timings['total']") | devices $(json $d "'%.2f' % timings['devices']"), CRIU $(json $d "'%.2f' % timings['criu']") (frozen $(json $d "'%.2f' % timings['frozen']")), chunking tail $(json $d "'%.2f' % timings['hash']"), sync $(json $d "'%.2f' % timings['sync']") | $(json $d "'%.2f GiB' % (store['plainBytes'] / 2**30)") |")
    else
        echo "leave-running dump failed ($run): $(tail -n 3 /tmp/agentbench-leave.err)"
    fi
    touch "$dir/go"
    for _ in $(seq 600); do [[ -e $dir/done ]] && break; sleep 0.1; done
    [[ -e $dir/done ]] && echo "$label: the job finished its steps after the checkpoint" || echo "$label: the job did not finish after the checkpoint"
    kill -9 "$pid" 2>/dev/null; wait_gone "$pid"
    rm -rf $store /var/tmp/stasis-leave-ckpt "$dir"
done
echo "| workload | path | job stalled (s) | durable and published (s) | of which | checkpoint size |"
echo "| --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${leave_rows[@]}"
fi

if [[ $PARTS == *" ring "* ]]; then
echo "== 5. the staging ring's size, 32 GiB under the agent, /dev/shm"
rows=()
for mib in 64 256; do
    dir=$(mktemp -d)
    pid=$($STASIS run --ring-mib $mib -- /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 32768)
    stasis_path "buffers 32 GiB" "$pid" "stasis with the agent, ring $mib MiB" || echo "ring $mib MiB failed"
    kill -9 "$pid" 2>/dev/null; wait_gone "$pid"; rm -rf "$dir"
done
speed_table
fi

if [[ $PARTS == *" link "* ]]; then
echo "== 6. the link's speed (issue 29): 32 GiB and BERT-large under the agent, store on /dev/shm"
# Every row is a process of its own (ring and arena are fixed when it starts). Each 32 GiB restore is verified
# by the workload (every buffer compared on the host). LINK_RESERVE: the reserve's size for the rows with one.
rows=()
verified=()
reserve=${LINK_RESERVE:-34G}
# An arena row: the store and its reserve first (the arena takes the reserve's blanks), then the program under
# `stasis run --arena`, then the checkpoint once the agent says its arena is pinned (its log: how long that took).
# Sets KEEP_STORE for stasis_path; ARENA_LINE: the agent's line.
arena_start() {  # SIZE RESERVE DIR
    export STASIS_STORE=/dev/shm/stasis-agentbench-store
    rm -rf $STASIS_STORE
    local t; t=$(now)
    $STASIS reserve "$2" >/dev/null || return 1
    ARENA_RESERVE_SECONDS=$(since "$t")
    export KEEP_STORE=1
}
arena_wait() {  # DIR: waits up to 180 s for the agent's arena line
    ARENA_LINE=""
    for _ in $(seq 1800); do
        ARENA_LINE=$(grep -ho 'arena: [0-9]* pieces.*\|arena: cannot.*' "$1/log" "$1/agent.log" 2>/dev/null | head -n 1)
        [[ -n $ARENA_LINE ]] && return 0
        sleep 0.1
    done
    ARENA_LINE="no arena line in 180 s"
    return 1
}
# One row: the program under `stasis run` (through its ring of MIB, or with an arena of SIZE), checkpointed and
# restored by stasis_path; WITH: the reserve's size, or - for none. Leaves the program running as PID.
link_row() {  # NAME HOW(ring|arena) MIB WITH SIZE DIR PROGRAM...
    local name=$1 how=$2 mib=$3 with=$4 size=$5 dir=$6; shift 6
    local arena=() label="agent, ring $mib MiB" overlap=on
    PID=""
    if [[ $how == arena* ]]; then
        arena_start "$size" "$with" "$dir" || { echo "$name arena row: reserve failed"; return 1; }
        arena=(--arena "$size" --store "$STASIS_STORE")
        label="agent, arena $size (reserve $with)"
        # arena-hash-first: the GPU hashes every chunk before the copies start (STASIS_AGENT_ARENA_OVERLAP=off).
        [[ $how == arena-hash-first ]] && { overlap=off; label="$label, hashed before the copies"; }
    elif [[ $with == - ]]; then
        label="$label, no reserve"
    else
        export RESERVE=$with
        label="$label, reserve"
    fi
    PID=$(STASIS_AGENT_LOG=1 STASIS_AGENT_ARENA_OVERLAP=$overlap CUBLAS_WORKSPACE_CONFIG=:4096:8 $STASIS run --ring-mib "$mib" "${arena[@]}" -- "$@" 2>"$dir/agent.log")
    grep -ho 'pinned shared staging ring.*' "$dir/agent.log" "$dir/log" 2>/dev/null | head -n 1 | sed "s/^/$name, $how: /"
    if [[ $how == arena* ]]; then
        arena_wait "$dir"
        echo "$name, arena $size (reserve $with made in $ARENA_RESERVE_SECONDS s before): $ARENA_LINE"
    fi
    stasis_path "$name" "$PID" "$label" || echo "$name, $how $with failed"
    grep -ho 'arena: dropped.*\|evacuation: .*' "$dir/log" "$dir/agent.log" 2>/dev/null | head -n 2 | sed "s/^/$name, $how $with: /"
    unset RESERVE KEEP_STORE
}
# The arena rows first, each row printed as soon as it is done: a device call cut short keeps what ran. The
# first row's reserve touches the memory the rows after it write into (these machines are fresh VMs, and memory
# the guest has not touched yet is 2-3x slower to write). The 32 GiB arena is 33 GiB: the workload's 64 MiB
# buffer is evacuated beside its 32 GiB.
for config in "buffers arena 64 $reserve" "bert arena 64 16G" "bert arena-hash-first 64 16G" "buffers ring 64 $reserve" "bert ring 64 -"; do
    read -r workload how mib with <<<"$config"
    dir=$(mktemp -d)
    if [[ $workload == buffers ]]; then
        link_row "buffers 32 GiB" "$how" "$mib" "$with" 33G "$dir" /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 32768
        rm -f "$dir/result"; kill -USR1 "$PID" 2>/dev/null
        for _ in $(seq 600); do [[ -e $dir/result ]] && break; sleep 0.1; done
        verified+=("$how, reserve $with: $(cat "$dir/result" 2>/dev/null || echo "FAIL no answer in 60 s")")
        echo "${verified[-1]}"
    else
        link_row "BERT-large training" "$how" "$mib" "$with" 12G "$dir" python3 Workloads/torch/bert_train.py --dir "$dir" --size large --steps 8 --pause-at 4 --daemon
    fi
    [[ ${#rows[@]} -gt 0 ]] && echo "${rows[-1]}"
    kill -9 "$PID" 2>/dev/null; wait_gone "$PID"; rm -rf "$dir" /dev/shm/stasis-agentbench-store
done
speed_table
fi

if [[ $PARTS == *" interleaved "* ]]; then
echo "== 3b. training step, runs with and without the agent taking turns"
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
: >/tmp/steps-plain.txt; : >/tmp/steps-agent.txt
for round in 1 2 3; do
    for run in plain agent; do
        dir=$(mktemp -d); launcher=""; [[ $run == agent ]] && launcher=$RUN
        CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$dir" --size base --steps 40 >/dev/null 2>&1
        awk -F'\t' '$1 > 10 { print $2 * 1000 }' "$dir/step-times.txt" >>"/tmp/steps-$run.txt"
        echo "round $round $run: median $(awk -F'\t' '$1 > 10 { print $2 * 1000 }' "$dir/step-times.txt" | median) ms"
    done
done
p=$(median </tmp/steps-plain.txt); a=$(median </tmp/steps-agent.txt)
echo "| BERT-base training step, median of steps 11-40 of three runs each, taking turns (ms) | $p | $a | $(awk -v a="$a" -v b="$p" 'BEGIN { printf "%.4f", a / b }') |"
fi
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $(nproc) cores; $(criu --version | head -n1)"
