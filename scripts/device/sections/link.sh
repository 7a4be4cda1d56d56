# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). Issue 29: device memory at the link's
# speed. Figures first (bench/transfer-probe.c: the link, copies through a ring, pinning, the CPU's part of a
# store in memory), then bench/agent-dump-restore.sh link: 32 GiB under the agent through its ring, with and
# without the store's reserve, and through an arena (`stasis run --arena`), each restore verified by the
# workload; BERT-large likewise.
needs_link="gpus=1 torch"

section_link() {
    gcc -O2 -pthread -o /opt/stasis/bin/transfer-probe bench/transfer-probe.c -ldl || { fail "link probe" "does not build"; return; }
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%MZ); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader); $(nproc) cores"
        echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled); hugetlb pages: $(cat /proc/sys/vm/nr_hugepages)"
        DIR=/dev/shm/stasis-transfer-probe timeout 300 /opt/stasis/bin/transfer-probe link pieces
    } 2>&1 | tee "$OUT/link-probe.txt"
    [[ ${PIPESTATUS[0]} == 0 ]] && pass "link probe ran" || fail "link probe" "$(tail -n 3 "$OUT/link-probe.txt")"
    STASIS=/opt/stasis/bin/stasis timeout 420 bench/agent-dump-restore.sh link 2>&1 | tee "$OUT/link-bench.txt"
    local line
    while read -r line; do
        case $line in
            *": PASS"*) pass "link: 32 GiB restored and verified, $line" ;;
            *) fail "link: 32 GiB" "$line" ;;
        esac
    done < <(grep -E '^(ring|arena), reserve' "$OUT/link-bench.txt")
    grep -qE '^(ring|arena), reserve' "$OUT/link-bench.txt" || fail "link bench" "no restore was verified: $(tail -n 5 "$OUT/link-bench.txt")"
    # The arena must have carried the evacuation (else the agent fell back to its ring, and says why in its log).
    grep -q 'chunks from arena pieces' "$OUT/link-bench.txt" && pass "link: the arena carried an evacuation" \
        || fail "link: arena" "no evacuation went through the arena: $(grep -h 'arena' "$OUT/link-bench.txt" | tail -n 3)"
}
