// See CStasisCUDA.h. Entry points are resolved once and cached; every call is safe from any thread.
#define _GNU_SOURCE
#include "CStasisCUDA.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

// The argument structures of CUDA 13.0's cuda.h, declared here. Each is 64 bytes; reserved fields are zero.
typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    uint64_t reserved1[7];
} lock_args;

typedef struct {
    uint64_t reserved[8];
} plain_args;

// Since API 12.9 the restore arguments start with the GPU remapping table; before, they were all reserved.
typedef struct {
    stasis_cuda_gpu_pair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(stasis_cuda_gpu_pair *)];
    uint64_t reserved1;
} restore_args;

_Static_assert(sizeof(lock_args) == 64, "CUcheckpointLockArgs is 64 bytes");
_Static_assert(sizeof(plain_args) == 64, "CUcheckpoint{Checkpoint,Unlock}Args are 64 bytes");
_Static_assert(sizeof(restore_args) == 64, "CUcheckpointRestoreArgs is 64 bytes");

typedef int (*init_fn)(unsigned int);
typedef int (*version_fn)(int *);
typedef int (*error_name_fn)(int, const char **);
typedef int (*pid_int_fn)(int, int *);
typedef int (*pid_args_fn)(int, void *);
typedef int (*count_fn)(int *);
typedef int (*device_get_fn)(int *, int);
typedef int (*device_name_fn)(char *, int, int);
typedef int (*device_uuid_fn)(uint8_t *, int);
typedef int (*device_memory_fn)(size_t *, int);

static struct {
    void *handle;
    int version;
    init_fn init;
    version_fn driver_version;
    error_name_fn error_name;
    pid_int_fn get_state;
    pid_int_fn get_restore_thread;
    pid_args_fn lock, checkpoint, restore, unlock;
    count_fn device_count;
    device_get_fn device_get;
    device_name_fn device_name;
    device_uuid_fn device_uuid;
    device_memory_fn device_memory;
    char error[256];
    int loaded;  // 1 loaded, -1 failed
} driver;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;

static void load(void) {
    driver.handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!driver.handle) {
        snprintf(driver.error, sizeof driver.error, "cannot load libcuda.so.1 (%s)", dlerror());
        driver.loaded = -1;
        return;
    }
    driver.init = (init_fn)dlsym(driver.handle, "cuInit");
    driver.driver_version = (version_fn)dlsym(driver.handle, "cuDriverGetVersion");
    driver.error_name = (error_name_fn)dlsym(driver.handle, "cuGetErrorName");
    driver.get_state = (pid_int_fn)dlsym(driver.handle, "cuCheckpointProcessGetState");
    driver.get_restore_thread = (pid_int_fn)dlsym(driver.handle, "cuCheckpointProcessGetRestoreThreadId");
    driver.lock = (pid_args_fn)dlsym(driver.handle, "cuCheckpointProcessLock");
    driver.checkpoint = (pid_args_fn)dlsym(driver.handle, "cuCheckpointProcessCheckpoint");
    driver.restore = (pid_args_fn)dlsym(driver.handle, "cuCheckpointProcessRestore");
    driver.unlock = (pid_args_fn)dlsym(driver.handle, "cuCheckpointProcessUnlock");
    driver.device_count = (count_fn)dlsym(driver.handle, "cuDeviceGetCount");
    driver.device_get = (device_get_fn)dlsym(driver.handle, "cuDeviceGet");
    driver.device_name = (device_name_fn)dlsym(driver.handle, "cuDeviceGetName");
    driver.device_uuid = (device_uuid_fn)dlsym(driver.handle, "cuDeviceGetUuid_v2");
    if (!driver.device_uuid) driver.device_uuid = (device_uuid_fn)dlsym(driver.handle, "cuDeviceGetUuid");
    driver.device_memory = (device_memory_fn)dlsym(driver.handle, "cuDeviceTotalMem_v2");
    if (!driver.init || !driver.driver_version) {
        snprintf(driver.error, sizeof driver.error, "libcuda.so.1 lacks cuInit or cuDriverGetVersion");
        driver.loaded = -1;
        return;
    }
    int result = driver.init(0);
    if (result != 0) {
        const char *name = NULL;
        if (driver.error_name) driver.error_name(result, &name);
        snprintf(driver.error, sizeof driver.error, "cuInit failed: %s (%d)", name ? name : "unknown", result);
        driver.loaded = -1;
        return;
    }
    if (driver.driver_version(&driver.version) != 0) driver.version = -1;
    driver.loaded = 1;
}

