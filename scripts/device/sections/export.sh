# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_export="gpus=1"
needs_import="gpus=1"

# Restore on another machine, step 1: checkpoint a small CUDA program in a fixed directory (its files must be
# at the same paths there) and bring it back through $OUT, compressed and cut into 12 MiB pieces.
EXPORT_DIR=/tmp/stasis-export
section_export() {
    rm -rf $EXPORT_DIR && mkdir -p $EXPORT_DIR
    # streams: queued work on several streams, and little pattern data (random data does not compress).
    local pid; pid=$(start_cuda streams $EXPORT_DIR) || { fail "export" "did not start"; return; }
    if ! $STASIS dump "$pid" -D $EXPORT_DIR/ckpt >"$LOGS/export-dump.txt" 2>&1; then fail "export" "$(tail -n 5 "$LOGS/export-dump.txt")"; return; fi
    wait_gone "$pid"
    # The checkpoint as one file (its chunks are in this machine's store), beside the workload's own files;
    # with the program's binary: CRIU wants the very file the process runs (nvcc's output may differ there).
    $STASIS export $EXPORT_DIR/ckpt -o $EXPORT_DIR/ckpt.bundle >"$LOGS/export-bundle.txt" 2>&1 \
        || { fail "export" "stasis export: $(tail -n 3 "$LOGS/export-bundle.txt")"; return; }
    tar -C / -cf - --exclude="${EXPORT_DIR#/}/ckpt" "${EXPORT_DIR#/}" opt/stasis/bin/cuda-workload | xz -T0 -9 >/tmp/export.tar.xz
    local size; size=$(stat -c %s /tmp/export.tar.xz)
    # What comes back must then travel out again with the carried binaries (.device/, ~38 MiB) inside the
    # device tool's 64 MiB.
    if (( size > 24 * 1024 * 1024 )); then
        fail "export" "the compressed checkpoint is $size bytes, more than the 24 MiB that can travel back out"
        return
    fi
    split -b 12M -d /tmp/export.tar.xz "$OUT/export.tar.xz.part-"
    pass "export: checkpoint of a CUDA program, $(du -sb $EXPORT_DIR/ckpt | cut -f1) bytes, $size compressed, in $OUT"
}

# Step 2, on a freshly started machine: carry the pieces in .device/import/ and restore them there.
section_import() {
    ls .device/import/export.tar.xz.part-* >/dev/null 2>&1 || { fail "import" "no .device/import/export.tar.xz.part-*"; return; }
    rm -rf $EXPORT_DIR
    cat .device/import/export.tar.xz.part-* | xz -dc | tar -C / -xf -
    $STASIS import $EXPORT_DIR/ckpt.bundle -D $EXPORT_DIR/ckpt >"$LOGS/import-bundle.txt" 2>&1 \
        || { fail "import" "stasis import: $(tail -n 3 "$LOGS/import-bundle.txt")"; return; }
    local pid; pid=$(python3 -c 'import json; print(json.load(open("/tmp/stasis-export/ckpt/manifest.json"))["processTree"]["rootPID"])')
    if $STASIS restore -D $EXPORT_DIR/ckpt >"$LOGS/import-restore.txt" 2>&1; then
        local verdict; verdict=$(verify "$pid" $EXPORT_DIR)
        [[ $verdict == PASS* ]] && pass "import: restored on another machine (GPU $GPU_UUID) and verified" \
            || fail "import" "after restore: $verdict"
    else
        fail "import" "$(tail -n 6 "$LOGS/import-restore.txt")"
    fi
    kill_tree "$pid" 2>/dev/null
}
