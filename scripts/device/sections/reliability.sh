# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_reliability="gpus=1"

# The reliability fixes on the GPU: stasis killed after CRIU's exit leaves a checkpoint that restores
# (through the driver and under the agent), and a damaged chunk of device memory in the store is not reused
# by the next dump (the agent's chunk path), then the cost of checking reused chunks (bench/reuse-check.sh).
section_reliability() {
    export STASIS_STORE=/dev/shm/stasis-reliability-store
    rm -rf $STASIS_STORE
    local dir pid launcher label
    for label in driver agent; do
        launcher=""; [[ $label == agent ]] && launcher=$RUN
        dir=$(mktemp -d /tmp/stasis-killed-$label.XXXXXX)
        pid=$($launcher /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 2048)
        STASIS_FAULT=criu-exited-kill $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1
        if wait_gone "$pid" && $STASIS verify "$dir/ckpt" >"$dir/verify.txt" 2>&1 && $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1 \
            && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            pass "$label: stasis killed after CRIU's exit, the checkpoint verifies and restores"
        else
            fail "$label: killed after CRIU's exit" "$(tail -n 3 "$dir"/verify.txt "$dir"/restore.txt 2>/dev/null)"
        fi
        keep_logs "$dir" "killed-$label"
        kill_tree "$pid"
    done
    # A chunk of device memory damaged in the store between two checkpoints of an unchanged program, before
    # any dump reused it (a fresh store: the cases above wrote the same chunks, and a chunk checked at its first
    # reuse is trusted after that).
    rm -rf $STASIS_STORE
    dir=$(mktemp -d /tmp/stasis-damaged.XXXXXX)
    pid=$($RUN /opt/stasis/bin/cuda-workload buffers --dir "$dir" --daemon --mem 1024)
    if $STASIS dump "$pid" -D "$dir/one" --leave-running >"$dir/dump1.txt" 2>&1; then
        local chunk; chunk=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print([c for f in m["files"] if f["path"].startswith("gpu/") for c in f.get("chunks", []) if c][0])' "$dir/one/manifest.json")
        local file=$STASIS_STORE/chunks/${chunk:0:2}/$chunk
        printf '\xff\xff\xff\xff' | dd of="$file" bs=1 seek=4000 conv=notrunc status=none
        if $STASIS dump "$pid" -D "$dir/two" >"$dir/dump2.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$dir/two" >"$dir/restore.txt" 2>&1 \
            && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            pass "agent: a damaged chunk in the store is written again by the next dump, which restores ($(agent_line "$dir/dump2.txt"))"
        else
            fail "agent: damaged chunk" "$(tail -n 3 "$dir"/dump2.txt "$dir"/restore.txt 2>/dev/null)"
        fi
    else
        fail "agent: damaged chunk" "first dump: $(tail -n 3 "$dir/dump1.txt")"
    fi
    keep_logs "$dir" "damaged"
    kill_tree "$pid"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
    STASIS=/opt/stasis/bin/stasis bench/reuse-check.sh gpu 16 2>&1 | tee "$OUT/reuse-check.txt"
}
