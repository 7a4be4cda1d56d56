#!/usr/bin/env bash
# GPU acceptance tests, run on the GPU machine from the repository root, after scripts/device-pack.sh has
# filled .device/ here (the device tool carries it). Prints a PASS/FAIL line per case and a summary; logs go
# to $OUT (the device tool brings that folder back).
#
#   scripts/device-test.sh [SECTION...]     sections: cuda refuse gpumap plugin infer bert agent (default:
#                                           all), and, only when named: agentbig (BERT-large and 64 GiB under
#                                           the agent), container (GPU containers under runc),
#                                           multigpu (two GPUs: a split model and NCCL; needs two),
#                                           shared (device memory shared between processes under
#                                           `stasis run`: two and three processes, an exporter gone, one
#                                           outside the tree, --leave-running, 2 x 8 GiB),
#                                           reliability (stasis killed after CRIU's exit, a damaged
#                                           chunk not reused, bench/reuse-check.sh gpu), bertleave
#                                           (BERT-base's --leave-running case alone), leavedisk
#                                           (--leave-running into a store on the disk under the agent:
#                                           the stage in memory, one and two processes, BERT-base),
#                                           migrate (BERT moved by stasis migrate between namespaces, and
#                                           bench/migrate.sh bert), ncclrefuse (one part of multigpu, for a
#                                           short call),
#                                           orphan (stasis killed mid-dump under the agent: the job
#                                           puts its device memory back by itself, no resume run),
#                                           jax (a JAX job that keeps compiling, dumped with
#                                           --leave-running three times from its start, then dumped and
#                                           restored, through the driver and under the agent),
#                                           serve8b (an 8B Llama-architecture server: cold start against
#                                           restores from a disk store, warm and cold page cache, agent
#                                           and driver path; about 6 minutes, 40 GB of disk),
#                                           export and import (restore on another machine: export on one,
#                                           bring the pieces back from $OUT into .device/import/, import on
#                                           a new one), prepared (GPU restores prepared ahead of demand,
#                                           then activated), serve8bhost (the 8B server restored streamed,
#                                           rebuilt on /dev/shm, prepared, and from a registry; CRIU's
#                                           logs split), registrybench (BERT-large through a registry
#                                           beside skopeo; needs docker-registry and skopeo packed),
#                                           link (issue 29: the link, the ring and pinning measured
#                                           apart, then 32 GiB and BERT-large under the agent with
#                                           larger rings and the store's reserve; about 7 minutes).
#                                           The benchmarks are apart: scripts/device-bench.sh.
#
# cuda..bert take about 6 minutes on the H200 and agent about 3.5 (the device tool allows 10 per call: run
# them in two calls); agentbig about 2.5, bench about 5, agentbench about 5.
#
# The sections live in scripts/device/sections/ (each declares what it needs: GPUs, PyTorch, runc, ip; a section
# whose needs this machine does not meet is skipped, and said so), their helpers in scripts/device/lib.sh.
#
# Every workload verifies itself after the restore: the CUDA programs check their device memory, streams,
# events, graphs and pools; BERT's per-step losses must equal an uninterrupted run's byte for byte; the
# inference server must give the same answers.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device/lib.sh
for file in scripts/device/sections/*.sh; do source "$file"; done
SECTIONS=(${@:-cuda refuse gpumap plugin infer bert agent})
run_sections "${SECTIONS[@]}"
