# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_refuse="gpus=1"

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