int stasis_cuda_load(char *error, size_t length) {
    pthread_once(&load_once, load);
    if (driver.loaded == 1) return 0;
    if (error && length) snprintf(error, length, "%s", driver.error);
    return -1;
}

int stasis_cuda_library_loaded(void) {
    stasis_cuda_load(NULL, 0);
    return driver.handle != NULL;
}

int stasis_cuda_driver_version(void) { return stasis_cuda_load(NULL, 0) == 0 ? driver.version : -1; }

int stasis_cuda_has_checkpoint_api(void) {
    return stasis_cuda_load(NULL, 0) == 0 && driver.get_state && driver.get_restore_thread && driver.lock &&
           driver.checkpoint && driver.restore && driver.unlock;
}

const char *stasis_cuda_error_name(int result) {
    if (result == STASIS_CUDA_ERROR_NO_DRIVER) return "no CUDA driver or no checkpoint API";
    const char *name = NULL;
    if (stasis_cuda_load(NULL, 0) == 0 && driver.error_name && driver.error_name(result, &name) == 0 && name) return name;
    return "CUDA_ERROR_UNKNOWN";
}

int stasis_cuda_get_state(int pid, int *state) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    return driver.get_state(pid, state);
}

int stasis_cuda_get_restore_thread(int pid, int *tid) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    return driver.get_restore_thread(pid, tid);
}

int stasis_cuda_lock(int pid, unsigned int timeout_ms) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    lock_args args;
    memset(&args, 0, sizeof args);
    args.timeoutMs = timeout_ms;
    return driver.lock(pid, &args);
}

int stasis_cuda_checkpoint(int pid) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    plain_args args;
    memset(&args, 0, sizeof args);
    return driver.checkpoint(pid, &args);
}

int stasis_cuda_restore(int pid, const stasis_cuda_gpu_pair *pairs, unsigned int count) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    restore_args args;
    memset(&args, 0, sizeof args);
    if (count > 0) {
        if (driver.version < 12090) return STASIS_CUDA_ERROR_NOT_SUPPORTED;
        args.gpuPairs = (stasis_cuda_gpu_pair *)pairs;
        args.gpuPairsCount = count;
    }
    return driver.restore(pid, &args);
}

int stasis_cuda_unlock(int pid) {
    if (!stasis_cuda_has_checkpoint_api()) return STASIS_CUDA_ERROR_NO_DRIVER;
    plain_args args;
    memset(&args, 0, sizeof args);
    return driver.unlock(pid, &args);
}

int stasis_cuda_resume(int pid) {
    int state, result;
    if ((result = stasis_cuda_get_state(pid, &state)) != 0) return result;
    if (state == STASIS_CUDA_CHECKPOINTED && (result = stasis_cuda_restore(pid, NULL, 0)) != 0) return result;
    if (state == STASIS_CUDA_CHECKPOINTED || state == STASIS_CUDA_LOCKED) return stasis_cuda_unlock(pid);
    return 0;
}

int stasis_cuda_device_count(int *count) {
    if (stasis_cuda_load(NULL, 0) != 0 || !driver.device_count) return STASIS_CUDA_ERROR_NO_DRIVER;
    return driver.device_count(count);
}

int stasis_cuda_device_info(int index, char *name, size_t name_length, uint8_t uuid[16], size_t *total_bytes) {
    if (stasis_cuda_load(NULL, 0) != 0 || !driver.device_get || !driver.device_name || !driver.device_uuid ||
        !driver.device_memory)
        return STASIS_CUDA_ERROR_NO_DRIVER;
    int device, result;
    if ((result = driver.device_get(&device, index)) != 0) return result;
    if ((result = driver.device_name(name, (int)name_length, device)) != 0) return result;
    if ((result = driver.device_uuid(uuid, device)) != 0) return result;
    return driver.device_memory(total_bytes, device);
}

size_t stasis_cuda_restore_args_size(void) { return sizeof(restore_args); }
