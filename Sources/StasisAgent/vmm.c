// The program's own VMM calls (cuMemCreate, cuMemMap, cuMemSetAccess, ...), answered on the agent's handles:
// each is recorded in the tables with its mappings and rights, so that the memory can be re-created and
// mapped again as the program left it. Exports and imports are shared.c's.
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "tables.h"

HIDDEN CUresult memory_create(CUmemGenericAllocationHandle *out, size_t size, const cu_mem_allocation_prop *prop, unsigned long long flags) {
    if (!out || !prop) return real.cuMemCreate(out, size, prop, flags);
    CUmemGenericAllocationHandle driver = 0;
    CUresult result = real.cuMemCreate(&driver, size, prop, flags);
    if (result != CUDA_SUCCESS) return result;
    pthread_mutex_lock(&tables);
    handle_record *handle = add_handle(driver, size, prop, 0);
    if (handle && device_of(prop) >= 0) {
        remember_program_context(device_of(prop));
        ring_ensure_on(device_of(prop));
    }
    pthread_mutex_unlock(&tables);
    if (!handle) {
        real.cuMemRelease(driver);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = handle->id;
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_release(CUmemGenericAllocationHandle id) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    if (!handle || handle->internal || handle->references <= 0) {
        pthread_mutex_unlock(&tables);
        return handle ? CUDA_ERROR_INVALID_VALUE : real.cuMemRelease(id);
    }
    handle->references--;
    forget_if_unused(handle);
    pthread_mutex_unlock(&tables);
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_map(CUdeviceptr address, size_t size, size_t offset, CUmemGenericAllocationHandle id, unsigned long long flags) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    if (!handle || handle->internal) {
        pthread_mutex_unlock(&tables);
        return handle ? CUDA_ERROR_INVALID_HANDLE : real.cuMemMap(address, size, offset, id, flags);
    }
    CUresult result = make_room_for_mapping() == 0
                          ? real.cuMemMap(address, size, offset, handle->driver, flags) : CUDA_ERROR_OUT_OF_MEMORY;
    if (result == CUDA_SUCCESS) {
        mapping_record *mapping = &mappings[mapping_count++];
        memset(mapping, 0, sizeof *mapping);
        mapping->address = address;
        mapping->size = size;
        mapping->offset = offset;
        mapping->handle = handle;
        mapping->mapped = 1;
        // The driver does not say how large imported memory is; its mappings do.
        if (handle->imported && offset + size > handle->size) handle->size = offset + size;
    }
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_unmap(CUdeviceptr address, size_t size) {
    CUresult result = real.cuMemUnmap(address, size);
    if (result != CUDA_SUCCESS) return result;
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < mapping_count;) {
        mapping_record *mapping = &mappings[i];
        if (!mapping->reservation && mapping->address >= address && mapping->address + mapping->size <= address + size) {
            handle_record *handle = mapping->handle;
            remove_mapping(i);
            forget_if_unused(handle);
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&tables);
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_set_access(CUdeviceptr address, size_t size, const cu_mem_access_desc *desc, size_t count) {
    CUresult result = real.cuMemSetAccess(address, size, desc, count);
    if (result != CUDA_SUCCESS || !desc) return result;
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < mapping_count; i++) {
        mapping_record *mapping = &mappings[i];
        if (mapping->address + mapping->size <= address || mapping->address >= address + size) continue;
        // The rights of each location, newest last: re-applied after the memory is re-created.
        for (size_t d = 0; d < count; d++) {
            int slot = 0;
            while (slot < mapping->access_count && memcmp(&mapping->access[slot].location, &desc[d].location, sizeof desc[d].location)) slot++;
            if (slot == MAX_ACCESS) continue;
            mapping->access[slot] = desc[d];
            if (slot == mapping->access_count) mapping->access_count++;
        }
    }
    pthread_mutex_unlock(&tables);
    return CUDA_SUCCESS;
}

HIDDEN CUresult memory_properties(cu_mem_allocation_prop *prop, CUmemGenericAllocationHandle id) {
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    if (handle && prop) *prop = handle->prop;
    pthread_mutex_unlock(&tables);
    return handle ? (prop ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE) : real.cuMemGetAllocationPropertiesFromHandle(prop, id);
}

HIDDEN CUresult memory_retain(CUmemGenericAllocationHandle *out, void *address) {
    pthread_mutex_lock(&tables);
    CUdeviceptr at = (CUdeviceptr)(uintptr_t)address;
    for (size_t i = 0; i < mapping_count; i++) {
        mapping_record *mapping = &mappings[i];
        if (at < mapping->address || at >= mapping->address + mapping->size) continue;
        if (mapping->handle->internal) {
            // cudaMalloc memory has no VMM handle to give out; neither does its VMM backing.
            pthread_mutex_unlock(&tables);
            return CUDA_ERROR_INVALID_VALUE;
        }
        if (!out) break;
        mapping->handle->references++;
        *out = mapping->handle->id;
        pthread_mutex_unlock(&tables);
        return CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&tables);
    return real.cuMemRetainAllocationHandle(out, address);
}

HIDDEN CUresult memory_multicast_bind(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset,
                                     CUmemGenericAllocationHandle id, size_t offset, size_t size, unsigned long long flags) {
    if (!real.cuMulticastBindMem) return CUDA_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&tables);
    handle_record *handle = find_handle(id);
    CUresult result = real.cuMulticastBindMem(group, device, group_offset, handle ? handle->driver : id, offset, size, flags);
    if (handle && result == CUDA_SUCCESS) handle->multicast = 1;
    pthread_mutex_unlock(&tables);
    return result;
}

HIDDEN CUresult memory_multicast_bind_address(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset, CUdeviceptr address,
                                             size_t size, unsigned long long flags) {
    if (!real.cuMulticastBindAddr) return CUDA_ERROR_NOT_SUPPORTED;
    CUresult result = real.cuMulticastBindAddr(group, device, group_offset, address, size, flags);
    if (result != CUDA_SUCCESS) return result;
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < mapping_count; i++) {
        if (mappings[i].address < address + size && address < mappings[i].address + mappings[i].size) mappings[i].handle->multicast = 1;
    }
    pthread_mutex_unlock(&tables);
    return result;
}
