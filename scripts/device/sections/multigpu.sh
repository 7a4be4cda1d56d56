# Sourced by scripts/device-test.sh (scripts/device/lib.sh's helpers). What each section needs, checked first:
# gpus=N (at least N GPUs), torch (PyTorch), runc, ip.
needs_multigpu="gpus=2 torch"
needs_ncclrefuse="gpus=2 torch"

section_multigpu() {
    local STASIS="timeout 200 /opt/stasis/bin/stasis"
    local gpus; gpus=$(nvidia-smi -L | wc -l)
    if (( gpus < 2 )); then fail "multigpu" "needs two GPUs, this machine has $gpus"; return; fi
    export STASIS_STORE=/dev/shm/stasis-multi-store
    rm -rf $STASIS_STORE
    multi_gpu_case "two GPUs, one process" Workloads/torch/two_gpu_train.py "" ""
    multi_gpu_case "two GPUs, one process, restored with the GPUs swapped" Workloads/torch/two_gpu_train.py "" "--gpu-map 0=1,1=0"
    multi_gpu_case "two GPUs, one process, under stasis run" Workloads/torch/two_gpu_train.py "$RUN" ""
    # The same state on one GPU, for the comparison of one GPU against two.
    multi_gpu_case "the split model on one GPU, under stasis run (for the comparison)" Workloads/torch/two_gpu_train.py "$RUN" "" --devices cuda:0,cuda:0
    # NCCL's peer-to-peer transport shares device memory between the ranks; driver 580 checkpoints it but
    # cannot restore it (CUDA_ERROR_NOT_SUPPORTED, seen here): refused up front, by stasis or by the agents.
    # Without it (NCCL_P2P_DISABLE=1, and NCCL_CUMEM_ENABLE=0 for host buffers the driver allocates) what passes between the GPUs is host memory, and the job checkpoints.
    multi_gpu_case "NCCL data-parallel BERT-base, two processes, no P2P" Workloads/torch/ddp_bert_train.py \
        "env NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0" "" --gpus 2
    multi_gpu_case "NCCL data-parallel BERT-base, two processes, no P2P, under stasis run" Workloads/torch/ddp_bert_train.py \
        "env NCCL_P2P_DISABLE=1 NCCL_CUMEM_ENABLE=0 $RUN" "" --gpus 2
    multi_gpu_refused "NCCL with P2P refused" "peer-to-peer" Workloads/torch/ddp_bert_train.py "" --gpus 2
    multi_gpu_refused "NCCL with P2P under stasis run refused by the agents" "NCCL P2P" Workloads/torch/ddp_bert_train.py "$RUN" --gpus 2
    # Two GPUs at once against one: BERT-base on one GPU, then the two-process job (the same model per GPU).
    multi_gpu_case "one GPU, BERT-base (for the comparison)" Workloads/torch/bert_train.py "$RUN" "" --size base
    rm -rf $STASIS_STORE
    unset STASIS_STORE
}

# Only the driver path's refusal of NCCL with P2P (section multigpu has it among the rest).
section_ncclrefuse() {
    multi_gpu_refused "NCCL with P2P refused" "peer-to-peer" Workloads/torch/ddp_bert_train.py "" --gpus 2
}
