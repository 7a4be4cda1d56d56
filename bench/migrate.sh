#!/usr/bin/env bash
# Live migration over a veth link between two hosts on this machine (the root namespaces, and a receiver in
# network and PID namespaces of its own): downtime and bytes of `stasis migrate` against CRIU's own
# page-server transfer (`criu dump --page-server` into `criu page-server`, the other images copied, `criu
# restore` there), in the same run, on the same kind of job.
#
#   bench/migrate.sh cpu [MIB]     a CPU process holding MIB (default 2048) of random memory
#   bench/migrate.sh tls [MIB] [ROUNDS]   the CPU job migrated in clear and over TLS 1.3, alternately,
#                                  ROUNDS times (default 3): the median downtime of each and their ratio
#   bench/migrate.sh bert          BERT-base training, paused between steps (on a GPU machine; the
#                                  baseline then loads the stasis CRIU plugin, the driver's checkpoint as
#                                  CRIU's cuda plugin does it)
#
# Rows: CRIU page-server; stasis migrate (driver path for GPU jobs); the same over TLS 1.3 (--tls, each end
# pinning the other's certificate); stasis migrate of a job under `stasis
# run` (GPU only: the agent moves device memory); and the same job again into the receiver's store, which
# then has most chunks. Each row starts a fresh job and a fresh receiver (whose store is fresh but for the
# last row). Downtime is from the start of the dump to the receiver's restore having returned (for the
# baseline with a GPU, before its plugin's helper has given the GPU back). Needs root, CRIU, ip, unshare.
# STASIS, WORKLOAD and PLUGINS name the binaries (default: this build's release products).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
KIND=${1:-cpu}
MIB=${2:-2048}
BIN=$(swift build -c release --show-bin-path 2>/dev/null || echo .build/release)
STASIS=${STASIS:-$BIN/stasis}
WORKLOAD=${WORKLOAD:-$BIN/stasis-workload}
PLUGINS=${PLUGINS:-.build/criu-plugins}
work=$(mktemp -d /dev/shm/stasis-migrate-bench.XXXXXX)
ns=stasis-bench-$$
here=10.250.$(( $$ % 250 )).1 there=10.250.$(( $$ % 250 )).2
receiver="" job=""

