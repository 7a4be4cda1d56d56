// The real driver (libcuda.so.1, resolved once), the real dlsym, the agent's settings and its log.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

HIDDEN cuda_driver real;
HIDDEN agent_settings settings;
HIDDEN agent_counters counters;

static void report_counters(void) {
    uint64_t gated = 0, ungated = 0;
    gate_counts(&gated, &ungated);
    agent_log("at exit: %llu calls through the gate, %lu entry point lookups, %llu gated entry points (%llu left ungated), %lu backed cuMemAlloc, "
              "%lu left to the driver, %lu backed frees",
              (unsigned long long)gate_calls(), (unsigned long)counters.lookups, (unsigned long long)gated, (unsigned long long)ungated,
              (unsigned long)counters.allocations, (unsigned long)counters.driver_allocations, (unsigned long)counters.frees);
}

// Read by the exported dlsym (dlsym_x86_64.S) for RTLD_NEXT lookups.
HIDDEN void *(*stasis_libc_dlsym)(void *, const char *);
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static int driver_status = -1;

static size_t mib_setting(const char *name, size_t fallback) {
    const char *value = getenv(name);
    if (!value || !*value) return fallback;
    char *end;
    unsigned long long mib = strtoull(value, &end, 10);
    return *end ? fallback : (size_t)mib << 20;
}

/// A whole number from the environment, kept within [low, high]; `fallback` when unset or not a number.
static unsigned count_setting(const char *name, unsigned fallback, unsigned low, unsigned high) {
    const char *value = getenv(name);
    if (!value || !*value) return fallback;
    char *end;
    unsigned long long count = strtoull(value, &end, 10);
    if (*end) return fallback;
    return count < low ? low : count > high ? high : (unsigned)count;
}

static int off(const char *name) {
    const char *value = getenv(name);
    return value && (!strcmp(value, "off") || !strcmp(value, "0") || !strcmp(value, "no"));
}

/// The dlsym after ours: libc's, looked up by version so that this lookup does not find ours. Another
/// library's constructor may call dlsym before ours has run, hence callable from the exported dlsym too.
HIDDEN void *stasis_find_libc_dlsym(void) {
    if (!stasis_libc_dlsym) {
        void *found = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
        if (!found) found = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
        stasis_libc_dlsym = (void *(*)(void *, const char *))found;
    }
    return (void *)stasis_libc_dlsym;
}

__attribute__((constructor)) static void agent_init(void) {
    stasis_find_libc_dlsym();
    settings.enabled = !off("STASIS_AGENT");
    settings.back_allocations = !off("STASIS_AGENT_BACKING");
    settings.gpu_digests = !off("STASIS_AGENT_GPU_DIGESTS");
    settings.shared_ring = !off("STASIS_AGENT_SHARED_RING");
    settings.min_backed_bytes = mib_setting("STASIS_AGENT_MIN_BACKED_MIB", 2u << 20);
    settings.slot_bytes = 2u << 20;  // ChunkStore.chunkSize: a slot is one chunk
    size_t ring = mib_setting("STASIS_AGENT_RING_MIB", 64u << 20);
    // Between 4 slots and MAX_SLOTS (ring.c's tables): 8 MiB to 2 GiB.
    if (ring < 4 * settings.slot_bytes) ring = 4 * settings.slot_bytes;
    if (ring > (size_t)MAX_SLOTS * settings.slot_bytes) ring = (size_t)MAX_SLOTS * settings.slot_bytes;
    settings.slot_count = (unsigned)(ring / settings.slot_bytes);
    // Copy streams per device (1-8, ring.c's table): copies of one chunk each, spread over them.
    settings.streams = count_setting("STASIS_AGENT_STREAMS", 4, 1, 8);
    settings.huge_ring = !off("STASIS_AGENT_RING_HUGE");
    settings.arena_overlap = !off("STASIS_AGENT_ARENA_OVERLAP");
    // The arena (arena.c): whole chunks' worth, in the store's reserve directory `stasis run --arena` names.
    settings.arena_bytes = mib_setting("STASIS_AGENT_ARENA_MIB", 0) / settings.slot_bytes * settings.slot_bytes;
    const char *arena_directory = getenv("STASIS_AGENT_ARENA_DIR");
    if (arena_directory && strlen(arena_directory) < sizeof settings.arena_directory) {
        strcpy(settings.arena_directory, arena_directory);
    } else {
        settings.arena_bytes = 0;
    }
    const char *log = getenv("STASIS_AGENT_LOG");
    settings.verbose = log && *log && strcmp(log, "0");
    if (settings.verbose) atexit(report_counters);
}

