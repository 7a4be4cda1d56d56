// The SHA-256 of device-memory chunks, computed by the GPU (kernels/chunk_digest.cu): stasis stores evacuated
// chunks under these digests instead of hashing them on its CPUs, and checks a refill against the digests of
// what actually landed in the device.
//
// The kernel is loaded into a device's copy context the first time a checkpoint asks for it (a cubin for the
// device's architecture where one is embedded, else PTX for the driver to compile). Jobs and results pass
// through a small pinned, device-mapped area that is pinned with the staging ring, never at checkpoint time.
// Every chunk of a device is hashed by one launch, a thread a chunk.
#include <stdio.h>
#include <string.h>

#include "agent.h"
#include "chunk_digest_kernel.h"

// As in kernels/chunk_digest.cu.
typedef struct {
    uint64_t address;
    uint64_t length;
} kernel_job;

typedef struct {
    uint32_t digest[8];
    uint32_t zero;
    uint32_t reserved;
} kernel_result;

_Static_assert(sizeof(kernel_job) == 16 && sizeof(kernel_result) == 40, "the kernel's job and result layouts");

/// Chunks a launch can take: 64 GiB of 2 MiB chunks (1.8 MiB of pinned memory); more take several launches.
#define DIGEST_CAPACITY 32768
#define THREADS_PER_BLOCK 32
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR 75
#define CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR 76
#define CU_MEMHOSTALLOC_DEVICEMAP 2

static kernel_job *jobs_area;
static kernel_result *results_area;
static size_t area_job[DIGEST_CAPACITY];  // which caller's job each entry of the area is
static CUfunction functions[MAX_DEVICES];
static CUstream digest_streams[MAX_DEVICES];
static CUdeviceptr jobs_on_device[MAX_DEVICES], results_on_device[MAX_DEVICES];

HIDDEN void digest_pin_area(void) {
    if (jobs_area) return;
    void *pinned = NULL;
    size_t bytes = (size_t)DIGEST_CAPACITY * (sizeof(kernel_job) + sizeof(kernel_result));
    CUresult result = real.cuMemHostAlloc(&pinned, bytes, CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP);
    if (result != CUDA_SUCCESS) {
        agent_log("cannot pin the digest area: %s; stasis will hash on its CPUs", driver_error_name(result));
        return;
    }
    jobs_area = pinned;
    results_area = (kernel_result *)(jobs_area + DIGEST_CAPACITY);
}

static const void *kernel_image(int architecture) {
    for (size_t i = 0; i < sizeof chunk_digest_cubins / sizeof chunk_digest_cubins[0]; i++) {
        if (chunk_digest_cubins[i].architecture == architecture) return chunk_digest_cubins[i].image;
    }
    return NULL;
}

HIDDEN CUresult digest_prepare(int device, char *why, size_t length) {
    if (device < 0 || device >= MAX_DEVICES) return CUDA_ERROR_INVALID_VALUE;
    if (functions[device]) return CUDA_SUCCESS;
    if (!jobs_area || !real.cuModuleLoadData || !real.cuModuleGetFunction || !real.cuLaunchKernel) {
        snprintf(why, length, "%s", jobs_area ? "the driver lacks module loading" : "no pinned digest area");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    CUresult result = memory_use_device(device);
    CUdevice handle = 0;
    int major = 0, minor = 0;
    if (result == CUDA_SUCCESS) result = real.cuCtxGetDevice(&handle);
    if (result == CUDA_SUCCESS) result = real.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle);
    if (result == CUDA_SUCCESS) result = real.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle);
    CUmodule module = NULL;
    if (result == CUDA_SUCCESS) {
        const void *cubin = kernel_image(major * 10 + minor);
        result = cubin ? real.cuModuleLoadData(&module, cubin) : CUDA_ERROR_NOT_FOUND;
        if (result != CUDA_SUCCESS) result = real.cuModuleLoadData(&module, chunk_digest_ptx);
    }
    CUfunction function = NULL;
    if (result == CUDA_SUCCESS) result = real.cuModuleGetFunction(&function, module, "stasis_chunk_digests");
    if (result == CUDA_SUCCESS) result = real.cuMemHostGetDevicePointer_v2(&jobs_on_device[device], jobs_area, 0);
    if (result == CUDA_SUCCESS) result = real.cuMemHostGetDevicePointer_v2(&results_on_device[device], results_area, 0);
    if (result == CUDA_SUCCESS && !digest_streams[device]) result = real.cuStreamCreate(&digest_streams[device], CU_STREAM_NON_BLOCKING);
    if (result != CUDA_SUCCESS) {
        snprintf(why, length, "cannot load the digest kernel on GPU %d (sm_%d%d): %s", device, major, minor, driver_error_name(result));
        return result;
    }
    functions[device] = function;
    agent_log("digest kernel loaded on GPU %d (sm_%d%d)", device, major, minor);
    return CUDA_SUCCESS;
}

