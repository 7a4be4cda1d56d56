# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_shared="gpus=1 torch"

# Device memory shared between processes under `stasis run` (cuMemExportToShareableHandle with POSIX
# descriptors, passed over a unix socket; legacy CUDA IPC; torch.multiprocessing): carried by the agents,
# moved once by its owner. Every cuda-workload checks both parts of the memory and that the other process's
# counter moves after the restore; the torch job's losses must equal an uninterrupted run's.
section_shared() {
    export STASIS_STORE=/dev/shm/stasis-shared-store
    rm -rf $STASIS_STORE
    local mode dir pid
    for mode in share share3 share-orphan ipc-share ipc-share-event; do
        dir=$(mktemp -d /tmp/stasis-$mode.XXXXXX)
        pid=$($RUN /opt/stasis/bin/cuda-workload "$mode" --dir "$dir" --daemon --mem 512) || { fail "shared $mode" "did not start: $(tail -n 5 "$dir/log")"; continue; }
        local before; before=$(verify "$pid" "$dir")
        if [[ $before != PASS* ]]; then fail "shared $mode" "before the dump: $before"
        elif round_trip "shared $mode" "$pid" "$dir"; then
            pass "shared $mode: $(verify "$pid" "$dir" | cut -c1-220); $(agent_line "$dir/dump.txt" | cut -c1-160)"
        fi
        keep_logs "$dir" "shared-$mode"
        kill_tree "$pid"
    done

    # An importer whose exporter is outside the checkpointed tree: refused before anything is touched,
    # naming both; both processes run on.
    dir=$(mktemp -d /tmp/stasis-share-outside.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload share --dir "$dir" --daemon --mem 256) || fail "shared outside" "did not start"
    local child; child=$(ps -o pid= --ppid "$pid" | tr -d ' ' | head -n 1)
    if [[ -n $child ]] && ! $STASIS dump "$child" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1; then
        local verdict; verdict=$(verify "$pid" "$dir")
        if grep -q "PID $child maps device memory" "$dir/dump.txt" && grep -q "PID $pid, outside the checkpointed tree" "$dir/dump.txt" \
            && [[ $verdict == PASS* && ! -e $dir/ckpt ]]; then
            pass "shared outside the tree refused: $(grep -m1 error "$dir/dump.txt" | cut -c1-200); both processes verified"
        else
            fail "shared outside" "$verdict; $(tail -n 3 "$dir/dump.txt")"
        fi
    else
        fail "shared outside" "the dump of the importer alone was not refused: $(tail -n 3 "$dir/dump.txt")"
    fi
    keep_logs "$dir" "shared-outside"
    kill_tree "$pid"

    leave_running_twice shared "$RUN" share

    mp_share_train

    # 2 x 8 GiB shared: the times, and the store holding the memory once.
    dir=$(mktemp -d /tmp/stasis-share-big.XXXXXX)
    rm -rf $STASIS_STORE
    if pid=$($RUN /opt/stasis/bin/cuda-workload share --dir "$dir" --daemon --mem 16384); then
        if round_trip "shared 2 x 8 GiB" "$pid" "$dir"; then
            local stored; stored=$(du -sb $STASIS_STORE/chunks | cut -f1)
            pass "shared 2 x 8 GiB: store holds $((stored >> 20)) MiB; $(grep -h 'total' "$dir/dump.txt" | sed 's/^ *//' | head -n 1); restore $(grep -h 'total' "$dir/restore.txt" | sed 's/^ *//' | head -n 1)"
            { echo "== dump"; cat "$dir/dump.txt"; echo "== restore"; cat "$dir/restore.txt"; echo "== store bytes: $stored"; } >"$OUT/shared-bench.txt"
        fi
        kill_tree "$pid"
    else
        fail "shared 2 x 8 GiB" "did not start: $(tail -n 5 "$dir/log")"
    fi
    keep_logs "$dir" "shared-big"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# torch.multiprocessing: a producer passes CUDA tensors to a trainer (CUDA IPC through PyTorch), checkpointed
# at step 20 with batches still on the queue, restored, trained to 40; the losses must equal a reference run's.
mp_share_train() {
    local script=Workloads/torch/mp_share_train.py
    local ref; ref=$(mktemp -d /tmp/stasis-mp-ref.XXXXXX)
    touch "$ref/go"
    $RUN python3 $script --dir "$ref" --steps 40 >"$ref/log" 2>&1 || { fail "shared torch.multiprocessing reference" "$(tail -n 5 "$ref/log")"; return; }
    local run; run=$(mktemp -d /tmp/stasis-mp.XXXXXX)
    local pid; pid=$($RUN python3 $script --dir "$run" --steps 40 --pause-at 20 --daemon) \
        || { fail "shared torch.multiprocessing" "did not start: $(tail -n 5 "$run/log")"; return; }
    if $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$run/ckpt" >"$run/restore.txt" 2>&1; then
        touch "$run/go"
        for _ in $(seq 600); do [[ -e $run/done ]] && break; sleep 0.1; done
        if [[ -e $run/done ]] && cmp -s "$ref/losses.txt" "$run/losses.txt"; then
            pass "shared torch.multiprocessing: 40 losses identical to an uninterrupted run; $(agent_line "$run/dump.txt" | cut -c1-160)"
        else
            fail "shared torch.multiprocessing" "losses differ or not done: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ') $(tail -n 3 "$run/log" | tr '\n' ' ')"
        fi
    else
        fail "shared torch.multiprocessing" "$(tail -n 6 "$run"/dump.txt "$run"/restore.txt 2>/dev/null)"
    fi
    keep_logs "$run" "shared-mp"
    cp "$ref/log" "$LOGS/shared-mp-reference.log" 2>/dev/null
    [[ -e /proc/$pid ]] && kill_tree "$pid"
}
