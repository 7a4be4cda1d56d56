# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_serve8b="gpus=1 torch"

# An 8B-parameter Llama-architecture server (Workloads/torch/llm_server.py, weights as safetensors on the local
# disk): its cold start against restores from a checkpoint in a chunk store on the local disk, with the page
# cache warm and dropped, under the agent and (the baseline) through the driver. Every restored server must give
# the uninterrupted server's answer. Figures go to $OUT/serve8b.txt as well.
section_serve8b() {
    local disk=/var/tmp/stasis-serve8b srv=$LLM_SERVER port=$LLM_PORT
    local weights=$disk/weights store=$disk/store run
    mkdir -p "$disk" && run=$(mktemp -d "$disk/run.XXXXXX")
    local report=$OUT/serve8b.txt
    : >"$report"
    note() { echo "$1" | tee -a "$report"; }

    llm_weights "$weights" "$run/prepare.txt" || { fail "serve8b weights" "$(tail -n 5 "$run/prepare.txt")"; return; }
    note "weights: $(tail -n 1 "$run/prepare.txt" 2>/dev/null) ($(du -sh "$weights" | cut -f1) on $(df --output=source "$disk" | tail -n 1))"

    # Cold start, page cache warm (the weights were just written or read): process start to first answer.
    local t pid reference answer
    t=$(now)
    pid=$(python3 $srv serve --weights "$weights" --dir "$run/cold" --port $port --daemon) \
        || { fail "serve8b cold start" "$(tail -n 5 "$run/cold/log")"; return; }
    reference=$(llm_ask) || { fail "serve8b cold start" "no answer: $(tail -n 3 "$run/cold/log")"; llm_stop "$pid"; return; }
    local cold; cold=$(since "$t")
    note "cold start (process start to first answer, weights in the page cache): $cold s; $(grep -h 'loaded in' "$run/cold/log")"
    llm_stop "$pid"

    # The disk's sequential read speed, from a cold page cache: the 16 GB weights file.
    local readspeed="unknown"
    if sync && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        t=$(now); cat "$weights/model.safetensors" >/dev/null
        readspeed=$(awk -v s="$(since "$t")" -v b="$(stat -c %s "$weights/model.safetensors")" 'BEGIN { printf "%.2f", b / s / 1e9 }')
        note "disk sequential read (the weights file, page cache dropped): $readspeed GB/s"
    else
        note "the page cache cannot be dropped here (/proc/sys/vm/drop_caches is not writable): cold cases skipped"
    fi

    # Under the agent: checkpoint into the disk store, then restore to the first answer, warm and cold.
    pid=$($RUN python3 $srv serve --weights "$weights" --dir "$run/agent" --port $port --daemon) \
        || { fail "serve8b under stasis run" "$(tail -n 5 "$run/agent/log")"; return; }
    answer=$(llm_ask)
    [[ $answer == "$reference" ]] || fail "serve8b under stasis run" "answer '$answer' differs from the cold start's '$reference'"
    if ! $STASIS dump "$pid" -D "$run/ckpt-agent" --store "$store" >"$run/dump-agent.txt" 2>&1 || ! wait_gone "$pid"; then
        fail "serve8b agent checkpoint" "$(tail -n 5 "$run/dump-agent.txt")"; llm_stop "$pid"; return
    fi
    note "agent checkpoint into the disk store: $(grep -h 'time:' "$run/dump-agent.txt" | sed 's/^ *//'); $(agent_line "$run/dump-agent.txt")"
    sync
    local case flags
    for case in warm cold cold-no-prefetch; do
        flags=""; [[ $case == cold-no-prefetch ]] && flags=--no-prefetch
        if [[ $case == cold* ]]; then
            [[ $readspeed == unknown ]] && continue
            sync && echo 3 >/proc/sys/vm/drop_caches
        fi
        t=$(now)
        if $STASIS restore -D "$run/ckpt-agent" $flags >"$run/restore-agent-$case.txt" 2>&1 && answer=$(llm_ask); then
            local took; took=$(since "$t")
            pid=$(grep -o 'root PID [0-9]*' "$run/restore-agent-$case.txt" | grep -o '[0-9]*$')
            if [[ $answer == "$reference" ]]; then
                pass "serve8b agent restore to first answer, page cache $case: $took s (cold start $cold s: $(awk -v a="$cold" -v b="$took" 'BEGIN { printf "%.1f", a / b }')x); same answer"
            else
                fail "serve8b agent restore ($case)" "answer '$answer' differs from '$reference'"
            fi
            note "agent restore, page cache $case: $took s to first answer; $(grep -h 'time:' "$run/restore-agent-$case.txt" | sed 's/^ *//')"
            llm_stop "$pid"
        else
            fail "serve8b agent restore ($case)" "$(tail -n 5 "$run/restore-agent-$case.txt")"
        fi
    done
    local stored; stored=$(du -sb "$store" | cut -f1)
    note "store on disk: $(awk -v b="$stored" 'BEGIN { printf "%.2f GB", b / 1e9 }'); a cold restore's target (these bytes at the disk's read speed, + 1 s): $(awk -v b="$stored" -v r="$readspeed" 'BEGIN { if (r + 0 > 0) printf "%.2f s", b / 1e9 / r + 1; else print "unknown" }')"
    $STASIS rm "$run/ckpt-agent" --store "$store" >/dev/null 2>&1; $STASIS gc --grace 0 --store "$store" >/dev/null 2>&1

    # Baseline: the driver path of stasis (the driver checkpoints device memory into host memory, CRIU dumps it),
    # same disk store, page cache warm.
    pid=$(python3 $srv serve --weights "$weights" --dir "$run/driver" --port $port --daemon) \
        || { fail "serve8b driver path" "$(tail -n 5 "$run/driver/log")"; return; }
    if $STASIS dump "$pid" -D "$run/ckpt-driver" --store "$store" >"$run/dump-driver.txt" 2>&1 && wait_gone "$pid"; then
        note "driver checkpoint into the disk store: $(grep -h 'time:' "$run/dump-driver.txt" | sed 's/^ *//')"
        sync
        t=$(now)
        if $STASIS restore -D "$run/ckpt-driver" >"$run/restore-driver.txt" 2>&1 && answer=$(llm_ask); then
            local took; took=$(since "$t")
            pid=$(grep -o 'root PID [0-9]*' "$run/restore-driver.txt" | grep -o '[0-9]*$')
            [[ $answer == "$reference" ]] && pass "serve8b driver-path restore to first answer, page cache warm: $took s; same answer" \
                || fail "serve8b driver-path restore" "answer differs"
            note "driver-path restore, page cache warm: $took s to first answer; $(grep -h 'time:' "$run/restore-driver.txt" | sed 's/^ *//')"
            llm_stop "$pid"
        else
            fail "serve8b driver-path restore" "$(tail -n 5 "$run/restore-driver.txt")"
        fi
    else
        fail "serve8b driver-path checkpoint" "$(tail -n 5 "$run/dump-driver.txt")"; llm_stop "$pid"
    fi
    rm -rf "$store"

    # Baseline: CRIU 4.2 with its own cuda plugin and NVIDIA's cuda-checkpoint, images on the same disk (after
    # the store is gone: the disk holds one copy at a time), page cache warm.
    if [[ -f /opt/criu-cuda-plugin/cuda_plugin.so ]]; then
        local images=$run/criu-images plugin=/opt/criu-cuda-plugin
        mkdir -p "$images"
        pid=$(python3 $srv serve --weights "$weights" --dir "$run/criu" --port $port --daemon) \
            || { fail "serve8b CRIU cuda plugin" "$(tail -n 5 "$run/criu/log")"; return; }
        t=$(now)
        if criu dump -t "$pid" -D "$images" -L $plugin -v4 -o dump.log >/dev/null 2>&1 && wait_gone "$pid"; then
            local dumped; dumped=$(since "$t")
            sync
            t=$(now)
            if criu restore -D "$images" -d -L $plugin -v4 -o restore.log >/dev/null 2>&1 && answer=$(llm_ask); then
                local took; took=$(since "$t")
                [[ $answer == "$reference" ]] && pass "serve8b CRIU + cuda plugin restore to first answer, page cache warm: $took s; same answer" \
                    || fail "serve8b CRIU + cuda plugin restore" "answer differs"
                note "CRIU 4.2 + its cuda plugin + cuda-checkpoint, images on the disk: checkpoint $dumped s ($(du -sh "$images" | cut -f1)), restore to first answer (page cache warm) $took s"
                llm_stop "$pid"
            else
                fail "serve8b CRIU + cuda plugin restore" "$(grep -h 'Error' "$images/restore.log" | tail -n 3)"; llm_stop "$pid"
            fi
        else
            fail "serve8b CRIU + cuda plugin checkpoint" "$(grep -h 'Error' "$images/dump.log" | tail -n 3)"; llm_stop "$pid"
        fi
        cp "$images"/*.log "$LOGS/" 2>/dev/null
    fi
    keep_logs "$run" "serve8b"
    cp "$run"/*/log "$LOGS/" 2>/dev/null
    rm -rf "$run"
}
