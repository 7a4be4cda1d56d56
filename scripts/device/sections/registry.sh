# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip. Issue 30: an OCI registry as the store between machines.
needs_registrybench="gpus=1 torch"

# docker-registry (CNCF distribution 2.8) and skopeo, carried by scripts/device-pack.sh (their libraries in
# .device/lib, on the path); prints why not when they are missing.
ensure_registry_tools() {
    [[ -f .device/docker-registry.xz && -f .device/skopeo.xz ]] || { echo "not packed: .device/docker-registry.xz, .device/skopeo.xz"; return 1; }
    xz -dc .device/docker-registry.xz >/opt/stasis/bin/docker-registry && chmod +x /opt/stasis/bin/docker-registry
    mkdir -p /opt/skopeo && xz -dc .device/skopeo.xz >/opt/skopeo/skopeo && chmod +x /opt/skopeo/skopeo
    cp -r .device/skopeo-lib /opt/skopeo/lib
    printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/skopeo/lib exec /opt/skopeo/skopeo "$@"\n' >/opt/stasis/bin/skopeo && chmod +x /opt/stasis/bin/skopeo
    skopeo --version >/dev/null 2>&1 || { echo "skopeo does not run here: $(skopeo --version 2>&1 | head -n 1)"; return 1; }
}

# A registry on 127.0.0.1:PORT storing in DIR, plain HTTP; prints its PID.
start_registry() {  # DIR PORT
    mkdir -p "$1"
    printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' "$1/data" "$2" >"$1/config.yml"
    docker-registry serve "$1/config.yml" >"$1/log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && break; sleep 0.1; done
    echo "$pid"
}

# BERT-large under the agent, checkpointed at step 15 into a store on /dev/shm, then bench/registry.sh: stasis
# push and pull beside skopeo copy of the same blobs, the registry on this machine's disk; the checkpoint
# pulled into an empty store is restored and must train on to the reference's 30 losses.
section_registrybench() {
    local why; why=$(ensure_registry_tools) || { fail "registry tools" "$why"; return; }
    local ref; ref=$(bert_reference large "") || { fail "registry bert-large reference run" "did not finish"; return; }
    export STASIS_STORE=/dev/shm/stasis-registry-store
    local pulled_store=/dev/shm/stasis-registry-store-b
    rm -rf $STASIS_STORE $pulled_store
    local run; run=$(mktemp -d /tmp/stasis-registry-bert.XXXXXX)
    local pid; pid=$(CUBLAS_WORKSPACE_CONFIG=:4096:8 $RUN python3 Workloads/torch/bert_train.py --dir "$run" --size large --steps 30 --pause-at 15 --daemon) \
        || { fail "registry bert-large" "did not start: $(tail -n 5 "$run/log")"; return; }
    if ! $STASIS dump "$pid" -D "$run/ckpt" >"$run/dump.txt" 2>&1 || ! wait_gone "$pid"; then
        fail "registry bert-large checkpoint" "$(tail -n 5 "$run/dump.txt")"; kill_tree "$pid"; return
    fi
    if BIN=/opt/stasis/bin BENCH_DIR=/var/tmp CHECKPOINT=$run/ckpt STORE=$STASIS_STORE PULLED=$run/pulled PULLED_STORE=$pulled_store \
        timeout 500 bench/registry.sh >"$run/registry.txt" 2>&1; then
        cat "$run/registry.txt" | tee "$OUT/registry-bert-large.txt"
        if $STASIS restore "$run/pulled" --store $pulled_store >"$run/restore.txt" 2>&1; then
            touch "$run/go"
            for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
            cmp -s "$ref/losses.txt" "$run/losses.txt" \
                && pass "registry: BERT-large pushed, pulled into an empty store, restored: 30 losses identical; $(grep -h 'stasis p' "$run/registry.txt" | tr '\n' ' ')" \
                || fail "registry bert-large" "losses differ after the pulled restore: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' ')"
        else
            fail "registry bert-large restore of the pulled checkpoint" "$(tail -n 5 "$run/restore.txt")"
        fi
    else
        fail "registry bench (bert-large)" "$(tail -n 8 "$run/registry.txt")"
    fi
    keep_logs "$run" "registry-bert"
    [[ -e /proc/$pid ]] && kill_tree "$pid"
    rm -rf "$run" $STASIS_STORE $pulled_store
    unset STASIS_STORE
}
