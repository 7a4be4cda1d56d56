// The baseline's driver half: what NVIDIA's cuda-checkpoint does, one driver call per invocation, through
// the same CStasisCUDA steps stasis uses. bench/gpu-dump-restore.sh pairs it with plain `criu`.
//   cuda-ckpt lock|checkpoint|restore|unlock PID
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "CStasisCUDA.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: cuda-ckpt lock|checkpoint|restore|unlock PID\n");
        return 2;
    }
    char error[256];
    if (stasis_cuda_load(error, sizeof error) != 0) {
        fprintf(stderr, "cuda-ckpt: %s\n", error);
        return 1;
    }
    int pid = atoi(argv[2]), result;
    if (!strcmp(argv[1], "lock")) result = stasis_cuda_lock(pid, 10000);
    else if (!strcmp(argv[1], "checkpoint")) result = stasis_cuda_checkpoint(pid);
    else if (!strcmp(argv[1], "restore")) result = stasis_cuda_restore(pid, NULL, 0);
    else if (!strcmp(argv[1], "unlock")) result = stasis_cuda_unlock(pid);
    else {
        fprintf(stderr, "cuda-ckpt: unknown action %s\n", argv[1]);
        return 2;
    }
    if (result != 0) fprintf(stderr, "cuda-ckpt: %s of %d: %s (%d)\n", argv[1], pid, stasis_cuda_error_name(result), result);
    return result != 0;
}
