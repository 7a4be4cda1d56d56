# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_migrate="gpus=1 torch ip"

section_migrate() {
    ensure_ip
    local ns=stasis-dev-migrate here=10.251.0.1 there=10.251.0.2
    ip netns add $ns && ip link add sdm0 type veth peer name sdm1 && ip link set sdm1 netns $ns \
        && ip addr add $here/24 dev sdm0 && ip link set sdm0 up && ip -n $ns addr add $there/24 dev sdm1 \
        && ip -n $ns link set sdm1 up && ip -n $ns link set lo up || { fail "migrate" "cannot make the network namespaces: $(ip -V 2>&1)"; return; }
    local token=/tmp/stasis-migrate-token
    head -c 32 /dev/urandom | base64 >$token && chmod 600 $token
    local ref; ref=$(bert_reference base "") || { fail "migrate reference run" "did not finish"; return; }
    # TLS identities for the agent-tls case: each end pins the other's certificate.
    rm -rf /tmp/stasis-tls-here /tmp/stasis-tls-there
    local print_here print_there
    print_here=$($STASIS serve --init-tls /tmp/stasis-tls-here | sed -n 's/^fingerprint: //p')
    print_there=$($STASIS serve --init-tls /tmp/stasis-tls-there | sed -n 's/^fingerprint: //p')
    local label launcher serve_tls migrate_tls
    for label in driver agent agent-tls; do
        launcher=""; [[ $label == agent* ]] && launcher=$RUN
        serve_tls="--insecure"; migrate_tls=(--insecure)
        if [[ $label == agent-tls ]]; then
            serve_tls="--tls /tmp/stasis-tls-there --tls-peer $print_here"
            migrate_tls=(--tls /tmp/stasis-tls-here --tls-peer "$print_there")
        fi
        local run; run=$(mktemp -d /tmp/stasis-migrate-$label.XXXXXX)
        rm -rf /dev/shm/stasis-mig-there /dev/shm/stasis-mig-here
        ip netns exec $ns unshare --pid --fork --kill-child --mount-proc sh -c \
            "/opt/stasis/bin/stasis serve --listen $there:7070 --token-file $token --store /dev/shm/stasis-mig-there --directory /dev/shm/stasis-mig-received $serve_tls >$run/serve.txt 2>&1; sleep 100000" &
        local receiver=$!
        sleep 1
        local pid; pid=$($launcher python3 Workloads/torch/bert_train.py --dir "$run" --size base --steps 30 --pause-at 15 --daemon) \
            || { fail "migrate ($label)" "did not start: $(tail -n 5 "$run/log")"; kill -9 $receiver; continue; }
        if $STASIS migrate "$pid" --to $there:7070 --token-file $token --store /dev/shm/stasis-mig-here "${migrate_tls[@]}" >"$run/migrate.txt" 2>&1 && wait_gone "$pid"; then
            touch "$run/go"
            for _ in $(seq 1200); do [[ -e $run/done ]] && break; sleep 0.1; done
            if cmp -s "$ref/losses.txt" "$run/losses.txt"; then
                pass "migrate BERT-base ($label) to another network and PID namespace: 30 losses identical; $(sed 's/^ *//' "$run/migrate.txt" | tr '\n' ' ')"
            else
                fail "migrate ($label)" "losses differ: $(diff "$ref/losses.txt" "$run/losses.txt" | head -n 4 | tr '\n' ' '); $(tail -n 3 "$run/log")"
            fi
        else
            fail "migrate ($label)" "$(tail -n 6 "$run/migrate.txt" | tr '\n' ' '); receiver: $(tail -n 3 "$run/serve.txt" | tr '\n' ' ')"
            [[ -e /proc/$pid ]] && kill_tree "$pid"
        fi
        cp "$run/migrate.txt" "$LOGS/migrate-$label.txt" 2>/dev/null; cp "$run/serve.txt" "$LOGS/migrate-$label-serve.txt" 2>/dev/null
        kill -9 $receiver 2>/dev/null; wait $receiver 2>/dev/null
    done
    ip link del sdm0 2>/dev/null; ip netns del $ns 2>/dev/null
    rm -rf /dev/shm/stasis-mig-*
    STASIS=/opt/stasis/bin/stasis WORKLOAD=/opt/stasis/bin/stasis-workload PLUGINS=/opt/stasis/criu-plugins \
        timeout 300 bench/migrate.sh bert 2>&1 | tee "$OUT/migrate-bench.txt"
}
