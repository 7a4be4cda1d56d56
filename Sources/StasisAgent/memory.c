// Device memory the agent can evacuate: every physical allocation made through cuMemCreate (by the program,
// as PyTorch's expandable segments do, or by the agent itself to back a cuMemAlloc) with its mappings and
// access rights. The program sees handles of the agent's (`id`), never the driver's, so that after an
// evacuation the physical memory can be re-created under a new driver handle while the program's handles and
// addresses stay valid.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include "agent.h"
#include "stasis_agent_protocol.h"

#define MAX_ACCESS 16
// Handles the program sees; far from any small integer a program might pass by mistake.
#define FIRST_ID 0x5354415300000001ull

typedef struct {
    uint64_t id;
    CUmemGenericAllocationHandle driver;  // 0 while released
    size_t size;
    cu_mem_allocation_prop prop;
    int references;     // the program's: one from create, one per retain; 0 once it released them all
    int internal;       // backs a cuMemAlloc
    int exported;       // shared with other processes through POSIX descriptors
    int multicast;      // bound to a multicast object: cannot be evacuated
    int imported;       // another process's memory: its owner's agent moves it, this one maps it again
    int unshareable;    // exported or imported as a handle other than a POSIX descriptor (fabric): refused
    // Duplicates of the descriptors it was exported as or imported from, kept while it lives so that stasis
    // can pair every import with its export (kcmp); closed at RELEASE and when the memory goes.
    int share_fds[STASIS_AGENT_MAX_SHARE_FDS];
    int share_count;
    int ipc_fd;         // legacy CUDA IPC: its POSIX export, handed to importers' agents (valid with has_ipc_fd)
    int has_ipc_fd;
    CUdeviceptr view;   // an address covering it all, during an evacuation or a refill
    int temporary_view;
} handle_record;

typedef struct {
    CUdeviceptr address;
    size_t size;
    size_t offset;
    handle_record *handle;
    int mapped;
    cu_mem_access_desc access[MAX_ACCESS];
    int access_count;
    size_t reservation;  // bytes the agent reserved for it (a cuMemAlloc), freed with it
} mapping_record;

static pthread_mutex_t tables = PTHREAD_MUTEX_INITIALIZER;
static handle_record **handles;
static size_t handle_count, handle_capacity;
static mapping_record *mappings;
static size_t mapping_count, mapping_capacity;
static uint64_t next_id = FIRST_ID;
static CUcontext device_contexts[MAX_DEVICES];
static size_t granularity[MAX_DEVICES];
static void *ring;
static int ring_shared;        // a memfd mapping the agent pins itself (else the driver's pinned memory)
static int ring_pinned;
static CUcontext ring_context; // the context it was pinned in (a primary context: it lives as long as the process)
static int released;
static atomic_ullong driver_path_bytes;

static int grow(void **array, size_t *capacity, size_t count, size_t element) {
    if (count < *capacity) return 0;
    size_t wanted = *capacity ? *capacity * 2 : 64;
    void *bigger = realloc(*array, wanted * element);
    if (!bigger) return -1;
    *array = bigger;
    *capacity = wanted;
    return 0;
}

static handle_record *find_handle(uint64_t id) {
    for (size_t i = 0; i < handle_count; i++) {
        if (handles[i]->id == id) return handles[i];
    }
    return NULL;
}

