# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_agent="gpus=1 torch"
needs_agentbig="gpus=1 torch"
needs_leavedisk="gpus=1 torch"

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

# --leave-running into a store on the disk: the device memory the agents move waits in a stage in memory
# (/dev/shm) while the job gets it back, then goes into the store. Each checkpoint must restore, BERT must
# train on to the same losses, and no stage may be left behind.
section_leavedisk() {
    export STASIS_STORE=/var/tmp/stasis-leavedisk-store
    rm -rf $STASIS_STORE
    leave_running_twice agent-disk "$RUN"
    leave_running_twice shared-disk "$RUN" share
    local ref; ref=$(mktemp -d /tmp/stasis-bert-ref-base.XXXXXX)
    if CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size base --steps 30 >"$ref/out.txt" 2>&1; then
        bert_leave_running "$ref" 30 15 "$RUN"
    else
        fail "bert-base reference run" "$(tail -n 5 "$ref/out.txt")"
    fi
    local stages; stages=$(ls -d /dev/shm/stasis-stage-* 2>/dev/null | tr '\n' ' ')
    [[ -z $stages ]] && pass "leavedisk: no stage left in /dev/shm" || fail "leavedisk: stages left behind" "$stages"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# BERT-large alone under the agent (agentbig's first case), with CRIU's dump and restore split from their logs.
needs_bertlarge="gpus=1 torch"
section_bertlarge() {
    export STASIS_STORE=/dev/shm/stasis-agent-store
    rm -rf $STASIS_STORE
    agent_bert large "" "agent bert-large"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}
