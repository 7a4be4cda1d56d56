# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_shared="gpus=1"

# Device memory shared between processes under `stasis run` (cuMemExportToShareableHandle with POSIX
# descriptors, passed over a unix socket): carried by the agents, moved once by its owner. Every workload
# checks both parts of the memory and that the other process's counter moves after the restore.
section_shared() {
    export STASIS_STORE=/dev/shm/stasis-shared-store
    rm -rf $STASIS_STORE
    local mode dir pid
    for mode in share share3 share-orphan; do
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