static handle_record *add_handle(CUmemGenericAllocationHandle driver, size_t size, const cu_mem_allocation_prop *prop, int internal) {
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

/// Takes a handle out of the table (the caller frees it).
static void remove_handle(handle_record *handle) {
    for (size_t i = 0; i < handle_count; i++) {
        if (handles[i] == handle) {
            handles[i] = handles[--handle_count];
            return;
        }
    }
}

/// Keeps a duplicate of `fd` (close-on-exec) as one of the descriptors `handle` is shared through.
static void keep_share_fd(handle_record *handle, int fd) {
    if (handle->share_count >= STASIS_AGENT_MAX_SHARE_FDS) {
        agent_log("more than %d exports of one allocation: the others cannot be paired with their imports", STASIS_AGENT_MAX_SHARE_FDS);
        return;
    }
    int kept = fcntl(fd, F_DUPFD_CLOEXEC, 3);
    if (kept >= 0) handle->share_fds[handle->share_count++] = kept;
}

static void close_share_fds(handle_record *handle) {
    for (int i = 0; i < handle->share_count; i++) close(handle->share_fds[i]);
    handle->share_count = 0;
    if (handle->has_ipc_fd) close(handle->ipc_fd);
    handle->has_ipc_fd = 0;
}

/// Drops a handle the program no longer holds and nothing maps (the driver frees its memory then).
static void forget_if_unused(handle_record *handle) {
    if (handle->references > 0 || mapped_anywhere(handle)) return;
    close_share_fds(handle);
    if (handle->driver) real.cuMemRelease(handle->driver);
    remove_handle(handle);
    free(handle);
}

static void remove_mapping(size_t index) { mappings[index] = mappings[--mapping_count]; }

static int device_of(const cu_mem_allocation_prop *prop) {
    return prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE && prop->location.id >= 0 && prop->location.id < MAX_DEVICES
               ? prop->location.id : -1;
}

/// The device's primary context: what the agent copies and pins in. VMM memory belongs to the device, not
/// to a context, and the primary context lives as long as the process (a context the program creates and
/// destroys would take the ring with it).
static CUresult primary_context(int device, CUcontext *context) {
    if (device < 0 || device >= MAX_DEVICES) return CUDA_ERROR_INVALID_VALUE;
    if (!device_contexts[device]) {
        CUresult result = real.cuDevicePrimaryCtxRetain(&device_contexts[device], device);
        if (result != CUDA_SUCCESS) return result;
    }
    *context = device_contexts[device];
    return CUDA_SUCCESS;
}

// Contexts of the program's own (not the primary one) that it allocated in, per device: they are
// synchronised at a checkpoint too, and forgotten when the program destroys them.
#define CONTEXTS_PER_DEVICE 4
static CUcontext program_contexts[MAX_DEVICES][CONTEXTS_PER_DEVICE];

/// Remembers the calling thread's current context when it is a context of the program's own on `device`.
static void remember_program_context(int device) {
    CUcontext current = NULL, primary = NULL;
    CUdevice current_device;
    if (device < 0 || real.cuCtxGetCurrent(&current) != CUDA_SUCCESS || !current) return;
    if (real.cuCtxGetDevice(&current_device) != CUDA_SUCCESS || current_device != device) return;
    if (primary_context(device, &primary) != CUDA_SUCCESS || current == primary) return;
    for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
        if (program_contexts[device][i] == current) return;
        if (!program_contexts[device][i]) {
            program_contexts[device][i] = current;
            return;
        }
    }
    agent_log("more than %d contexts of the program's own on GPU %d: the others are not synchronised at checkpoints", CONTEXTS_PER_DEVICE, device);
}

HIDDEN void memory_context_destroyed(CUcontext context) {
    pthread_mutex_lock(&tables);
    for (int device = 0; device < MAX_DEVICES; device++) {
        for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
            if (program_contexts[device][i] == context) program_contexts[device][i] = NULL;
        }
    }
    pthread_mutex_unlock(&tables);
}

/// Pins the ring in `device`'s primary context, leaving the calling thread's current context as it was.
static void ensure_ring_on(int device) {
    if (ring) return;
    CUcontext previous = NULL, primary = NULL;
    if (real.cuCtxGetCurrent(&previous) != CUDA_SUCCESS || primary_context(device, &primary) != CUDA_SUCCESS ||
        real.cuCtxSetCurrent(primary) != CUDA_SUCCESS) {
        return;
    }
    memory_ensure_ring();
    real.cuCtxSetCurrent(previous);
}

/// The ring as a memfd mapped shared, so that stasis can map the same pages and copy a chunk once on the CPU
/// (between the slot and the store's file) instead of twice (process_vm_readv, then write). Not inherited by
/// children (DataLoader workers carry no ring, as with the driver's pinned memory).
static void *map_shared_ring(size_t bytes) {
    int fd = memfd_create(STASIS_AGENT_RING_NAME, MFD_CLOEXEC);
    if (fd < 0) return NULL;
    void *address = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) == 0) address = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (address == MAP_FAILED) return NULL;
    madvise(address, bytes, MADV_DONTFORK);
    return address;
}

