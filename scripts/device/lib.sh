# The GPU suite's shared part: its environment, the verdicts, the machine's setup, the helpers every section
# uses, and the runner that checks each section's needs. Sourced by scripts/device-test.sh and
# scripts/device-bench.sh, from the repository root.
ROOT=$PWD
OUT=${OUT:-/tmp/stasis-device-out}
mkdir -p "$OUT"
LOGS=$(mktemp -d /tmp/stasis-device-logs.XXXXXX)
results=()
# Each verdict also goes to $OUT at once, so a run cut short by the device tool's time limit still reports.
pass() { echo "PASS $1"; results+=("PASS $1"); echo "PASS $1" >>"$OUT/progress.txt"; }
fail() { echo "FAIL $1: $2"; results+=("FAIL $1: $2"); echo "FAIL $1: $2" >>"$OUT/progress.txt"; }

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
    xz -dc .device/stasis-workload.xz >/opt/stasis/bin/stasis-workload && chmod +x /opt/stasis/bin/stasis-workload
    # Beside the binary, where `stasis run` finds it.
    cp .device/libstasis-agent.so /opt/stasis/bin/
    mkdir -p /opt/stasis/criu-plugins && cp .device/criu-plugins/*.so /opt/stasis/criu-plugins/
    # The baseline of bench/: CRIU's own cuda plugin (in a directory of its own: CRIU loads every plugin of
    # its -L directory) and the cuda-checkpoint it runs from PATH.
    if [[ -f .device/criu-cuda-plugin/cuda_plugin.so ]]; then
        mkdir -p /opt/criu-cuda-plugin && cp .device/criu-cuda-plugin/cuda_plugin.so /opt/criu-cuda-plugin/
        install -m 0755 .device/cuda-checkpoint /opt/stasis/bin/cuda-checkpoint
    fi
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

# The 8B server's helpers (sections serve8b and serve8bhost): its script, its port, timing, its first answer,
# stopping it (and waiting for its port), and its weights made once on the disk.
LLM_SERVER=Workloads/torch/llm_server.py
LLM_PORT=18080
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
llm_ask() { timeout 180 python3 $LLM_SERVER ask --port $LLM_PORT; }
llm_stop() { [[ -n ${1:-} && -e /proc/$1 ]] && kill_tree "$1"; for _ in $(seq 100); do ss -ltn 2>/dev/null | grep -q ":$LLM_PORT " || break; sleep 0.1; done; }
llm_weights() {  # WEIGHTS LOG -> fails when they cannot be made
    [[ -s $1/model.safetensors ]] || python3 $LLM_SERVER prepare --weights "$1" >"$2" 2>&1
}

# The dump's line about what an agent moved, if any.
agent_line() { grep -h 'agent:' "$1" 2>/dev/null | sed 's/^ *//' | head -n 1; }

