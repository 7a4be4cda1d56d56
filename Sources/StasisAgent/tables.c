// The tables of device memory (see tables.h) and what the control channel reads of them.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>

#include "tables.h"

// Handles the program sees; far from any small integer a program might pass by mistake.
#define FIRST_ID 0x5354415300000001ull

HIDDEN pthread_mutex_t tables = PTHREAD_MUTEX_INITIALIZER;
HIDDEN handle_record **handles;
HIDDEN size_t handle_count;
static size_t handle_capacity;
HIDDEN mapping_record *mappings;
HIDDEN size_t mapping_count;
static size_t mapping_capacity;
static uint64_t next_id = FIRST_ID;
HIDDEN int released;

static int grow(void **array, size_t *capacity, size_t count, size_t element) {
    if (count < *capacity) return 0;
    size_t wanted = *capacity ? *capacity * 2 : 64;
    void *bigger = realloc(*array, wanted * element);
    if (!bigger) return -1;
    *array = bigger;
    *capacity = wanted;
    return 0;
}

HIDDEN handle_record *find_handle(uint64_t id) {
    for (size_t i = 0; i < handle_count; i++) {
        if (handles[i]->id == id) return handles[i];
    }
    return NULL;
}

HIDDEN handle_record *add_handle(CUmemGenericAllocationHandle driver, size_t size, const cu_mem_allocation_prop *prop, int internal) {
    if (grow((void **)&handles, &handle_capacity, handle_count, sizeof *handles) != 0) return NULL;
    handle_record *record = calloc(1, sizeof *record);
    if (!record) return NULL;
    record->id = next_id++;
    record->driver = driver;
    record->size = size;
    record->prop = *prop;
    record->references = internal ? 0 : 1;
    record->internal = internal;
    handles[handle_count++] = record;
    return record;
}

static int mapped_anywhere(const handle_record *handle) {
    for (size_t i = 0; i < mapping_count; i++) {
        if (mappings[i].handle == handle) return 1;
    }
    return 0;
}

HIDDEN void remove_handle(handle_record *handle) {
    for (size_t i = 0; i < handle_count; i++) {
        if (handles[i] == handle) {
            handles[i] = handles[--handle_count];
            return;
        }
    }
}

HIDDEN void keep_share_fd(handle_record *handle, int fd) {
    if (handle->share_count >= STASIS_AGENT_MAX_SHARE_FDS) {
        agent_log("more than %d exports of one allocation: the others cannot be paired with their imports", STASIS_AGENT_MAX_SHARE_FDS);
        return;
    }
    int kept = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (kept >= 0) handle->share_fds[handle->share_count++] = kept;
}

HIDDEN void close_share_fds(handle_record *handle) {
    for (int i = 0; i < handle->share_count; i++) close(handle->share_fds[i]);
    handle->share_count = 0;
    if (handle->has_ipc_fd) close(handle->ipc_fd);
    handle->has_ipc_fd = 0;
}

HIDDEN void forget_if_unused(handle_record *handle) {
    if (handle->references > 0 || mapped_anywhere(handle)) return;
    close_share_fds(handle);
    if (handle->driver) real.cuMemRelease(handle->driver);
    remove_handle(handle);
    free(handle);
}

HIDDEN void remove_mapping(size_t index) { mappings[index] = mappings[--mapping_count]; }

HIDDEN int make_room_for_mapping(void) { return grow((void **)&mappings, &mapping_capacity, mapping_count, sizeof *mappings); }

HIDDEN int device_of(const cu_mem_allocation_prop *prop) {
    return prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && prop->location.id >= 0 && prop->location.id < MAX_DEVICES
               ? prop->location.id : -1;
}

HIDDEN int unmapped_count(void) {
    int count = 0;
    for (size_t i = 0; i < mapping_count; i++) count += !mappings[i].mapped;
    return count;
}

HIDDEN CUresult map_again(mapping_record *mapping, char *why, size_t length) {
    CUresult result = real.cuMemMap(mapping->address, mapping->size, mapping->offset, mapping->handle->driver, 0);
    if (result == CUDA_SUCCESS && mapping->access_count) {
        result = real.cuMemSetAccess(mapping->address, mapping->size, mapping->access, (size_t)mapping->access_count);
        // Unmapped again, so that a retry maps it with its rights.
        if (result != CUDA_SUCCESS) real.cuMemUnmap(mapping->address, mapping->size);
    }
    if (result == CUDA_SUCCESS) mapping->mapped = 1;
    else snprintf(why, length, "cannot map device memory again at %#llx: %s", mapping->address, driver_error_name(result));
    return result;
}

// ---- what the control channel does with it (the gate is closed: no program thread is in here)

HIDDEN size_t memory_table(memory_entry **out, uint64_t *tracked, uint64_t *driver_path) {
    pthread_mutex_lock(&tables);
    memory_entry *entries = calloc(handle_count ? handle_count : 1, sizeof *entries);
    size_t count = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; entries && i < handle_count; i++) {
        const handle_record *handle = handles[i];
        memory_entry *entry = &entries[count++];
        entry->id = handle->id;
        // Imported memory is its owner's to move: nothing of it is copied here.
        entry->bytes = handle->imported ? 0 : handle->size;
        entry->device = device_of(&handle->prop);
        entry->share_flags = (handle->exported ? STASIS_AGENT_SHARE_EXPORTED : 0) | (handle->imported ? STASIS_AGENT_SHARE_IMPORTED : 0);
        entry->share_count = handle->share_count;
        memcpy(entry->share_fds, handle->share_fds, sizeof entry->share_fds);
        bytes += entry->bytes;
    }
    pthread_mutex_unlock(&tables);
    // Oldest first: the order the memory was allocated in, stable from one checkpoint to the next.
    for (size_t i = 1; i < count; i++) {
        memory_entry entry = entries[i];
        size_t j = i;
        while (j > 0 && entries[j - 1].id > entry.id) { entries[j] = entries[j - 1]; j--; }
        entries[j] = entry;
    }
    *out = entries;
    if (tracked) *tracked = bytes;
    if (driver_path) *driver_path = alloc_driver_path_bytes();
    return count;
}

/// Why this memory cannot be evacuated, or NULL.
HIDDEN const char *memory_refusal(void) {
    const char *why = NULL;
    pthread_mutex_lock(&tables);
    for (size_t i = 0; i < handle_count && !why; i++) {
        // Memory shared through POSIX descriptors is carried by the agents (the driver's own restore of it
        // answers CUDA_ERROR_NOT_SUPPORTED, seen on two H200s); a fabric handle names memory across machines.
        if (handles[i]->unshareable) why = "device memory shared as a fabric handle (cuMemExportToShareableHandle type FABRIC): only POSIX descriptors are carried";
        else if (handles[i]->multicast) why = "the program bound device memory to a multicast object (cuMulticastBindMem)";
        else if (device_of(&handles[i]->prop) < 0) why = "the program holds VMM memory that is not on a GPU";
    }
    pthread_mutex_unlock(&tables);
    return why;
}

HIDDEN int memory_released(void) { return released; }

HIDDEN int memory_unmapped(void) {
    pthread_mutex_lock(&tables);
    int count = unmapped_count();
    pthread_mutex_unlock(&tables);
    return count;
}

// After fork the child has one thread and no CUDA: the tables' lock starts free.
HIDDEN void memory_after_fork_child(void) { pthread_mutex_init(&tables, NULL); }
