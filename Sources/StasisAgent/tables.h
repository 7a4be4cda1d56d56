// The agent's tables of device memory (tables.c): every physical allocation made through cuMemCreate (by the
// program, as PyTorch's expandable segments do, or by the agent itself to back a cuMemAlloc) with its mappings
// and access rights. The program sees handles of the agent's (`id`), never the driver's, so that after an
// evacuation the physical memory can be re-created under a new driver handle while the program's handles and
// addresses stay valid.
// Internal to the files that keep the tables: alloc.c, vmm.c, shared.c, contexts.c, release.c. Everything
// here is guarded by `tables` (the lock) unless said otherwise.
#ifndef STASIS_AGENT_TABLES_H
#define STASIS_AGENT_TABLES_H

#include <pthread.h>

#include "agent.h"
#include "stasis_agent_protocol.h"

#define MAX_ACCESS 16

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

HIDDEN extern pthread_mutex_t tables;
HIDDEN extern handle_record **handles;
HIDDEN extern size_t handle_count;
HIDDEN extern mapping_record *mappings;
HIDDEN extern size_t mapping_count;
/// Set when the physical memory was released, until every mapping is back (memory_released()).
HIDDEN extern int released;

HIDDEN handle_record *find_handle(uint64_t id);
/// A new record for `driver` (internal: backs a cuMemAlloc), or NULL when out of memory.
HIDDEN handle_record *add_handle(CUmemGenericAllocationHandle driver, size_t size, const cu_mem_allocation_prop *prop, int internal);
/// Takes a handle out of the table (the caller frees it).
HIDDEN void remove_handle(handle_record *handle);
/// Drops a handle the program no longer holds and nothing maps (the driver frees its memory then).
HIDDEN void forget_if_unused(handle_record *handle);
/// Room for one more mapping; 0, or -1 when out of memory.
HIDDEN int make_room_for_mapping(void);
HIDDEN void remove_mapping(size_t index);
/// Keeps a duplicate of `fd` (close-on-exec) as one of the descriptors `handle` is shared through.
HIDDEN void keep_share_fd(handle_record *handle, int fd);
HIDDEN void close_share_fds(handle_record *handle);
/// The GPU the memory lies on, or -1.
HIDDEN int device_of(const cu_mem_allocation_prop *prop);
/// Mappings not in place (released, or imported memory not imported again yet).
HIDDEN int unmapped_count(void);
/// Maps `mapping` again at its address with its rights.
HIDDEN CUresult map_again(mapping_record *mapping, char *why, size_t length);

// ---- contexts.c
/// Remembers the calling thread's current context when it is a context of the program's own on `device`.
HIDDEN void remember_program_context(int device);

// ---- alloc.c
/// Bytes the program allocated with cuMemAlloc that the driver holds, not the agent (any thread, no lock).
HIDDEN uint64_t alloc_driver_path_bytes(void);

#endif