HIDDEN void memory_ensure_ring(void) {
    if (ring) return;
    size_t bytes = settings.slot_bytes * settings.slot_count;
    void *shared = settings.shared_ring ? map_shared_ring(bytes) : NULL;
    CUresult result = CUDA_ERROR_NOT_SUPPORTED;
    if (shared && real.cuMemHostRegister_v2 && real.cuMemHostUnregister &&
        (result = real.cuMemHostRegister_v2(shared, bytes, CU_MEMHOSTREGISTER_PORTABLE)) == CUDA_SUCCESS) {
        ring = shared;
        ring_shared = ring_pinned = 1;
        real.cuCtxGetCurrent(&ring_context);
    } else {
        if (shared) {
            agent_log("cannot pin a shared staging ring (%s): the driver's pinned memory instead", driver_error_name(result));
            munmap(shared, bytes);
        }
        void *pinned = NULL;
        result = real.cuMemHostAlloc(&pinned, bytes, CU_MEMHOSTALLOC_PORTABLE);
        if (result == CUDA_SUCCESS) ring = pinned;
    }
    if (ring) {
        agent_log("pinned %sstaging ring: %u slots of %zu bytes", ring_shared ? "shared " : "", settings.slot_count, settings.slot_bytes);
        digest_pin_area();
    } else {
        agent_log("cannot pin the staging ring: %s", driver_error_name(result));
    }
}

/// Runs `pin` (1) or unpin (0) of the shared ring in the context it was pinned in.
static CUresult ring_pin_state(int pin, char *why, size_t length) {
    if (!ring_shared || ring_pinned == pin) return CUDA_SUCCESS;
    size_t bytes = settings.slot_bytes * settings.slot_count;
    CUcontext previous = NULL;
    CUresult result = real.cuCtxGetCurrent(&previous);
    if (result == CUDA_SUCCESS) result = real.cuCtxSetCurrent(ring_context);
    if (result == CUDA_SUCCESS) {
        result = pin ? real.cuMemHostRegister_v2(ring, bytes, CU_MEMHOSTREGISTER_PORTABLE) : real.cuMemHostUnregister(ring);
        real.cuCtxSetCurrent(previous);
    }
    if (result != CUDA_SUCCESS) {
        snprintf(why, length, "cannot %s the staging ring: %s", pin ? "pin" : "unpin", driver_error_name(result));
        return result;
    }
    ring_pinned = pin;
    // Unpinned, its pages go: the checkpoint need not carry 64 MiB of stale slots. Pinning again faults them in.
    if (!pin) madvise(ring, bytes, MADV_REMOVE);
    return CUDA_SUCCESS;
}

/// The shared ring is the agent's own memory, which the driver's checkpoint need not know as pinned: it is
/// unpinned while the device memory is released (across the driver's checkpoint, CRIU and a restore) and
/// pinned again before the memory is re-created.
HIDDEN CUresult memory_ring_unpin(char *why, size_t length) { return ring_pin_state(0, why, length); }
HIDDEN CUresult memory_ring_pin(char *why, size_t length) { return ring_pin_state(1, why, length); }

HIDDEN void *memory_ring(void) { return ring; }
HIDDEN int memory_released(void) { return released; }

