// cuMemAlloc backed by the VMM API: the agent reserves, creates and maps the memory itself, so that it can be
// released and re-created at the same address. Small allocations, and any the VMM path cannot make, stay on
// the driver's own cuMemAlloc (counted: stasis tells how much the driver path holds).
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "tables.h"

static size_t granularity[MAX_DEVICES];
static atomic_ullong driver_path_bytes;

HIDDEN uint64_t alloc_driver_path_bytes(void) { return atomic_load(&driver_path_bytes); }

static size_t round_up(size_t value, size_t step) { return (value + step - 1) / step * step; }

HIDDEN CUresult memory_alloc(CUdeviceptr *pointer, size_t bytes) {
    CUdevice device;
    if (!settings.back_allocations || bytes < settings.min_backed_bytes || !pointer || real.cuCtxGetDevice(&device) != CUDA_SUCCESS ||
        device < 0 || device >= MAX_DEVICES) {
        CUresult result = real.cuMemAlloc_v2(pointer, bytes);
        if (result == CUDA_SUCCESS) atomic_fetch_add(&driver_path_bytes, bytes);
        counters.driver_allocations++;
        return result;
    }
    counters.allocations++;
    cu_mem_allocation_prop prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    // Exportable as a POSIX descriptor: how legacy CUDA IPC (cudaIpcGetMemHandle) of it is served (ipc.c).
    prop.requested_handle_types = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    pthread_mutex_lock(&tables);
    if (!granularity[device] && (real.cuMemGetAllocationGranularity(&granularity[device], &prop, 0) != CUDA_SUCCESS || !granularity[device])) {
        granularity[device] = 2u << 20;
    }
    size_t size = round_up(bytes, granularity[device]);
    // cudaMalloc memory is reachable from every peer that enables peer access; VMM memory only from the
    // devices given access. So every device that can reach this one gets it, as cudaMalloc would allow.
    cu_mem_access_desc access[MAX_ACCESS];
    size_t access_count = 0;
    access[access_count++] = (cu_mem_access_desc){{CU_MEM_LOCATION_TYPE_DEVICE, device}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    int devices = 0;
    if (real.cuDeviceGetCount(&devices) == CUDA_SUCCESS) {
        for (int peer = 0; peer < devices && access_count < MAX_ACCESS; peer++) {
            int reachable = 0;
            if (peer != device && real.cuDeviceCanAccessPeer(&reachable, peer, device) == CUDA_SUCCESS && reachable) {
                access[access_count++] = (cu_mem_access_desc){{CU_MEM_LOCATION_TYPE_DEVICE, peer}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
            }
        }
    }
    CUdeviceptr address = 0;
    CUmemGenericAllocationHandle driver = 0;
    CUresult result = real.cuMemAddressReserve(&address, size, 0, 0, 0);
    if (result == CUDA_SUCCESS) result = real.cuMemCreate(&driver, size, &prop, 0);
    if (result == CUDA_SUCCESS) result = real.cuMemMap(address, size, 0, driver, 0);
    int mapped = result == CUDA_SUCCESS;
    if (result == CUDA_SUCCESS) result = real.cuMemSetAccess(address, size, access, access_count);
    handle_record *handle = NULL;
    if (result == CUDA_SUCCESS && make_room_for_mapping() == 0) {
        handle = add_handle(driver, size, &prop, 1);
    }
    if (!handle) {
        // Undo, then answer as the driver would have: out of memory stays out of memory, anything else is
        // left to the driver's own cuMemAlloc.
        if (mapped) real.cuMemUnmap(address, size);
        if (driver) real.cuMemRelease(driver);
        if (address) real.cuMemAddressFree(address, size);
        pthread_mutex_unlock(&tables);
        if (result == CUDA_ERROR_OUT_OF_MEMORY) return result;
        agent_log("cuMemAlloc of %zu bytes left to the driver (%s)", bytes, driver_error_name(result));
        result = real.cuMemAlloc_v2(pointer, bytes);
        if (result == CUDA_SUCCESS) atomic_fetch_add(&driver_path_bytes, bytes);
        return result;
    }
    mapping_record *mapping = &mappings[mapping_count++];
    memset(mapping, 0, sizeof *mapping);
    mapping->address = address;
    mapping->size = size;
    mapping->handle = handle;
    mapping->mapped = 1;
    memcpy(mapping->access, access, access_count * sizeof access[0]);
    mapping->access_count = (int)access_count;
    mapping->reservation = size;
    remember_program_context(device);
    ring_ensure_on(device);
    pthread_mutex_unlock(&tables);
    *pointer = address;
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_free(CUdeviceptr pointer) {
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < mapping_count; i++) {
        mapping_record *mapping = &mappings[i];
        if (mapping->address != pointer || !mapping->reservation) continue;
        counters.frees++;
        handle_record *handle = mapping->handle;
        size_t size = mapping->reservation;
        int mapped = mapping->mapped;
        remove_mapping(i);
        // Out of the tables before anything waits: other threads' VMM calls need not wait for this sync.
        CUmemGenericAllocationHandle driver = handle->driver;
        remove_handle(handle);
        pthread_mutex_unlock(&tables);
        // cudaFree waits for the device; so does this, before the memory goes.
        real.cuCtxSynchronize();
        if (mapped) real.cuMemUnmap(pointer, size);
        if (driver) real.cuMemRelease(driver);
        real.cuMemAddressFree(pointer, size);
        free(handle);
        return CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&tables);
    return real.cuMemFree_v2(pointer);
}
