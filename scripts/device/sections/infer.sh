# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_infer="gpus=1 torch"

section_infer() {
    local dir; dir=$(mktemp -d /tmp/stasis-infer.XXXXXX)
    local srv=Workloads/torch/infer_server.py
    local pid; pid=$(python3 $srv serve --dir "$dir" --daemon) || { fail "inference server" "did not start: $(tail -n 5 "$dir/log")"; return; }
    record_maps infer "$pid"
    local a1 b1; a1=$(python3 $srv ask --dir "$dir" --name a1 --tokens "101 7592 2088 102") ; b1=$(python3 $srv ask --dir "$dir" --name b1 --tokens "101 2023 2003 1037 3231 102")
    if $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$dir/ckpt" >"$dir/restore.txt" 2>&1; then
        local a2 b2; a2=$(python3 $srv ask --dir "$dir" --name a2 --tokens "101 7592 2088 102"); b2=$(python3 $srv ask --dir "$dir" --name b2 --tokens "101 2023 2003 1037 3231 102")
        [[ -n $a1 && $a1 == "$a2" && $b1 == "$b2" ]] && pass "inference server: same answers after restore ($(grep -h 'gpu:' "$dir/dump.txt" | sed 's/^ *//'))" \
            || fail "inference server" "answers differ: '${a1:0:60}' vs '${a2:0:60}'"
    else
        fail "inference server" "$(tail -n 5 "$dir"/dump.txt "$dir"/restore.txt 2>/dev/null)"
    fi
    keep_logs "$dir" "infer"
    kill_tree "$pid"
}
