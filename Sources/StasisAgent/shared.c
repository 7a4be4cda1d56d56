// Device memory shared between processes through POSIX descriptors: the program's exports and imports
// (cuMemExportToShareableHandle, cuMemImportFromShareableHandle), legacy CUDA IPC's exports (ipc.c), and what
// a restore does to share it again (the owner exports anew, the importer imports that in place of the old).
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

#include "tables.h"

HIDDEN CUresult memory_export(void *shareable, CUmemGenericAllocationHandle id, int type, unsigned long long flags) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = real.cuMemExportToShareableHandle(shareable, handle ? handle->driver : id, type, flags);
    if (handle && result == CUDA_SUCCESS) {
        handle->exported = 1;
        if (type == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) keep_share_fd(handle, *(int *)shareable);
        else handle->unshareable = type;
    }
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_import(CUmemGenericAllocationHandle *out, void *os_handle, int type) {
    CUmemGenericAllocationHandle driver = 0;
    CUresult result = real.cuMemImportFromShareableHandle(&driver, os_handle, type);
    if (result != CUDA_SUCCESS || !out) return result;
    cu_mem_allocation_prop prop;
    memset(&prop, 0, sizeof prop);
    real.cuMemGetAllocationPropertiesFromHandle(&prop, driver);
    pthread_mutex_lock(&tables);
    handle_record *handle = add_handle(driver, 0, &prop, 0);
    if (handle) {
        handle->imported = 1;
        if (type == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) keep_share_fd(handle, (int)(intptr_t)os_handle);
        else handle->unshareable = type;
    }
    pthread_mutex_unlock(&tables);
    if (!handle) {
        real.cuMemRelease(driver);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = handle->id;
    return CUDA_SUCCESS;
}

/// Exports `handle` as its IPC descriptor, once. Under the tables' lock.
static CUresult ensure_ipc_fd(handle_record *handle) {
    if (handle->has_ipc_fd) return CUDA_SUCCESS;
    if (!handle->driver) return CUDA_ERROR_INVALID_HANDLE;
    int fd = -1;
    CUresult result = real.cuMemExportToShareableHandle(&fd, handle->driver, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
    if (result != CUDA_SUCCESS) return result;
    handle->ipc_fd = fd;
    handle->has_ipc_fd = 1;
    handle->exported = 1;
    keep_share_fd(handle, fd);
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_ipc_export(CUdeviceptr pointer, uint64_t *id, uint64_t *offset, uint64_t *size) {
    pthread_mutex_lock(&tables);
    CUresult result = CUDA_ERROR_NOT_FOUND;
    for (size_t i = 0; i < mapping_count; i++) {
        mapping_record *mapping = &mappings[i];
        if (pointer < mapping->address || pointer >= mapping->address + mapping->size || mapping->handle->imported) continue;
        result = ensure_ipc_fd(mapping->handle);
        if (result == CUDA_SUCCESS) {
            *id = mapping->handle->id;
            *offset = mapping->offset + (pointer - mapping->address);
            *size = mapping->handle->size;
        }
        break;
    }
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN int memory_ipc_fd(uint64_t id) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    int fd = handle && !handle->imported && ensure_ipc_fd(handle) == CUDA_SUCCESS ? fcntl(handle->ipc_fd, F_DUPFD_CLOEXEC, 3) : -1;
    pthread_mutex_unlock(&tables);
    return fd;
}

HIDDEN CUresult memory_export_again(uint64_t id, int *fd, char *why, size_t length) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = handle && handle->driver && !handle->imported ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (result != CUDA_SUCCESS) snprintf(why, length, "no memory of this process's own as %#llx to export", (unsigned long long)id);
    if (result == CUDA_SUCCESS) {
        result = real.cuMemExportToShareableHandle(fd, handle->driver, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        if (result == CUDA_SUCCESS) {
            handle->exported = 1;
            keep_share_fd(handle, *fd);
        } else {
            snprintf(why, length, "cannot export %#llx again: %s", (unsigned long long)id, driver_error_name(result));
        }
    }
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_import_again(uint64_t id, int fd, char *why, size_t length) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = handle && handle->imported && !handle->driver ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (result != CUDA_SUCCESS) snprintf(why, length, "no released imported memory %#llx to import", (unsigned long long)id);
    if (result == CUDA_SUCCESS) {
        result = real.cuMemImportFromShareableHandle(&handle->driver, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
        if (result != CUDA_SUCCESS) {
            handle->driver = 0;
            snprintf(why, length, "cannot import %#llx again: %s", (unsigned long long)id, driver_error_name(result));
        } else {
            keep_share_fd(handle, fd);
        }
    }
    for (size_t i = 0; i < mapping_count && result == CUDA_SUCCESS; i++) {
        if (mappings[i].handle == handle && !mappings[i].mapped) result = map_again(&mappings[i], why, length);
    }
    if (result == CUDA_SUCCESS) released = unmapped_count() > 0;
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_adopt(uint64_t id, uint64_t *bytes, char *why, size_t length) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = handle && handle->imported && handle->driver && handle->size ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
    if (result == CUDA_SUCCESS) {
        // From now on this process owns it: copied out here, re-created here, exported from here.
        handle->imported = 0;
        handle->exported = 1;
        *bytes = handle->size;
    } else {
        snprintf(why, length, "no imported memory %#llx to adopt", (unsigned long long)id);
    }
    pthread_mutex_unlock(&tables);
    return result;
}
