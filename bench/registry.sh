#!/usr/bin/env bash
# Push and pull speed of a checkpoint through an OCI registry, beside skopeo moving the same blobs, in the
# same run: CNCF distribution (Debian's docker-registry) on the loopback address, plain HTTP, its storage on
# $BENCH_DIR (default /var/tmp, a disk).
#
#   bench/registry.sh [MEMORY_MIB]     (default: 1024; needs root, CRIU, docker-registry, skopeo, a release build)
#   CHECKPOINT=DIR STORE=S bench/registry.sh     a checkpoint made elsewhere (the GPU suite's BERT-large),
#                                                pulled and not restored: its caller restores it (PULLED=DIR)
#
# A stasis-workload process with MEMORY_MIB of random memory is checkpointed (or CHECKPOINT is taken); then,
# each into a repository of its own (a registry answers HEAD per repository, so nothing counts as already there):
#   stasis push            the checkpoint to repository a
#   skopeo copy (pull)     repository a to an OCI layout directory (the same blobs, downloaded)
#   stasis pull            repository a into an empty store, then restored (the workload checks its memory)
#   skopeo copy (push)     that OCI layout to repository c (the same blobs, uploaded)
# Rates are the blobs' bytes over the wall time of each command. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
MEMORY_MIB=${1:-1024}
BENCH_DIR=${BENCH_DIR:-/var/tmp}
BIN=${BIN:-$(swift build -c release --show-bin-path)}
[[ -x $BIN/stasis ]] || { echo "build first: swift build -c release" >&2; exit 1; }
work=$(mktemp -d "$BENCH_DIR/stasis-registry.XXXXXX")
pid=""; registry=""
trap '[[ -n "$pid" ]] && kill -9 $pid 2>/dev/null; [[ -n "$registry" ]] && kill -9 $registry 2>/dev/null; rm -rf "$work"' EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.3f", b / s / 1e9 }'; }

port=$((20000 + RANDOM % 20000))
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
host="127.0.0.1:$port"

if [[ -n ${CHECKPOINT:-} ]]; then
    export STASIS_STORE=$STORE
    checkpoint=$CHECKPOINT
    what="the checkpoint $(basename "$CHECKPOINT")"
else
    export STASIS_STORE="$work/store-a"
    checkpoint=$work/ckpt
    what="$MEMORY_MIB MiB random"
    pid=$("$BIN/stasis-workload" memory --dir "$work" --daemon --mem "$MEMORY_MIB" --fill random)
    "$BIN/stasis" dump "$pid" -D "$checkpoint" --json >"$work/dump.json"
    for _ in $(seq 500); do [[ -e /proc/$pid ]] || break; sleep 0.01; done
fi

t=$(now); "$BIN/stasis" push "$checkpoint" "$host/bench/a:one" --plain-http --json >"$work/push.json"; push_s=$(elapsed "$t")
bytes=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sentBytes"])' "$work/push.json")
blobs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sentBlobs"])' "$work/push.json")
# Each row as soon as it is measured: a bench cut short by a time limit still says what it measured.
echo "| $what, $blobs blobs, $((bytes / 1048576)) MiB | seconds | GB/s |"
echo "| --- | --- | --- |"
row() { printf '| %s | %.2f | %.2f |\n' "$1" "$2" "$(rate "$bytes" "$2")"; }
row "stasis push" "$push_s"
# --insecure-policy: no /etc/containers/policy.json is needed (the GPU machine has none).
t=$(now); skopeo --insecure-policy copy -q --src-tls-verify=false "docker://$host/bench/a:one" "oci:$work/layout:one"; skopeo_pull_s=$(elapsed "$t")
row "skopeo copy, the same blobs down (registry to OCI layout)" "$skopeo_pull_s"
pulled=${PULLED:-$work/pulled}
t=$(now); "$BIN/stasis" pull "$host/bench/a:one" -D "$pulled" --plain-http --store "${PULLED_STORE:-$work/store-b}" --json >"$work/pull.json"; pull_s=$(elapsed "$t")
row "stasis pull (into an empty store)" "$pull_s"
t=$(now); skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$work/layout:one" "docker://$host/bench/c:one"; skopeo_push_s=$(elapsed "$t")
row "skopeo copy, the same blobs up (OCI layout to registry)" "$skopeo_push_s"

# The workload restored twice, each time until it runs: from the pulled copy (after the pull above), and by
# `stasis restore REF` into another empty store (the restore reading while the pull goes on).
verdict="not restored here (the caller restores $pulled)"
check() {
    rm -f "$work/result"; kill -USR1 "$pid"
    for _ in $(seq 600); do [[ -e $work/result ]] && break; sleep 0.1; done
    cat "$work/result" 2>/dev/null || echo "FAIL no answer"
}
if [[ -z ${CHECKPOINT:-} ]]; then
    t=$(now); STASIS_STORE="$work/store-b" "$BIN/stasis" restore "$work/pulled" --json >/dev/null; restore_local_s=$(elapsed "$t")
    verdict=$(check)
    kill -9 "$pid"; for _ in $(seq 500); do [[ -e /proc/$pid ]] || break; sleep 0.01; done
    rm -rf "/var/lib/stasis/pulled/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$checkpoint/manifest.json")"
    t=$(now); "$BIN/stasis" restore "$host/bench/a:one" --plain-http --store "$work/store-c" --json >"$work/restore-ref.json"; restore_ref_s=$(elapsed "$t")
    verdict="$verdict; after stasis restore REF: $(check)"
    "$BIN/stasis" rm "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["directory"])' "$work/restore-ref.json")" --store "$work/store-c" >/dev/null
fi

if [[ -z ${CHECKPOINT:-} ]]; then
    printf '| stasis pull, then stasis restore of the pulled copy, until it runs | %.2f + %.2f = %.2f | |\n' "$pull_s" "$restore_local_s" \
        "$(awk -v a="$pull_s" -v b="$restore_local_s" 'BEGIN { print a + b }')"
    printf '| stasis restore REF into an empty store (restoring while it pulls), until it runs | %.2f | |\n' "$restore_ref_s"
fi
echo
echo "restored from the pulled checkpoint: $verdict"
[[ $verdict == PASS*PASS* || -n ${CHECKPOINT:-} ]]
