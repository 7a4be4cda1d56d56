# Sourced by scripts/device-test.sh. A JAX training job that keeps compiling (XLA runs ptxas as a child for
# every new shape), checkpointed while it runs: three --leave-running dumps from its very start (the first
# during its first compilation), then a dump that ends it and a restore; its losses must equal an
# uninterrupted run's, and it must never die under a checkpoint. Under `stasis run` (the agent), and through
# the driver alone (with XLA_PYTHON_CLIENT_MEM_FRACTION as the run that lost a JAX job had it): stasis refuses
# that path for JAX (checked first), and STASIS_ALLOW_XLA_DRIVER_PATH=1 lets the section measure it anyway.
needs_jax="gpus=1 jax"

# Why a job died, from what it and the kernel left.
jax_death() {  # DIR
    echo "job log: $(tail -n 8 "$1/log" 2>/dev/null | tr '\n' ' '); dmesg: $(dmesg 2>/dev/null | tail -n 3 | tr '\n' ' ')"
}

section_jax() {
    export XLA_PYTHON_CLIENT_MEM_FRACTION=0.05 XLA_FLAGS=--xla_gpu_deterministic_ops=true
    local ref; ref=$(mktemp -d /tmp/stasis-jax-ref.XXXXXX)
    timeout 300 python3 Workloads/jax/jax_train.py --dir "$ref" --steps 3000 >"$ref/out.txt" 2>&1 \
        || { fail "jax reference run" "$(tail -n 5 "$ref/out.txt")"; return; }
    local label launcher
    # JAX_LABELS: driver, agent, and driver-nographs (XLA's command buffers, its CUDA graphs, off); JAX_DUMPS:
    # how many --leave-running dumps.
    for label in ${JAX_LABELS:-driver agent}; do
        launcher=""; [[ $label == agent ]] && launcher=$RUN
        local flags=--xla_gpu_deterministic_ops=true
        [[ $label == driver-nographs ]] && flags="$flags --xla_gpu_enable_command_buffer="
        local run; run=$(mktemp -d /tmp/stasis-jax-$label.XXXXXX)
        local store=/dev/shm/stasis-jax-store
        rm -rf "$store"
        local pid; pid=$(XLA_FLAGS="$flags" $launcher python3 Workloads/jax/jax_train.py --dir "$run" --steps 3000 --step-sleep 0.01 --daemon) \
            || { fail "jax ($label)" "did not start: $(tail -n 5 "$run/log")"; continue; }
        local ok=1 round
        if [[ $label == driver* ]]; then
            # stasis refuses JAX on the driver path alone, before anything is touched; the override then lets
            # the section keep measuring that path.
            for _ in $(seq 600); do [[ -s $run/losses.txt ]] && break; sleep 0.1; done  # XLA's GPU plugin loaded
            if $STASIS dump "$pid" -D "$run/refused" --leave-running --store "$store" >"$run/refusal.txt" 2>&1; then
                fail "jax ($label) refusal" "the driver path took a JAX job"
            elif grep -q "runs XLA's GPU runtime" "$run/refusal.txt" && kill -0 "$pid" 2>/dev/null; then
                pass "jax ($label): refused on the driver path alone, nothing touched, the job runs on"
            else
                fail "jax ($label) refusal" "$(tail -n 3 "$run/refusal.txt" | tr '\n' ' ')"
            fi
            export STASIS_ALLOW_XLA_DRIVER_PATH=1
        fi
        for round in $(seq "${JAX_DUMPS:-3}"); do
            local threads children
            threads=$(ls /proc/$pid/task 2>/dev/null | wc -l); children=$(ps -o comm= --ppid "$pid" 2>/dev/null | tr '\n' ',')
            if ! $STASIS dump "$pid" -D "$run/leave$round" --leave-running --store "$store" >"$run/dump$round.txt" 2>&1; then
                # A refusal that touched nothing (the tree kept compiling) is no loss; anything else is.
                if grep -q "nothing was touched\|nothing was dumped" "$run/dump$round.txt" && kill -0 "$pid" 2>/dev/null; then
                    echo "jax ($label) dump $round refused, job running: $(tail -n 2 "$run/dump$round.txt" | tr '\n' ' ')"
                else
                    local alive="the job runs on"; kill -0 "$pid" 2>/dev/null || alive="the job is gone"
                    fail "jax ($label) --leave-running dump $round ($threads threads, children: $children; $alive)" "$(tail -n 6 "$run/dump$round.txt" | tr '\n' ' ')"
                    ok=0
                fi
            fi
            kill -0 "$pid" 2>/dev/null || { fail "jax ($label) job died at dump $round" "$(jax_death "$run")"; ok=0; break; }
            echo "jax ($label) dump $round: $threads threads, children: ${children:-none}; $(grep -h 'time:' "$run/dump$round.txt" | sed 's/^ *//')"
        done
        if (( ok )); then
            if $STASIS dump "$pid" -D "$run/final" --store "$store" >"$run/final.txt" 2>&1 && wait_gone "$pid" \
                && $STASIS restore -D "$run/final" --store "$store" >"$run/restore.txt" 2>&1; then
                sleep 3
                touch "$run/stop"
                for _ in $(seq 600); do [[ -e $run/done ]] && break; sleep 0.1; done
                local lines; lines=$(wc -l <"$run/losses.txt")
                if [[ -e $run/done ]] && (( lines > 10 )) && cmp -s "$run/losses.txt" <(head -n "$lines" "$ref/losses.txt"); then
                    pass "jax ($label): ${JAX_DUMPS:-3} --leave-running dumps while it compiled and trained, then dump + restore; $lines losses identical to an uninterrupted run; $(grep -h 'gpu:\|time:' "$run/final.txt" | sed 's/^ *//' | tr '\n' ' ')"
                else
                    fail "jax ($label)" "losses differ or the run did not finish ($lines lines): $(diff "$run/losses.txt" <(head -n "$lines" "$ref/losses.txt") | head -n 4 | tr '\n' ' '); $(jax_death "$run")"
                fi
            else
                fail "jax ($label) final dump/restore" "$(tail -n 6 "$run/final.txt" "$run/restore.txt" 2>/dev/null | tr '\n' ' '); $(jax_death "$run")"
            fi
        fi
        unset STASIS_ALLOW_XLA_DRIVER_PATH
        keep_logs "$run" "jax-$label"
        [[ -e /proc/$pid ]] && kill_tree "$pid"
        rm -rf "$store" "$run"/leave* "$run/final"
    done
    unset XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS
}
