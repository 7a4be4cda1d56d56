# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_plugin="gpus=1"

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