// ---- cuMemAlloc, backed by the VMM API

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
    if (result == CUDA_SUCCESS && grow((void **)&mappings, &mapping_capacity, mapping_count, sizeof *mappings) == 0) {
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
    ensure_ring_on(device);
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

// ---- the program's own VMM calls, on the agent's handles

HIDDEN CUresult memory_create(CUmemGenericAllocationHandle *out, size_t size, const cu_mem_allocation_prop *prop, unsigned long long flags) {
    if (!out || !prop) return real.cuMemCreate(out, size, prop, flags);
    CUmemGenericAllocationHandle driver = 0;
    CUresult result = real.cuMemCreate(&driver, size, prop, flags);
    if (result != CUDA_SUCCESS) return result;
    pthread_mutex_lock(&tables);
    handle_record *handle = add_handle(driver, size, prop, 0);
    if (handle && device_of(prop) >= 0) {
        remember_program_context(device_of(prop));
        ensure_ring_on(device_of(prop));
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
    CUresult result = grow((void **)&mappings, &mapping_capacity, mapping_count, sizeof *mappings) == 0
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
    if (driver_path) *driver_path = atomic_load(&driver_path_bytes);
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

HIDDEN CUresult memory_use_device(int device) {
    CUcontext primary = NULL;
    CUresult result = primary_context(device, &primary);
    return result == CUDA_SUCCESS ? real.cuCtxSetCurrent(primary) : result;
}

/// A synchronisation that may never end (GPU work waiting on a host thread held at the gate): it runs on a
/// thread of its own, and whoever gives up on it leaves it to free itself.
typedef struct {
    pthread_mutex_t mutex;
    pthread_cond_t finished;
    int devices[(1 + CONTEXTS_PER_DEVICE) * MAX_DEVICES];
    CUcontext contexts[(1 + CONTEXTS_PER_DEVICE) * MAX_DEVICES];
    int count, context_count, done, abandoned;
    CUresult result;
    char why[160];
} sync_job;

static void *synchronise(void *argument) {
    sync_job *job = argument;
    CUresult result = CUDA_SUCCESS;
    for (int i = 0; i < job->context_count && result == CUDA_SUCCESS; i++) {
        result = real.cuCtxSetCurrent(job->contexts[i]);
        if (result == CUDA_SUCCESS) result = real.cuCtxSynchronize();
        if (result != CUDA_SUCCESS) snprintf(job->why, sizeof job->why, "synchronising a context of GPU %d failed: %s", job->devices[i], driver_error_name(result));
    }
    pthread_mutex_lock(&job->mutex);
    job->result = result;
    job->done = 1;
    int abandoned = job->abandoned;
    pthread_cond_signal(&job->finished);
    pthread_mutex_unlock(&job->mutex);
    if (abandoned) free(job);
    return NULL;
}

HIDDEN CUresult memory_synchronize(unsigned timeout_ms, char *why, size_t length) {
    sync_job *job = calloc(1, sizeof *job);
    if (!job) return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_init(&job->mutex, NULL);
    pthread_cond_init(&job->finished, NULL);
    pthread_mutex_lock(&tables);
    int seen[MAX_DEVICES] = {0};
    for (size_t i = 0; i < handle_count; i++) {
        int device = device_of(&handles[i]->prop);
        if (device >= 0 && !seen[device]) seen[device] = 1;
    }
    pthread_mutex_unlock(&tables);
    for (int device = 0; device < MAX_DEVICES; device++) {
        if (!seen[device]) continue;
        CUcontext primary = NULL;
        CUresult result = primary_context(device, &primary);
        if (result != CUDA_SUCCESS) {
            snprintf(why, length, "no primary context on GPU %d: %s", device, driver_error_name(result));
            free(job);
            return result;
        }
        job->devices[job->context_count] = device;
        job->contexts[job->context_count++] = primary;
        pthread_mutex_lock(&tables);
        for (int i = 0; i < CONTEXTS_PER_DEVICE; i++) {
            if (!program_contexts[device][i]) continue;
            job->devices[job->context_count] = device;
            job->contexts[job->context_count++] = program_contexts[device][i];
        }
        pthread_mutex_unlock(&tables);
    }
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    int started = pthread_create(&thread, NULL, synchronise, job) == 0;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (!started) {
        free(job);
        snprintf(why, length, "cannot start a thread to synchronise");
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pthread_detach(thread);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&job->mutex);
    while (!job->done && pthread_cond_timedwait(&job->finished, &job->mutex, &deadline) != ETIMEDOUT) {}
    if (!job->done) {
        job->abandoned = 1;
        pthread_mutex_unlock(&job->mutex);
        snprintf(why, length, "the GPU did not finish its work within %u ms with CUDA calls held (does it wait on a host thread?)", timeout_ms);
        return CUDA_ERROR_TIMEOUT;
    }
    pthread_mutex_unlock(&job->mutex);
    CUresult result = job->result;
    if (result != CUDA_SUCCESS) snprintf(why, length, "%s", job->why);
    free(job);
    return result;
}

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

/// Mappings not in place (released, or imported memory not imported again yet). Under the tables' lock.
static int unmapped_count(void) {
    int count = 0;
    for (size_t i = 0; i < mapping_count; i++) count += !mappings[i].mapped;
    return count;
}

/// Maps `mapping` again at its address with its rights. Under the tables' lock.
static CUresult map_again(mapping_record *mapping, char *why, size_t length) {
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

HIDDEN int memory_unmapped(void) {
    pthread_mutex_lock(&tables);
    int count = unmapped_count();
    pthread_mutex_unlock(&tables);
    return count;
}

// After fork the child has one thread and no CUDA: the tables' lock starts free.
HIDDEN void memory_after_fork_child(void) { pthread_mutex_init(&tables, NULL); }
