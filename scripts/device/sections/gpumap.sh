# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_gpumap="gpus=1"

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
