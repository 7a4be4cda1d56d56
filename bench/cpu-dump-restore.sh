#!/usr/bin/env bash
# Dump and restore throughput of stasis against plain CRIU, in the same run, on one process holding
# 1, 4 and 8 GiB of anonymous memory filled with random or zero bytes.
#
#   bench/cpu-dump-restore.sh [SIZES_GIB...]     (default: 1 4 8; needs root, CRIU and a release build)
#
# For each size and fill, one workload process is started and then checkpointed and restored in turn by
# plain `criu dump` / `criu restore -d` and by `stasis dump` / `stasis restore`, alternating, ROUNDS times
# each (and stasis dumping with its pages through files, the path before the page server), after one uncounted plain-CRIU warm-up round (the first dump of freshly written memory is slower
# for everyone). Both log at level 4; images (and stasis's chunk store, fresh each round) go to $BENCH_DIR
# (default /var/tmp, a disk) and are read back from the page cache; stasis streams CRIU its images from the store. The workload verifies its memory after the last restore. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
SIZES=(${@:-1 4 8})
ROUNDS=${ROUNDS:-2}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
BIN=$(swift build -c release --show-bin-path)
[[ -x $BIN/stasis ]] || { echo "build first: swift build -c release" >&2; exit 1; }
work=$(mktemp -d "$BENCH_DIR/stasis-bench.XXXXXX")
pid=""
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; rm -rf "$work"' EXIT

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
# Waits until the PID is gone (a VM's init reaps orphans slowly), as a restore with the same PID needs.
wait_gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }
avg() { printf '%s\n' "$@" | awk '{ s += $1 } END { printf "%.2f", s / NR }'; }

criu_round() {
    rm -rf "$work/img"; mkdir "$work/img"
    local t; t=$(now)
    criu dump -t "$pid" -D "$work/img" -v4 -o dump.log 2>/dev/null || { echo "criu dump failed" >&2; tail "$work/img/dump.log" >&2; exit 1; }
    criu_dump+=("$(elapsed "$t")")
    wait_gone "$pid"
    t=$(now)
    criu restore -D "$work/img" -d -v4 -o restore.log 2>/dev/null || { echo "criu restore failed" >&2; tail "$work/img/restore.log" >&2; exit 1; }
    criu_restore+=("$(elapsed "$t")")
    image_bytes=$(du -sb "$work/img" | cut -f1)
    rm -rf "$work/img"
}

# stasis_round [files]: with "files", CRIU writes pages-*.img and stasis follows it (STASIS_DUMP_PAGES=files,
# the path before the page server); the restore is the same either way and counted only for the default.
stasis_round() {
    # A fresh chunk store each round: every chunk is written, as on a job's first checkpoint.
    export STASIS_STORE="$work/store"
    rm -rf "$work/ckpt" "$STASIS_STORE"
    local t; t=$(now)
    if [[ ${1:-} == files ]]; then
        STASIS_DUMP_PAGES=files "$BIN/stasis" dump "$pid" -D "$work/ckpt" --json >"$work/dump.json"
        files_dump+=("$(elapsed "$t")")
        wait_gone "$pid"
        "$BIN/stasis" restore -D "$work/ckpt" -W "$work/restore-work" --json >"$work/restore.json"
        rm -rf "$work/ckpt" "$work/restore-work" "$STASIS_STORE"
        return
    fi
    "$BIN/stasis" dump "$pid" -D "$work/ckpt" --json >"$work/dump.json"
    stasis_dump+=("$(elapsed "$t")")
    stasis_hash+=("$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["timings"]; print(t["hash"] + t["sync"])' "$work/dump.json")")
    stored_bytes=$(du -sbc "$work/ckpt" "$STASIS_STORE" | tail -n 1 | cut -f1)
    wait_gone "$pid"
    t=$(now)
    "$BIN/stasis" restore -D "$work/ckpt" -W "$work/restore-work" --json >"$work/restore.json"
    stasis_restore+=("$(elapsed "$t")")
    stasis_verify+=("$(python3 -c 'import json,sys; t=json.load(open(sys.argv[1]))["timings"]; print(t["verify"] + t["rebuild"])' "$work/restore.json")")
    rm -rf "$work/ckpt" "$work/restore-work" "$STASIS_STORE"
}

echo "| memory | fill | criu dump | stasis dump (chunking tail+sync) | dump ratio | stasis dump, pages through files (ratio) | criu restore | stasis restore (verify) | restore ratio | criu image | stasis stored |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for gib in "${SIZES[@]}"; do
    for fill in random zero; do
        criu_dump=(); criu_restore=(); stasis_dump=(); stasis_restore=(); stasis_hash=(); stasis_verify=(); files_dump=()
        pid=$("$BIN/stasis-workload" memory --dir "$work" --daemon --mem $((gib * 1024)) --fill "$fill")
        criu_round; criu_dump=(); criu_restore=()   # warm-up, not counted
        for _ in $(seq "$ROUNDS"); do criu_round; stasis_round files; stasis_round; done
        rm -f "$work/result"; kill -USR1 "$pid"
        for _ in $(seq 600); do [[ -e $work/result ]] && break; sleep 0.1; done
        verdict=$(cat "$work/result" 2>/dev/null || echo "FAIL no answer")
        [[ $verdict == PASS* ]] || { echo "workload check failed after the last restore: $verdict" >&2; exit 1; }
        kill -9 "$pid"; wait_gone "$pid"; pid=""
        cd_=$(avg "${criu_dump[@]}"); sd=$(avg "${stasis_dump[@]}"); sh=$(avg "${stasis_hash[@]}"); fd=$(avg "${files_dump[@]}")
        cr=$(avg "${criu_restore[@]}"); sr=$(avg "${stasis_restore[@]}"); sv=$(avg "${stasis_verify[@]}")
        gbps() { echo "$gib * 1.073741824 / $1" | bc -l | xargs printf '%.2f'; }
        mib() { echo "$1 / 1048576" | bc -l | xargs printf '%.0f MiB'; }
        printf '| %d GiB | %s | %s s (%s GB/s) | %s s (%s s) (%s GB/s) | %.2fx | %s s (%.2fx) | %s s (%s GB/s) | %s s (%s s) (%s GB/s) | %.2fx | %s | %s |\n' \
            "$gib" "$fill" "$cd_" "$(gbps "$cd_")" "$sd" "$sh" "$(gbps "$sd")" "$(echo "$sd / $cd_" | bc -l)" "$fd" "$(echo "$fd / $cd_" | bc -l)" \
            "$cr" "$(gbps "$cr")" "$sr" "$sv" "$(gbps "$sr")" "$(echo "$sr / $cr" | bc -l)" "$(mib "$image_bytes")" "$(mib "$stored_bytes")"
    done
done
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r); $(criu --version | head -n1); images in $BENCH_DIR ($(df --output=source "$BENCH_DIR" | tail -n1)); rounds: $ROUNDS"
