// What a checkpoint does to the physical memory while the gate holds the program's CUDA calls: addresses
// covering each allocation for the ring's copies (views), the release of every allocation (across the
// driver's checkpoint, CRIU and a restore), and its re-creation at the same addresses with the same rights.
#define _GNU_SOURCE
#include <stdio.h>

#include "tables.h"

static int device_may_use(const mapping_record *mapping, int device) {
    for (int i = 0; i < mapping->access_count; i++) {
        if (mapping->access[i].location.type == CU_MEM_LOCATION_TYPE_DEVICE && mapping->access[i].location.id == device &&
            mapping->access[i].flags == CU_MEM_ACCESS_FLAGS_PROT_READWRITE) {
            return 1;
        }
    }
    return 0;
}

HIDDEN CUresult memory_view(uint64_t id, CUdeviceptr *address, int *device, size_t *size) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = handle && handle->driver ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (result == CUDA_SUCCESS && !handle->view) {
        // The program's own mapping only if it is whole and the device may already read and write it (the
        // gate may have closed between the program's cuMemMap and its cuMemSetAccess).
        for (size_t i = 0; i < mapping_count; i++) {
            if (mappings[i].handle == handle && mappings[i].mapped && mappings[i].offset == 0 && mappings[i].size == handle->size &&
                device_may_use(&mappings[i], device_of(&handle->prop))) {
                handle->view = mappings[i].address;
                break;
            }
        }
    }
    if (result == CUDA_SUCCESS && !handle->view) {
        // Not mapped whole anywhere: map it for the copy, in an address range of the agent's own.
        CUdeviceptr at = 0;
        int where = device_of(&handle->prop);
        cu_mem_access_desc access = {{CU_MEM_LOCATION_TYPE_DEVICE, where}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
        result = real.cuMemAddressReserve(&at, handle->size, 0, 0, 0);
        if (result == CUDA_SUCCESS && (result = real.cuMemMap(at, handle->size, 0, handle->driver, 0)) != CUDA_SUCCESS) {
            real.cuMemAddressFree(at, handle->size);
        } else if (result == CUDA_SUCCESS && (result = real.cuMemSetAccess(at, handle->size, &access, 1)) != CUDA_SUCCESS) {
            real.cuMemUnmap(at, handle->size);
            real.cuMemAddressFree(at, handle->size);
        }
        if (result == CUDA_SUCCESS) {
            handle->view = at;
            handle->temporary_view = 1;
        }
    }
    if (result == CUDA_SUCCESS) {
        *address = handle->view;
        *device = device_of(&handle->prop);
        *size = handle->size;
    }
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN void memory_drop_views(void) {
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < handle_count; i++) {
        handle_record *handle = handles[i];
        if (handle->temporary_view) {
            real.cuMemUnmap(handle->view, handle->size);
            real.cuMemAddressFree(handle->view, handle->size);
        }
        handle->view = 0;
        handle->temporary_view = 0;
    }
    pthread_mutex_unlock(&tables);
}

HIDDEN CUresult memory_release_all(char *why, size_t length) {
    memory_drop_views();
    pthread_mutex_lock(&tables);
    CUresult result = CUDA_SUCCESS;
    for (size_t i = 0; i < mapping_count && result == CUDA_SUCCESS; i++) {
        if (!mappings[i].mapped) continue;
        result = real.cuMemUnmap(mappings[i].address, mappings[i].size);
        if (result == CUDA_SUCCESS) mappings[i].mapped = 0;
        else snprintf(why, length, "cuMemUnmap of %#llx failed: %s", mappings[i].address, driver_error_name(result));
    }
    for (size_t i = 0; i < handle_count && result == CUDA_SUCCESS; i++) {
        // The duplicates go too: no descriptor of the driver's may be left for CRIU to find.
        close_share_fds(handles[i]);
        if (!handles[i]->driver) continue;
        result = real.cuMemRelease(handles[i]->driver);
        if (result == CUDA_SUCCESS) handles[i]->driver = 0;
        else snprintf(why, length, "cuMemRelease failed: %s", driver_error_name(result));
    }
    released = 1;  // even partly: whatever was released must be re-backed and refilled
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_reback_all(char *why, size_t length) {
    pthread_mutex_lock(&tables);
    CUresult result = CUDA_SUCCESS;
    for (size_t i = 0; i < handle_count && result == CUDA_SUCCESS; i++) {
        handle_record *handle = handles[i];
        // Imported memory comes back with IMPORT, from its owner's new export.
        if (handle->driver || handle->imported) continue;
        result = real.cuMemCreate(&handle->driver, handle->size, &handle->prop, 0);
        if (result != CUDA_SUCCESS) {
            handle->driver = 0;
            snprintf(why, length, "cannot re-create %zu bytes of device memory on GPU %d: %s", handle->size, device_of(&handle->prop),
                     driver_error_name(result));
        }
    }
    for (size_t i = 0; i < mapping_count && result == CUDA_SUCCESS; i++) {
        if (!mappings[i].mapped && mappings[i].handle->driver) result = map_again(&mappings[i], why, length);
    }
    if (result == CUDA_SUCCESS) released = unmapped_count() > 0;
    pthread_mutex_unlock(&tables);
    return result;
}
