# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip. Issue 28: the host side of GPU restores.
needs_prepared="gpus=1"
needs_serve8bhost="gpus=1 torch"

# Every thread of every process of the tree rooted at PID is stopped (state T).
tree_stopped() {
    local p t
    for p in $(tree_pids "$1"); do
        for t in /proc/"$p"/task/*/stat; do
            [[ $(awk '{ sub(/^.*\) /, ""); print $1 }' "$t" 2>/dev/null) == T ]] || return 1
        done
    done
}

# Prepared restores of GPU processes under the agent: `stasis restore --prepare` brings the tree back stopped,
# the device memory refilled and checked, the CUDA calls held; it stays stopped; `stasis activate` lets it run
# and it verifies itself. A driver-path checkpoint (no agent) is refused before anything is restored, and
# restores normally afterwards.
section_prepared() {
    export STASIS_STORE=/dev/shm/stasis-prepared-store
    rm -rf $STASIS_STORE
    local mode dir pid
    for mode in buffers tree share; do
        dir=$(mktemp -d /tmp/stasis-prepared-$mode.XXXXXX)
        pid=$($RUN /opt/stasis/bin/cuda-workload "$mode" --dir "$dir" --daemon --mem 1024) || { fail "prepared $mode" "did not start: $(tail -n 5 "$dir/log")"; continue; }
        local pids; pids=$(tree_pids "$pid")
        if [[ $(verify "$pid" "$dir") != PASS* ]]; then fail "prepared $mode" "before the dump"; kill_tree "$pid"; continue; fi
        if ! $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1; then fail "prepared $mode" "dump: $(tail -n 5 "$dir/dump.txt")"; kill_tree "$pid"; continue; fi
        for p in $pids; do wait_gone "$p"; done
        if ! $STASIS restore "$dir/ckpt" --prepare >"$dir/prepare.txt" 2>&1; then
            fail "prepared $mode" "restore --prepare: $(tail -n 5 "$dir/prepare.txt")"; continue
        fi
        sleep 1
        if ! tree_stopped "$pid"; then
            fail "prepared $mode" "the prepared tree is not stopped: $(for p in $(tree_pids "$pid"); do cat /proc/$p/task/*/stat | awk '{print $3}' | sort | uniq -c | tr '\n' ' '; done)"
            kill_tree "$pid"; continue
        fi
        local t0=$SECONDS
        if ! $STASIS activate "$pid" >"$dir/activate.txt" 2>&1; then
            fail "prepared $mode" "activate: $(tail -n 5 "$dir/activate.txt")"; kill_tree "$pid"; continue
        fi
        local verdict; verdict=$(verify "$pid" "$dir")
        [[ $verdict == PASS* ]] && pass "prepared $mode under the agent: stopped until activated, then verified; $(grep -h 'time:' "$dir/prepare.txt" | sed 's/^ *//'); $(head -n 1 "$dir/activate.txt")" \
            || fail "prepared $mode" "after activation: $verdict"
        keep_logs "$dir" "prepared-$mode"
        kill_tree "$pid"
    done

    # The driver path holds no CUDA calls: refused before anything is restored; the checkpoint still restores.
    dir=$(mktemp -d /tmp/stasis-prepared-driver.XXXXXX)
    pid=$(start_cuda buffers "$dir" --mem 512)
    if $STASIS dump "$pid" -D "$dir/ckpt" >"$dir/dump.txt" 2>&1 && wait_gone "$pid"; then
        if $STASIS restore "$dir/ckpt" --prepare >"$dir/prepare.txt" 2>&1; then
            fail "prepared driver path" "restore --prepare was not refused"; kill_tree "$pid"
        elif ! grep -q 'stasis run' "$dir/prepare.txt" || [[ -e /proc/$pid ]]; then
            fail "prepared driver path" "refusal unclear or PID $pid restored: $(tail -n 3 "$dir/prepare.txt")"; kill_tree "$pid"
        elif $STASIS restore "$dir/ckpt" >"$dir/restore.txt" 2>&1 && [[ $(verify "$pid" "$dir") == PASS* ]]; then
            pass "prepared driver path refused up front ($(grep -m1 -o 'GPU process.*' "$dir/prepare.txt" | cut -c1-100)); a plain restore then verified"
        else
            fail "prepared driver path" "the plain restore after the refusal: $(tail -n 3 "$dir/restore.txt")"
        fi
    else
        fail "prepared driver path" "dump: $(tail -n 3 "$dir/dump.txt")"
    fi
    keep_logs "$dir" "prepared-driver"
    kill_tree "$pid"
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# The 8B server (Workloads/torch/llm_server.py, as serve8b) restored from a disk store three ways, alternating,
# ROUNDS8B times each (default 2), each to its first answer, page cache warm: streamed to CRIU (the default),
# rebuilt as files on /dev/shm first (--rebuild-dir: the chunks decoded on every core, then CRIU's own reads),
# and prepared (`restore --prepare` ahead of demand, then `stasis activate`: timed from the activation). CRIU's
# log of each streamed and rebuilt restore is split by bench/criu_log.py. Figures go to $OUT/serve8bhost.txt.
section_serve8bhost() {
    local disk=/var/tmp/stasis-serve8b srv=$LLM_SERVER port=$LLM_PORT
    local weights=$disk/weights store=$disk/store run
    mkdir -p "$disk" && run=$(mktemp -d "$disk/run.XXXXXX")
    local report=$OUT/serve8bhost.txt
    : >"$report"
    note() { echo "$1" | tee -a "$report"; }

    llm_weights "$weights" "$run/prepare.txt" || { fail "serve8bhost weights" "$(tail -n 5 "$run/prepare.txt")"; return; }
    local t pid reference answer
    t=$(now)
    pid=$(python3 $srv serve --weights "$weights" --dir "$run/cold" --port $port --daemon) \
        || { fail "serve8bhost cold start" "$(tail -n 5 "$run/cold/log")"; return; }
    reference=$(llm_ask) || { fail "serve8bhost cold start" "no answer"; llm_stop "$pid"; return; }
    note "cold start (process start to first answer, weights in the page cache): $(since "$t") s; $(grep -h 'loaded in' "$run/cold/log")"
    llm_stop "$pid"

    pid=$($RUN python3 $srv serve --weights "$weights" --dir "$run/agent" --port $port --daemon) \
        || { fail "serve8bhost under stasis run" "$(tail -n 5 "$run/agent/log")"; return; }
    answer=$(llm_ask)
    if ! $STASIS dump "$pid" -D "$run/ckpt" --store "$store" >"$run/dump.txt" 2>&1 || ! wait_gone "$pid"; then
        fail "serve8bhost checkpoint" "$(tail -n 5 "$run/dump.txt")"; llm_stop "$pid"; return
    fi
    note "agent checkpoint into the disk store: $(grep -h 'time:' "$run/dump.txt" | sed 's/^ *//')"
    { echo "CRIU's dump of the 8B server:"; python3 bench/criu_log.py dump "$run/ckpt/criu-dump.log"; } >>"$report" 2>&1
    sync
    local round way took
    for round in $(seq "${ROUNDS8B:-2}"); do
        for way in streamed rebuilt prepared; do
            local out=$run/restore-$way-$round.txt work=$run/work-$way-$round flags=(-W "$run/work-$way-$round")
            [[ $way == rebuilt ]] && flags+=(--rebuild-dir /dev/shm/stasis-rebuild)
            if [[ $way == prepared ]]; then
                if ! $STASIS restore "$run/ckpt" --store "$store" --prepare "${flags[@]}" >"$out" 2>&1; then
                    fail "serve8bhost prepared restore" "$(tail -n 5 "$out")"; continue
                fi
                pid=$(grep -o 'stasis activate [0-9]*' "$out" | grep -o '[0-9]*$')
                note "prepared (round $round): $(grep -h 'time:' "$out" | sed 's/^ *//')"
                sleep 2
                t=$(now)
                $STASIS activate "$pid" >"$run/activate-$round.txt" 2>&1 && answer=$(llm_ask) || { fail "serve8bhost activate" "$(tail -n 3 "$run/activate-$round.txt")"; llm_stop "$pid"; continue; }
                took=$(since "$t")
                note "  activation to first answer: $took s; $(head -n 1 "$run/activate-$round.txt")"
            else
                t=$(now)
                if ! $STASIS restore "$run/ckpt" --store "$store" "${flags[@]}" >"$out" 2>&1 || ! answer=$(llm_ask); then
                    fail "serve8bhost $way restore" "$(tail -n 5 "$out")"; llm_stop "$(grep -o 'root PID [0-9]*' "$out" | grep -o '[0-9]*$')"; continue
                fi
                took=$(since "$t")
                pid=$(grep -o 'root PID [0-9]*' "$out" | grep -o '[0-9]*$')
                note "$way (round $round): $took s to first answer; $(grep -h 'time:' "$out" | sed 's/^ *//')"
                { echo "  CRIU's restore ($way, round $round):"; python3 bench/criu_log.py restore "$work/criu-restore.log" | sed 's/^/  /'; } >>"$report" 2>&1
            fi
            [[ $answer == "$reference" ]] && pass "serve8bhost $way restore (round $round): $took s to first answer$([[ $way == prepared ]] && echo ' from the activation'); same answer" \
                || fail "serve8bhost $way restore (round $round)" "answer '$answer' differs from '$reference'"
            llm_stop "$pid"
        done
    done

    # From a registry (issue 30): the checkpoint pushed to a loopback registry (on /dev/shm: the disk holds the
    # weights and two stores), then `stasis restore REF` into an empty store, to the first answer.
    local why
    if why=$(ensure_registry_tools); then
        local registry=/dev/shm/stasis-registry-8b rport=15000 rpid image_ref=127.0.0.1:15000/serve/llm:8b
        rpid=$(start_registry "$registry" $rport)
        t=$(now)
        if timeout 120 /opt/stasis/bin/stasis push "$run/ckpt" $image_ref --plain-http --store "$store" >"$run/push.txt" 2>&1; then
            note "pushed to the registry: $(since "$t") s; $(tail -n 1 "$run/push.txt")"
            t=$(now)
            if timeout 150 /opt/stasis/bin/stasis restore $image_ref --plain-http --store "$disk/store-pulled" >"$run/restore-registry.txt" 2>&1 && answer=$(llm_ask); then
                took=$(since "$t")
                pid=$(grep -o 'root PID [0-9]*' "$run/restore-registry.txt" | grep -o '[0-9]*$')
                note "restore from the registry (pulled into an empty store) to first answer: $took s; $(grep -h 'pulled\|time:' "$run/restore-registry.txt" | sed 's/^ *//' | tr '\n' ' ')"
                [[ $answer == "$reference" ]] && pass "serve8bhost restore REF from a registry into an empty store: $took s to first answer; same answer" \
                    || fail "serve8bhost registry restore" "answer differs"
                llm_stop "$pid"
            else
                fail "serve8bhost registry restore" "$(tail -n 5 "$run/restore-registry.txt")"
            fi
        else
            fail "serve8bhost push" "$(tail -n 5 "$run/push.txt")"
        fi
        kill -9 "$rpid" 2>/dev/null
        rm -rf "$registry" "$disk/store-pulled"
    else
        note "registry case skipped: $why"
    fi
    cat "$report" >"$LOGS/serve8bhost.txt"
    keep_logs "$run" "serve8bhost"
    rm -rf "$run" "$store" /dev/shm/stasis-rebuild
}