HIDDEN void *real_dlsym(void *handle, const char *name) {
    void *(*libc)(void *, const char *) = (void *(*)(void *, const char *))stasis_find_libc_dlsym();
    return libc ? libc(handle, name) : NULL;
}

HIDDEN void agent_log(const char *format, ...) {
    if (!settings.verbose) return;
    char line[512];
    int prefix = snprintf(line, sizeof line, "stasis-agent[%d]: ", getpid());
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(line + prefix, sizeof line - (size_t)prefix, format, arguments);
    va_end(arguments);
    size_t length = strlen(line);
    if (length < sizeof line - 1) line[length++] = '\n';
    ssize_t ignored = write(2, line, length);
    (void)ignored;
}

#define RESOLVE(name) real.name = (__typeof__(real.name))real_dlsym(handle, #name)

static void *cuda_handle;

HIDDEN void *driver_handle(void) { return cuda_handle; }

static void resolve(void) {
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
    if (!handle) handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!handle) return;
    cuda_handle = handle;
    RESOLVE(cuInit);
    RESOLVE(cuGetProcAddress);
    RESOLVE(cuGetProcAddress_v2);
    RESOLVE(cuMemAlloc_v2);
    RESOLVE(cuMemFree_v2);
    RESOLVE(cuMemCreate);
    RESOLVE(cuMemRelease);
    RESOLVE(cuMemMap);
    RESOLVE(cuMemUnmap);
    RESOLVE(cuMemSetAccess);
    RESOLVE(cuMemAddressReserve);
    RESOLVE(cuMemAddressFree);
    RESOLVE(cuMemGetAllocationGranularity);
    RESOLVE(cuMemGetAllocationPropertiesFromHandle);
    RESOLVE(cuMemRetainAllocationHandle);
    RESOLVE(cuMemExportToShareableHandle);
    RESOLVE(cuMemImportFromShareableHandle);
    RESOLVE(cuCtxGetCurrent);
    RESOLVE(cuCtxSetCurrent);
    RESOLVE(cuCtxGetDevice);
    RESOLVE(cuCtxSynchronize);
    RESOLVE(cuDevicePrimaryCtxRetain);
    RESOLVE(cuDeviceGetCount);
    RESOLVE(cuDeviceCanAccessPeer);
    RESOLVE(cuStreamCreate);
    RESOLVE(cuStreamSynchronize);
    RESOLVE(cuEventCreate);
    RESOLVE(cuEventRecord);
    RESOLVE(cuEventQuery);
    RESOLVE(cuEventSynchronize);
    RESOLVE(cuMemcpyDtoHAsync_v2);
    RESOLVE(cuMemcpyHtoDAsync_v2);
    RESOLVE(cuMemsetD8Async);
    RESOLVE(cuMemHostAlloc);
    RESOLVE(cuMemHostRegister_v2);
    RESOLVE(cuMemHostUnregister);
    RESOLVE(cuGetErrorName);
    RESOLVE(cuMulticastBindMem);
    RESOLVE(cuMulticastBindAddr);
    RESOLVE(cuCtxDestroy_v2);
    RESOLVE(cuDeviceGetAttribute);
    RESOLVE(cuMemHostGetDevicePointer_v2);
    RESOLVE(cuModuleLoadData);
    RESOLVE(cuModuleGetFunction);
    RESOLVE(cuLaunchKernel);
    RESOLVE(cuIpcGetMemHandle);
    RESOLVE(cuIpcOpenMemHandle_v2);
    RESOLVE(cuIpcCloseMemHandle);
    // Without any one of these the agent stays a pass-through: it never half-tracks memory.
    void **all = (void **)&real;
    for (size_t i = 0; i < sizeof real / sizeof(void *); i++) {
        if (!all[i] && &all[i] != (void **)&real.cuGetProcAddress && &all[i] != (void **)&real.cuGetProcAddress_v2 &&
            &all[i] != (void **)&real.cuMulticastBindMem && &all[i] != (void **)&real.cuMulticastBindAddr) {
            agent_log("libcuda.so.1 lacks an entry point the agent needs (#%zu); the agent stays out of the way", i);
            return;
        }
    }
    driver_status = 0;
}

HIDDEN int driver_load(void) {
    pthread_once(&driver_once, resolve);
    return driver_status;
}

HIDDEN const char *driver_error_name(CUresult result) {
    const char *name = NULL;
    if (driver_load() == 0 && real.cuGetErrorName(result, &name) == CUDA_SUCCESS && name) return name;
    return "CUDA_ERROR_UNKNOWN";
}
