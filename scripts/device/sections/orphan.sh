# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_orphan="gpus=1 torch"

# A stasis killed in the middle of an agent dump (issue 32): the job must run on by itself, its agent putting
# its device memory back once the grace period (STASIS_AGENT_ORPHAN_GRACE, 5 s) has passed, with no `stasis
# resume` run here. Three cases: right after the agent released the memory (STASIS_FAULT=released-kill),
# in CRIU's post-dump step with the driver's state checkpointed and the tree frozen (post-dump-kill: CRIU
# then thaws the tree, and the agent's resume must resume the driver too), and BERT-base killed after its
# release, whose losses must then equal an uninterrupted run's.
section_orphan() {
    export STASIS_STORE=/dev/shm/stasis-orphan-store
    rm -rf $STASIS_STORE
    local fault dir pid started verdict
    # ORPHAN_FAULTS: the CUDA program's cases (empty: only BERT's).
    for fault in ${ORPHAN_FAULTS-released post-dump}; do
        dir=$(mktemp -d /tmp/stasis-orphan-$fault.XXXXXX)
        pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 2048) || { fail "orphan $fault" "did not start: $(tail -n 5 "$dir/log")"; continue; }
        STASIS_FAULT=$fault-kill $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1
        started=$SECONDS
        # verify asks the workload, whose CUDA calls wait at the gate until the agent has put the memory back.
        verdict=$(VERIFY_TRIES=1200 verify "$pid" "$dir")
        orphan_verdict "orphan: stasis killed at $fault" "$dir" "$verdict" $((SECONDS - started))
        keep_logs "$dir" "orphan-$fault"
        kill_tree "$pid"
    done

    # BERT-base paused at step 15, stasis killed after the release; then the job is told to go on.
    local ref; ref=$(bert_reference base "") || { fail "orphan bert-base reference run" "did not finish"; return; }
    local run; run=$(mktemp -d /tmp/stasis-orphan-bert.XXXXXX)
    pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $RUN python3 Workloads/torch/bert_train.py --dir "$run" --size base --steps 30 --pause-at 15 --daemon) \
        || { fail "orphan bert-base" "did not start: $(tail -n 5 "$run/log")"; return; }
    # Killed at a known step: a kill -9 of the backgrounded command hit `timeout`, not stasis (seen on the H100,
    # 2026-12-07: the dump then completed and ended the job).
    STASIS_FAULT=released-kill $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1
    started=$SECONDS
    touch "$run/go"
    for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
    if [[ -e $run/done ]] && cmp -s "$ref/losses.txt" "$run/losses.txt"; then
        local how="the dump had not released the memory yet (the agent let the calls go at once)"
        grep -q 'is gone; putting device memory back' "$run/log" && how="the agent put the memory back itself: $(grep -h 'stasis-agent:' "$run/log" | tail -n 1 | cut -c1-100)"
        pass "orphan bert-base: stasis killed right after the agent released its memory, 30 losses identical, done $((SECONDS - started)) s after the kill, no resume run; $how"
    else
        fail "orphan bert-base" "not done or losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" 2>&1 | head -n 4 | tr '\n' ' ') $(grep -h 'stasis-agent' "$run/log" | tail -n 3 | tr '\n' ' ')"
    fi
    orphan_no_rescue_left "orphan bert-base"
    keep_logs "$run" "orphan-bert"
    [[ -e /proc/$pid ]] && kill_tree "$pid"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# The job verified after the kill, said in its standard error that its agent put the memory back, and no
# rescue entry is left.
orphan_verdict() {  # LABEL DIR VERDICT SECONDS
    local label=$1 dir=$2 verdict=$3 seconds=$4
    if [[ $verdict != PASS* ]]; then
        fail "$label" "the job did not verify: $verdict; $(grep -h 'stasis-agent' "$dir/log" | tail -n 3 | tr '\n' ' '); dump: $(tail -n 2 "$dir/dump.txt" | tr '\n' ' ')"
    elif ! grep -q 'is gone; putting device memory back' "$dir/log"; then
        fail "$label" "the job verified, but its agent did not say it put the memory back: $(tail -n 3 "$dir/log" | tr '\n' ' ')"
    else
        pass "$label: the job verified $seconds s after the kill, no resume run; $(grep -h 'resumed PID' "$dir/log" | tail -n 1 | cut -c1-100)"
    fi
    orphan_no_rescue_left "$label"
}

orphan_no_rescue_left() {
    local left; left=$($STASIS ls 2>/dev/null | grep -c 'rescue-')
    [[ $left == 0 ]] && pass "$1: no rescue entry left" || fail "$1: rescue entries left" "$($STASIS ls 2>&1 | grep rescue- | head -n 3 | tr '\n' ' ')"
}
