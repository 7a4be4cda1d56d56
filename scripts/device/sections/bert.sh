# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_bert="gpus=1 torch"
needs_bertleave="gpus=1 torch"

section_bert() {
    for size in base large; do
        local steps=30 pause=15
        local ref; ref=$(mktemp -d /tmp/stasis-bert-ref-$size.XXXXXX)
        local run; run=$(mktemp -d /tmp/stasis-bert-run-$size.XXXXXX)
        CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size $size --steps $steps >"$ref/out.txt" 2>&1 \
            || { fail "bert-$size reference run" "$(tail -n 5 "$ref/out.txt" "$ref/log" 2>/dev/null)"; continue; }
        local pid; pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 Workloads/torch/bert_train.py --dir "$run" --size $size --steps $steps --pause-at $pause --daemon) \
            || { fail "bert-$size" "did not start: $(tail -n 5 "$run/log")"; continue; }
        if $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 && wait_gone "$pid" && $STASIS restore -D "$run/ckpt" >"$run/restore.txt" 2>&1; then
            touch "$run/go"
            for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
            if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
                pass "bert-$size: $(wc -l <"$run/losses.txt") losses identical to an uninterrupted run; $(grep -h 'gpu:\|time:' "$run/dump.txt" | sed 's/^ *//' | tr '\n' ' ')"
            else
                fail "bert-$size" "losses differ (or the run did not finish): $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ')"
            fi
        else
            fail "bert-$size" "$(tail -n 6 "$run"/dump.txt "$run"/restore.txt 2>/dev/null)"
        fi
        cp "$run/dump.txt" "$LOGS/bert-$size-dump.txt" 2>/dev/null; cp "$run/restore.txt" "$LOGS/bert-$size-restore.txt" 2>/dev/null
        cp "$run/log" "$LOGS/bert-$size-workload.log" 2>/dev/null
        [[ -e /proc/$pid ]] && kill_tree "$pid"
        rm -rf "$run/ckpt"
        [[ $size == base ]] && bert_leave_running "$ref" $steps $pause
    done
}

# Only BERT-base's --leave-running case (and its reference run), when named.
section_bertleave() {
    local ref; ref=$(mktemp -d /tmp/stasis-bert-ref-base.XXXXXX)
    CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 300 python3 Workloads/torch/bert_train.py --dir "$ref" --size base --steps 30 >"$ref/out.txt" 2>&1 \
        || { fail "bert-base reference run" "$(tail -n 5 "$ref/out.txt")"; return; }
    bert_leave_running "$ref" 30 15
}