cleanup() {
    [[ -n $job ]] && kill -9 "$job" 2>/dev/null
    [[ -n $receiver ]] && kill -9 "$receiver" 2>/dev/null
    ip link del smb$$a 2>/dev/null; ip netns del $ns 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add $ns
ip link add smb$$a type veth peer name smb$$b
ip link set smb$$b netns $ns
ip addr add $here/24 dev smb$$a && ip link set smb$$a up
ip -n $ns addr add $there/24 dev smb$$b && ip -n $ns link set smb$$b up && ip -n $ns link set lo up
head -c 32 /dev/urandom | base64 >"$work/token" && chmod 600 "$work/token"

now() { date +%s%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
wait_gone() { for _ in $(seq 1000); do [[ -e /proc/$1 ]] || return 0; sleep 0.01; done; echo "PID $1 did not go away" >&2; exit 1; }

# Runs COMMAND as the receiver: in its network namespace and a new PID namespace whose init outlives it.
start_receiver() {
    ip netns exec $ns unshare --pid --fork --kill-child --mount-proc sh -c "$1; sleep 100000" &
    receiver=$!
    sleep 1
}
stop_receiver() { kill -9 "$receiver" 2>/dev/null; wait "$receiver" 2>/dev/null || true; receiver=""; }

start_job() {  # LAUNCHER -> sets job
    local dir; dir=$(mktemp -d "$work/job.XXXXXX")
    if [[ $KIND != bert ]]; then
        job=$($1 "$WORKLOAD" counter --dir "$dir" --daemon --mem "$MIB" --fill random)
    else
        job=$($1 python3 Workloads/torch/bert_train.py --dir "$dir" --size base --steps 1000 --pause-at 5 --daemon)
    fi
}

criu_row() {
    start_job ""
    local plugin=(); [[ $KIND == bert ]] && plugin=(-L "$PLUGINS")
    mkdir -p "$work/src" "$work/dst"
    ip netns exec $ns criu page-server -D "$work/dst" --address $there --port 7100 -d -o ps.log >/dev/null 2>&1
    local t; t=$(now)
    criu dump -t "$job" -D "$work/src" --page-server --address $there --port 7100 "${plugin[@]}" --ghost-limit 1G -o dump.log -v2 \
        || { tail "$work/src/dump.log" >&2; exit 1; }
    cp -a "$work/src/." "$work/dst/"
    wait_gone "$job"
    start_receiver "criu restore -D $work/dst -d ${plugin[*]} -o restore.log -v2 && touch $work/restored"
    for _ in $(seq 3000); do [[ -e $work/restored ]] && break; sleep 0.01; done
    local downtime; downtime=$(elapsed "$t")
    # The sleep that start_receiver waits before restoring is not the baseline's: take it off.
    downtime=$(awk -v d="$downtime" 'BEGIN { printf "%.3f", d - 1 }')
    [[ -e $work/restored ]] || { echo "criu restore failed:" >&2; tail "$work/dst/restore.log" >&2; exit 1; }
    local bytes; bytes=$(du -sb "$work/dst" | cut -f1)
    printf '| CRIU page-server | %.2f s | %s MiB | | |\n' "$downtime" "$(( bytes >> 20 ))"
    stop_receiver
    rm -rf "$work/src" "$work/dst" "$work/restored"
}

# TLS identities for the TLS row: each end pins the other's certificate.
fingerprint() { "$STASIS" serve --init-tls "$1" | sed -n 's/^fingerprint: //p'; }
print_here=$(fingerprint "$work/tls-here") print_there=$(fingerprint "$work/tls-there")
tls_here=(--tls "$work/tls-here" --tls-peer "$print_there")
tls_there="--tls $work/tls-there --tls-peer $print_here"

stasis_row() {  # LABEL LAUNCHER FRESH_STORE [tls]
    [[ $3 == fresh ]] && rm -rf "$work/store-there"
    local serve_tls="--insecure" migrate_tls=(--insecure)
    [[ ${4:-} == tls ]] && { serve_tls=$tls_there; migrate_tls=("${tls_here[@]}"); }
    start_receiver "$STASIS serve --listen $there:7070 --token-file $work/token --store $work/store-there --directory $work/received $serve_tls >>$work/serve.log"
    start_job "$2"
    rm -rf "$work/store-here"
    "$STASIS" migrate "$job" --to $there:7070 --token-file "$work/token" --store "$work/store-here" "${migrate_tls[@]}" --json >"$work/migrate.json" \
        || { echo "stasis migrate failed" >&2; exit 1; }
    python3 - "$1" "$work/migrate.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
mib = lambda b: b / 2**20
open(sys.argv[2] + ".rows", "a").write(f"{sys.argv[1]}\t{r['downtimeSeconds']}\t{r['dumpSeconds'] + r['transferSeconds']}\n")
print(f"| {sys.argv[1]} | {r['downtimeSeconds']:.2f} s | {mib(r['bytesSent']):.0f} MiB | {mib(r['bytesSkipped']):.0f} MiB | "
      f"checkpoint {r['dumpSeconds']:.2f} s ({mib(r.get('bytesSentDuringDump', 0)):.0f} MiB sent meanwhile), rest sent {r['transferSeconds']:.2f} s, restore {r['restoreSeconds']:.2f} s |")
PY
    stop_receiver
    job=""
}

if [[ $KIND == tls ]]; then
    echo "cpu job, $MIB MiB of random memory, in clear and over TLS 1.3 alternately; veth link $here -> $there"
    echo
    echo "| path | downtime | sent | skipped (receiver had it) | parts |"
    echo "| --- | --- | --- | --- | --- |"
    for round in $(seq "${3:-3}"); do
        stasis_row "in clear" "" fresh
        stasis_row "TLS 1.3" "" fresh tls
    done
    python3 - "$work/migrate.json.rows" <<'PY'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
median = lambda label, column: statistics.median(float(r[column]) for r in rows if r[0] == label)
plain, tls = median("in clear", 1), median("TLS 1.3", 1)
print(f"\nmedian downtime: in clear {plain:.2f} s, TLS 1.3 {tls:.2f} s: {100 * (tls - plain) / plain:+.1f}%")
# The bytes move during the checkpoint and the rest's transfer; the restore there starts once all are in and
# is the same work either way (its spread from run to run is larger than TLS's cost).
sending_plain, sending_tls = median("in clear", 2), median("TLS 1.3", 2)
print(f"median checkpoint + transfer: in clear {sending_plain:.2f} s, TLS 1.3 {sending_tls:.2f} s: "
      f"TLS adds {sending_tls - sending_plain:.2f} s, {100 * (sending_tls - sending_plain) / plain:+.1f}% of the median downtime in clear")
PY
    exit 0
fi
echo "$KIND job$([[ $KIND == cpu ]] && echo ", $MIB MiB of random memory"); veth link $here -> $there"
echo
echo "| path | downtime | sent | skipped (receiver had it) | parts |"
echo "| --- | --- | --- | --- | --- |"
criu_row
stasis_row "stasis migrate" "" fresh
if [[ $KIND == bert ]]; then
    stasis_row "stasis migrate, under stasis run (agent)" "$STASIS run --" fresh
    stasis_row "stasis migrate over TLS 1.3 (pinned certificates), under stasis run (agent)" "$STASIS run --" fresh tls
else
    stasis_row "stasis migrate over TLS 1.3 (pinned certificates)" "" fresh tls
fi
stasis_row "stasis migrate, the same job again (receiver has its chunks)" "$([[ $KIND == bert ]] && echo "$STASIS run --")" kept