keep_logs() { cp "$1"/*.txt "$LOGS/" 2>/dev/null; for f in "$1"/*.txt; do [[ -e $f ]] && mv "$LOGS/$(basename "$f")" "$LOGS/$2-$(basename "$f")"; done; cp "$1/log" "$LOGS/$2-workload.log" 2>/dev/null; true; }

# A CUDA program (started through LAUNCHER; cuda-workload MODE, buffers by default) checkpointed twice with
# --leave-running, verified each time, then each checkpoint restored and verified: LABEL names the results.
leave_running_twice() {  # LABEL LAUNCHER [MODE]
    local label=$1 launcher=$2 mode=${3:-buffers}
    local dir; dir=$(mktemp -d /tmp/stasis-$label-leave.XXXXXX)
    local pid; pid=$($launcher /opt/stasis/bin/cuda-workload "$mode" --dir "$dir" --daemon --mem 1024)
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
    if $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$run/ckpt" -W "$run/restore-work" >"$run/restore.txt" 2>&1; then
        touch "$run/go"
        # Where CRIU's part of each went, from its own logs (bench/criu_log.py; issue 28's step 1).
        { echo "CRIU's dump of $label:"; python3 bench/criu_log.py dump "$run/ckpt/criu-dump.log"
          echo "CRIU's restore of $label:"; python3 bench/criu_log.py restore "$run/restore-work/criu-restore.log"; } >"$run/criu-split.txt" 2>&1
        cat "$run/criu-split.txt"
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

# BERT-base checkpointed twice with --leave-running: it trains on to the same losses; then the first checkpoint,
# restored (with the files it writes, losses.txt and step-times.txt, put back as they were then: files outside
# a checkpoint are the user's, and CRIU refuses open files whose size changed), trains to the same losses again.
bert_leave_running() {  # REF STEPS PAUSE [LAUNCHER]
    local ref=$1 steps=$2 pause=$3 launcher=${4:-}
    local run; run=$(mktemp -d /tmp/stasis-bert-leave.XXXXXX)
    local pid; pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $launcher python3 Workloads/torch/bert_train.py --dir "$run" --size base --steps $steps --pause-at $pause --daemon) \
        || { fail "bert-base --leave-running" "did not start: $(tail -n 5 "$run/log")"; return; }
    if $STASIS dump "$pid" -D "$run/one" --leave-running >"$run/dump1.txt" 2>&1 && $STASIS dump "$pid" -D "$run/two" --leave-running >"$run/dump2.txt" 2>&1; then
        # The files it writes, as they were at the checkpoint (CRIU refuses a restore whose open files changed size).
        mkdir -p "$run/at-checkpoint" && cp "$run"/*.txt "$run/at-checkpoint/"
        touch "$run/go"
        for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
        if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
            pass "bert-base --leave-running twice${launcher:+ (agent)}: trains on to the same losses; $(grep -ho 'the job stalled [0-9.]* m*s' "$run/dump1.txt")"
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

# Live migration (issue 7) between two hosts on this machine: the root namespaces and a receiver in a
# network namespace joined by a veth pair, with a PID namespace of its own. BERT-base, paused at step 15, is
# moved by `stasis migrate` (through the driver, and under `stasis run` with the agent), told to go on there,
# and its 30 losses must equal an uninterrupted run's. Then bench/migrate.sh bert: the same against CRIU's
# page-server, with downtime and bytes.
ensure_ip() {
    command -v ip >/dev/null || { mkdir -p /opt/iproute && cp -r .device/iproute/. /opt/iproute/ \
        && printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/iproute/lib exec /opt/iproute/ip "$@"\n' >/opt/stasis/bin/ip && chmod +x /opt/stasis/bin/ip; }
}

# The number of GPUs here, and whether a section's needs ("gpus=N torch runc ip") are met: prints why not.
gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU'; }
unmet_needs() {
    local need
    for need in $1; do
        case $need in
            gpus=*) (( $(gpu_count) >= ${need#gpus=} )) || echo "needs ${need#gpus=} GPUs, this machine has $(gpu_count)" ;;
            torch) python3 -c 'import torch' 2>/dev/null || echo "needs PyTorch" ;;
            jax) python3 -c 'import jax' 2>/dev/null || echo "needs JAX" ;;
            runc) [[ -n $(ls .device/runc-debs/*.deb 2>/dev/null) ]] || command -v runc >/dev/null || echo "needs runc" ;;
            ip) [[ -x .device/iproute/ip ]] || command -v ip >/dev/null || echo "needs ip (iproute2)" ;;
        esac
    done
}

# Runs the named sections after the setup, skipping (and saying so) those whose needs are not met; prints
# the summary. Its exit status: 0 when nothing failed.
run_sections() {
    setup
    local section why
    for section in "$@"; do
        echo "== $section"
        declare -F "section_$section" >/dev/null || { fail "$section" "no such section"; continue; }
        local needs_var="needs_$section"
        why=$(unmet_needs "${!needs_var:-gpus=1}" | paste -sd ';' - | sed 's/;/; /g')
        if [[ -n $why ]]; then
            echo "SKIP $section: $why"; results+=("SKIP $section: $why"); continue
        fi
        local started=$SECONDS
        "section_$section"
        echo "== $section took $((SECONDS - started)) s"
    done
    echo
    echo "== summary"
    printf '%s\n' "${results[@]}" | tee "$OUT/summary.txt"
    local passed failed
    passed=$(printf '%s\n' "${results[@]}" | grep -c '^PASS')
    failed=$(printf '%s\n' "${results[@]}" | grep -c '^FAIL')
    echo "$passed passed, $failed failed" | tee -a "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
    [[ $failed -eq 0 ]]
}
