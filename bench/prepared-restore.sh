#!/usr/bin/env bash
# Time until a restored process runs again, three ways, on one process holding MIB MiB of random memory:
# plain `criu restore -d` from CRIU's own files (the baseline), `stasis restore` (streamed from the store),
# and `stasis activate` of a tree `stasis restore --prepare` restored ahead of time (the prepare's own time
# is reported beside it: it is spent before demand). ROUNDS rounds each, alternating, after one uncounted
# round of each; medians [min-max]. The workload verifies its memory after the last restore.
#
#   bench/prepared-restore.sh [MIB]     (default 1024; needs root, CRIU and a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
MIB=${1:-1024}
ROUNDS=${ROUNDS:-5}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
BIN=${BIN:-$(swift build -c release --show-bin-path)}
[[ -x $BIN/stasis ]] || { echo "build first: swift build -c release" >&2; exit 1; }
work=$(mktemp -d "$BENCH_DIR/stasis-prepared.XXXXXX")
pid=""
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; rm -rf "$work"' EXIT
export STASIS_STORE="$work/store"

now() { date +%s.%N; }
elapsed() { echo "$(now) - $1" | bc -l; }
wait_gone() { for _ in $(seq 500); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f s [%.3f-%.3f]", m, v[1], v[NR] }'; }

pid=$("$BIN/stasis-workload" memory --dir "$work" --daemon --mem "$MIB" --fill random)
mkdir "$work/img"
criu dump -t "$pid" -D "$work/img" -v4 -o dump.log --leave-running 2>/dev/null || { echo "criu dump failed" >&2; exit 1; }
"$BIN/stasis" dump "$pid" -D "$work/ckpt" >/dev/null
wait_gone "$pid"

criu_times=(); stasis_times=(); prepare_times=(); activate_times=()
for round in $(seq 0 "$ROUNDS"); do
    t=$(now); criu restore -D "$work/img" -d -v4 -o restore.log 2>/dev/null; c=$(elapsed "$t")
    kill -9 "$pid"; wait_gone "$pid"
    t=$(now); "$BIN/stasis" restore -D "$work/ckpt" -W "$work/w1" >/dev/null; s=$(elapsed "$t")
    kill -9 "$pid"; wait_gone "$pid"; rm -rf "$work/w1"
    t=$(now); "$BIN/stasis" restore -D "$work/ckpt" -W "$work/w2" --prepare >/dev/null; p=$(elapsed "$t")
    t=$(now); "$BIN/stasis" activate "$pid" >/dev/null; a=$(elapsed "$t")
    rm -rf "$work/w2"
    if [[ $round -gt 0 ]]; then criu_times+=("$c"); stasis_times+=("$s"); prepare_times+=("$p"); activate_times+=("$a"); fi
    [[ $round -lt $ROUNDS ]] && { kill -9 "$pid"; wait_gone "$pid"; }
done
rm -f "$work/result"; kill -USR1 "$pid"
for _ in $(seq 600); do [[ -e $work/result ]] && break; sleep 0.1; done
verdict=$(cat "$work/result" 2>/dev/null || echo "FAIL no answer")
[[ $verdict == PASS* ]] || { echo "workload check failed after the last activation: $verdict" >&2; exit 1; }

echo "| until the process runs again ($MIB MiB random) | median [min-max] |"
echo "| --- | --- |"
echo "| plain \`criu restore -d\` (files, page cache warm) | $(median "${criu_times[@]}") |"
echo "| \`stasis restore\` (streamed from the store) | $(median "${stasis_times[@]}") |"
echo "| \`stasis activate\` of a prepared tree | $(median "${activate_times[@]}") |"
echo "| (\`stasis restore --prepare\`, before demand) | $(median "${prepare_times[@]}") |"
echo
echo "date: $(date -u +%Y-%m-%dT%H:%MZ); host: $(nproc) cores; kernel $(uname -r); $(criu --version | head -n1); rounds: $ROUNDS; workload: $verdict"
