#!/usr/bin/env bash
# GPU benchmarks, run on the GPU machine from the repository root after scripts/device-pack.sh (as
# scripts/device-test.sh is): figures beside their baselines, not verdicts. Output under $OUT.
#
#   scripts/device-bench.sh SECTION...   bench (bench/gpu-dump-restore.sh: the baseline against stasis),
#                                        agentbench and agentcost (bench/agent-dump-restore.sh speed /
#                                        $AGENTCOST_PARTS), storebench (the chunk store's throughput on a BERT
#                                        checkpoint), migratebench (bench/migrate.sh bert)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device/lib.sh
source scripts/device/benchmarks.sh
[[ $# -gt 0 ]] || { sed -n '2,9p' "$0"; exit 2; }
run_sections "$@"
