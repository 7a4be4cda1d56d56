// Compares our declarations of the checkpoint API's argument structures (CStasisCUDA) with the cuda.h of the
// machine it is compiled on. Built and run by scripts/device-test.sh; prints what it compared.
#include <cuda.h>
#include <stddef.h>
#include <stdio.h>

#include "CStasisCUDA.h"

int main(void) {
    int bad = 0;
#define SAME(what, ours, theirs)                                                              \
    do {                                                                                      \
        size_t a = (ours), b = (theirs);                                                      \
        printf("%-40s ours %3zu  cuda.h %3zu%s\n", what, a, b, a == b ? "" : "  MISMATCH"); \
        bad |= a != b;                                                                        \
    } while (0)
    SAME("sizeof(CUcheckpointRestoreArgs)", stasis_cuda_restore_args_size(), sizeof(CUcheckpointRestoreArgs));
    SAME("offsetof(gpuPairs)", 0, offsetof(CUcheckpointRestoreArgs, gpuPairs));
    SAME("offsetof(gpuPairsCount)", 8, offsetof(CUcheckpointRestoreArgs, gpuPairsCount));
    SAME("sizeof(CUcheckpointGpuPair)", sizeof(stasis_cuda_gpu_pair), sizeof(CUcheckpointGpuPair));
    SAME("offsetof(newUuid)", offsetof(stasis_cuda_gpu_pair, new_uuid), offsetof(CUcheckpointGpuPair, newUuid));
    SAME("sizeof(CUcheckpointLockArgs)", 64, sizeof(CUcheckpointLockArgs));
    SAME("offsetof(timeoutMs)", 0, offsetof(CUcheckpointLockArgs, timeoutMs));
    SAME("sizeof(CUcheckpointCheckpointArgs)", 64, sizeof(CUcheckpointCheckpointArgs));
    SAME("sizeof(CUcheckpointUnlockArgs)", 64, sizeof(CUcheckpointUnlockArgs));
    SAME("CU_PROCESS_STATE_CHECKPOINTED", STASIS_CUDA_CHECKPOINTED, CU_PROCESS_STATE_CHECKPOINTED);
    printf("CUDA_VERSION %d\n", CUDA_VERSION);
    return bad;
}
