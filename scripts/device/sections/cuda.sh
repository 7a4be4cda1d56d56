# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_cuda="gpus=1"

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
