# Sourced by scripts/device-bench.sh: the benchmarks, apart from the tests (figures, not verdicts).
needs_bench="gpus=1"
needs_agentbench="gpus=1"
needs_agentcost="gpus=1"
needs_storebench="gpus=1"
needs_migratebench="gpus=1"

# Not a test: the baseline-against-stasis benchmark (bench/gpu-dump-restore.sh), when asked for by name.
section_bench() {
    STASIS=/opt/stasis/bin/stasis bench/gpu-dump-restore.sh 2>&1 | tee "$OUT/bench.txt"
}

# Not a test: the agent's benchmark (bench/agent-dump-restore.sh), when asked for by name.
section_agentbench() {
    STASIS=/opt/stasis/bin/stasis bench/agent-dump-restore.sh ${AGENTBENCH_PARTS:-speed} 2>&1 | tee "$OUT/agentbench.txt"
}
section_agentcost() {
    STASIS=/opt/stasis/bin/stasis bench/agent-dump-restore.sh ${AGENTCOST_PARTS:-memory overhead} 2>&1 | tee "$OUT/agentcost.txt"
}

# Not a test: the chunk store's throughput on this machine's cores with a BERT-large checkpoint
# (bench/store-device.sh), when asked for by name.
section_storebench() {
    [[ -f .device/stasis-store-bench.xz ]] || { fail "storebench" "not packed: STORE_BENCH=1 scripts/device-pack.sh"; return; }
    xz -dc .device/stasis-store-bench.xz >/opt/stasis/bin/stasis-store-bench && chmod +x /opt/stasis/bin/stasis-store-bench
    OUT=$OUT bench/store-device.sh 2>&1 | tee "$OUT/storebench.txt"
}

# Only bench/migrate.sh bert (section migrate runs it after its tests).
section_migratebench() {
    ensure_ip
    STASIS=/opt/stasis/bin/stasis WORKLOAD=/opt/stasis/bin/stasis-workload PLUGINS=/opt/stasis/criu-plugins \
        timeout 300 bench/migrate.sh bert 2>&1 | tee "$OUT/migrate-bench.txt"
}
