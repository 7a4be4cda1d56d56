// The NVIDIA driver's process checkpoint API, reached through dlopen("libcuda.so.1") at run time.
//
// One implementation of the driver steps (lock, checkpoint, restore with GPU remapping, unlock), used by the
// stasis command (through Swift) and by the stasis CRIU plugin. The declarations below are ours, written from
// the CUDA driver API reference (cuda.h of CUDA 13.0); nothing here needs CUDA's headers to build.
#ifndef C_STASIS_CUDA_H
#define C_STASIS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// CUprocessState.
enum stasis_cuda_state {
    STASIS_CUDA_RUNNING = 0,
    STASIS_CUDA_LOCKED = 1,
    STASIS_CUDA_CHECKPOINTED = 2,
    STASIS_CUDA_FAILED = 3,
};

/// CUresult values we act on.
enum {
    STASIS_CUDA_SUCCESS = 0,
    STASIS_CUDA_ERROR_INVALID_VALUE = 1,
    STASIS_CUDA_ERROR_NOT_INITIALIZED = 3,
    STASIS_CUDA_ERROR_NOT_FOUND = 500,
    STASIS_CUDA_ERROR_NOT_SUPPORTED = 801,
    STASIS_CUDA_ERROR_TIMEOUT = 909,
    /// Ours: the library or the entry point is missing.
    STASIS_CUDA_ERROR_NO_DRIVER = -1,
};

/// A GPU of the checkpoint and the GPU it is restored onto, by 16-byte UUID (CUcheckpointGpuPair).
typedef struct {
    uint8_t old_uuid[16];
    uint8_t new_uuid[16];
} stasis_cuda_gpu_pair;

/// Loads libcuda.so.1 and calls cuInit once; safe to call repeatedly and from several threads. Returns 0, or
/// writes why into `error` (NUL-terminated, at most `length` bytes) and returns -1.
int stasis_cuda_load(char *error, size_t length);

/// 1 when libcuda.so.1 could be loaded (even if cuInit then failed).
int stasis_cuda_library_loaded(void);

/// The driver API version (1000 * major + 10 * minor), or -1.
int stasis_cuda_driver_version(void);

/// 1 when the driver has every entry point of the process checkpoint API.
int stasis_cuda_has_checkpoint_api(void);

/// "CUDA_ERROR_NOT_SUPPORTED" and so on; never NULL.
const char *stasis_cuda_error_name(int result);

// Each returns a CUresult (0 on success).
int stasis_cuda_get_state(int pid, int *state);
int stasis_cuda_get_restore_thread(int pid, int *tid);
int stasis_cuda_lock(int pid, unsigned int timeout_ms);
int stasis_cuda_checkpoint(int pid);
/// Restores, remapping GPUs by UUID when `count` > 0 (drivers of API 12.9 and later; older ones get
/// STASIS_CUDA_ERROR_NOT_SUPPORTED for a remap).
int stasis_cuda_restore(int pid, const stasis_cuda_gpu_pair *pairs, unsigned int count);
int stasis_cuda_unlock(int pid);
/// Puts a process back to running from whatever state the steps left it in (restore if checkpointed, then
/// unlock if locked); every rollback uses it.
int stasis_cuda_resume(int pid);

/// The number of GPUs the driver sees; a CUresult.
int stasis_cuda_device_count(int *count);

/// Name (NUL-terminated, at most `name_length` bytes), 16-byte UUID and total memory of GPU `index`; a CUresult.
int stasis_cuda_device_info(int index, char *name, size_t name_length, uint8_t uuid[16], size_t *total_bytes);

/// Size in bytes of our CUcheckpointRestoreArgs, for a layout check against cuda.h where it exists.
size_t stasis_cuda_restore_args_size(void);

#ifdef __cplusplus
}
#endif
#endif