static CUresult launch(int device, size_t first, size_t count, char *why, size_t length) {
    CUresult result = digest_prepare(device, why, length);
    // The module's context must be current for its launch.
    if (result == CUDA_SUCCESS && (result = memory_use_device(device)) != CUDA_SUCCESS) {
        snprintf(why, length, "cannot use GPU %d: %s", device, driver_error_name(result));
    }
    if (result != CUDA_SUCCESS) return result;
    CUdeviceptr jobs = jobs_on_device[device] + first * sizeof(kernel_job);
    CUdeviceptr results = results_on_device[device] + first * sizeof(kernel_result);
    unsigned int n = (unsigned int)count;
    void *arguments[] = {&jobs, &results, &n};
    result = real.cuLaunchKernel(functions[device], (n + THREADS_PER_BLOCK - 1) / THREADS_PER_BLOCK, 1, 1, THREADS_PER_BLOCK, 1, 1, 0,
                                 digest_streams[device], arguments, NULL);
    if (result != CUDA_SUCCESS) snprintf(why, length, "cannot launch the digest kernel on GPU %d: %s", device, driver_error_name(result));
    return result;
}

/// Waits for `device`'s launch to end.
static CUresult wait_for_launch(int device, char *why, size_t length) {
    CUresult result = memory_use_device(device);
    if (result == CUDA_SUCCESS) result = real.cuStreamSynchronize(digest_streams[device]);
    if (result != CUDA_SUCCESS) snprintf(why, length, "the digest kernel failed on GPU %d: %s", device, driver_error_name(result));
    return result;
}

/// The first `used` results of the area, each to the caller's job it was for (area_job).
static void collect_results(size_t used, digest_out *out) {
    for (size_t i = 0; i < used; i++) {
        digest_out *target = &out[area_job[i]];
        memcpy(target->digest, results_area[i].digest, sizeof target->digest);
        target->zero = results_area[i].zero != 0;
    }
}

HIDDEN CUresult digest_chunks(const digest_job *jobs, size_t count, digest_out *out, char *why, size_t length) {
    for (size_t start = 0; start < count;) {
        size_t end = count - start > DIGEST_CAPACITY ? start + DIGEST_CAPACITY : count;
        char present[MAX_DEVICES] = {0};
        for (size_t j = start; j < end; j++) {
            if (jobs[j].device < 0 || jobs[j].device >= MAX_DEVICES || jobs[j].address % 16) {
                snprintf(why, length, "chunk at %#llx cannot be hashed on GPU %d", (unsigned long long)jobs[j].address, jobs[j].device);
                return CUDA_ERROR_INVALID_VALUE;
            }
            present[jobs[j].device] = 1;
        }
        // The area holds each device's jobs together, one launch a device; the devices run at once.
        size_t used = 0;
        for (int device = 0; device < MAX_DEVICES; device++) {
            if (!present[device]) continue;
            size_t first = used;
            for (size_t j = start; j < end; j++) {
                if (jobs[j].device != device) continue;
                jobs_area[used] = (kernel_job){jobs[j].address, jobs[j].length};
                area_job[used++] = j;
            }
            CUresult result = launch(device, first, used - first, why, length);
            if (result != CUDA_SUCCESS) return result;
        }
        for (int device = 0; device < MAX_DEVICES; device++) {
            CUresult result = present[device] ? wait_for_launch(device, why, length) : CUDA_SUCCESS;
            if (result != CUDA_SUCCESS) return result;
        }
        collect_results(used, out);
        start = end;
    }
    return CUDA_SUCCESS;
}

HIDDEN CUresult digest_start_one_device(const digest_job *jobs, size_t count, int device, char *why, size_t length) {
    if (!jobs_area) return CUDA_ERROR_NOT_SUPPORTED;
    if (count == 0 || count > DIGEST_CAPACITY || device < 0 || device >= MAX_DEVICES) return CUDA_ERROR_INVALID_VALUE;
    for (size_t j = 0; j < count; j++) {
        if (jobs[j].device != device || jobs[j].address % 16) return CUDA_ERROR_INVALID_VALUE;
        jobs_area[j] = (kernel_job){jobs[j].address, jobs[j].length};
        area_job[j] = j;
    }
    return launch(device, 0, count, why, length);
}

HIDDEN CUresult digest_finish_one_device(int device, size_t count, digest_out *out, char *why, size_t length) {
    CUresult result = wait_for_launch(device, why, length);
    if (result == CUDA_SUCCESS) collect_results(count, out);
    return result;
}
