// Internal declarations shared by the agent's files. See include/stasis_agent.h for what the agent is.
#ifndef STASIS_AGENT_INTERNAL_H
#define STASIS_AGENT_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_abi.h"

#define HIDDEN __attribute__((visibility("hidden")))
#define MAX_DEVICES 64
/// The most slots the staging ring has (control.c keeps an event per slot and device).
#define MAX_SLOTS 1024

// ---- driver.c: the real driver, settings, logging
HIDDEN extern cuda_driver real;
/// Loads libcuda.so.1 and resolves `real` (once); 0 on success.
HIDDEN int driver_load(void);
/// libcuda's handle once loaded.
HIDDEN void *driver_handle(void);
/// The real dlsym (ours interposes the exported one).
HIDDEN void *real_dlsym(void *handle, const char *name);
HIDDEN const char *driver_error_name(CUresult result);
HIDDEN void agent_log(const char *format, ...) __attribute__((format(printf, 1, 2)));

typedef struct {
    int enabled;              // STASIS_AGENT=off turns the agent into a pass-through
    int back_allocations;     // STASIS_AGENT_BACKING=off leaves cuMemAlloc to the driver
    size_t min_backed_bytes;  // STASIS_AGENT_MIN_BACKED_MIB: smaller cuMemAlloc stay on the driver path
    size_t slot_bytes;        // the ring's slot: one chunk of the store
    unsigned slot_count;      // STASIS_AGENT_RING_MIB / slot_bytes
    unsigned streams;         // copy streams per device
    int verbose;              // STASIS_AGENT_LOG=1
    int gpu_digests;          // STASIS_AGENT_GPU_DIGESTS=off leaves hashing to stasis's CPUs (to compare the two)
    int shared_ring;          // STASIS_AGENT_SHARED_RING=off pins the driver's memory as the ring, which stasis
                              // then copies with process_vm_readv/writev (to compare one CPU copy with two)
} agent_settings;
HIDDEN extern agent_settings settings;

/// How often the agent's slower paths ran, printed at exit with STASIS_AGENT_LOG=1 (to find overhead).
typedef struct {
    _Atomic unsigned long lookups;      // cuGetProcAddress and dlsym of cu* names
    _Atomic unsigned long allocations;  // cuMemAlloc backed by the agent
    _Atomic unsigned long driver_allocations;
    _Atomic unsigned long frees;        // of backed allocations
} agent_counters;
HIDDEN extern agent_counters counters;

// ---- gate.c: holding CUDA calls
HIDDEN void gate_enter(void);
HIDDEN void gate_leave(void);
/// Closes the gate and waits until no thread is inside a CUDA call; on timeout opens it again and returns
/// the number of threads still inside.
HIDDEN long gate_close(unsigned timeout_ms);
HIDDEN void gate_open(void);
HIDDEN int gate_is_closed(void);
/// A gated trampoline for `target` (the same one for the same target), or `target` itself when the table is full.
HIDDEN void *gate_wrap(void *target);
HIDDEN void gate_counts(uint64_t *gated, uint64_t *ungated);
/// Calls that passed the gate (counted only with STASIS_AGENT_LOG).
HIDDEN uint64_t gate_calls(void);
HIDDEN void gate_after_fork_child(void);

// ---- interpose.c: which driver entry points the agent replaces
/// Our replacement for the driver function at `real_pointer` named `name` (as asked of cuGetProcAddress
/// with `version`, or as a symbol when version < 0), or a gated trampoline, or NULL for "leave it".
HIDDEN void *interpose(const char *name, void *real_pointer, int version);

// ---- memory.c: device memory the agent can evacuate
HIDDEN CUresult memory_alloc(CUdeviceptr *pointer, size_t bytes);
HIDDEN CUresult memory_free(CUdeviceptr pointer);
HIDDEN CUresult memory_create(CUmemGenericAllocationHandle *handle, size_t size, const cu_mem_allocation_prop *prop, unsigned long long flags);
HIDDEN CUresult memory_release(CUmemGenericAllocationHandle handle);
HIDDEN CUresult memory_map(CUdeviceptr pointer, size_t size, size_t offset, CUmemGenericAllocationHandle handle, unsigned long long flags);
HIDDEN CUresult memory_unmap(CUdeviceptr pointer, size_t size);
HIDDEN CUresult memory_set_access(CUdeviceptr pointer, size_t size, const cu_mem_access_desc *desc, size_t count);
HIDDEN CUresult memory_properties(cu_mem_allocation_prop *prop, CUmemGenericAllocationHandle handle);
HIDDEN CUresult memory_retain(CUmemGenericAllocationHandle *handle, void *address);
HIDDEN CUresult memory_export(void *shareable, CUmemGenericAllocationHandle handle, int type, unsigned long long flags);
HIDDEN CUresult memory_import(CUmemGenericAllocationHandle *handle, void *os_handle, int type);
HIDDEN CUresult memory_multicast_bind_address(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset, CUdeviceptr address,
                                             size_t size, unsigned long long flags);
/// The program destroyed `context`: it is no longer synchronised at checkpoints.
HIDDEN void memory_context_destroyed(CUcontext context);
HIDDEN CUresult memory_multicast_bind(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset,
                                     CUmemGenericAllocationHandle handle, size_t offset, size_t size, unsigned long long flags);

typedef struct {
    uint64_t id;
    uint64_t bytes;  // to copy out: 0 for memory imported from another process
    int device;
    uint32_t share_flags;  // STASIS_AGENT_SHARE_EXPORTED, STASIS_AGENT_SHARE_IMPORTED
    int share_count;
    int share_fds[8];      // duplicates of the descriptors it is shared through (STASIS_AGENT_MAX_SHARE_FDS)
} memory_entry;
/// The allocations to evacuate, in a stable order; returns the count (entries malloc'd into *out).
HIDDEN size_t memory_table(memory_entry **out, uint64_t *tracked, uint64_t *driver_path);
/// Synchronises the contexts of every GPU the agent has memory on, giving up after `timeout_ms` (the
/// synchronisation goes on by itself); a CUresult, CUDA_ERROR_TIMEOUT on time-out.
HIDDEN CUresult memory_synchronize(unsigned timeout_ms, char *why, size_t length);
/// A device address covering all of allocation `id`, and its size (mapping it temporarily where the program
/// has not mapped it whole with read-write access for its device).
HIDDEN CUresult memory_view(uint64_t id, CUdeviceptr *address, int *device, size_t *size);
HIDDEN void memory_drop_views(void);
/// The context for copies on `device`, current on the calling thread afterwards.
HIDDEN CUresult memory_use_device(int device);
/// Why the memory cannot be evacuated (CUDA IPC), or NULL.
HIDDEN const char *memory_refusal(void);
HIDDEN CUresult memory_release_all(char *why, size_t length);
/// Re-creates the process's own memory and maps it where it was; imported memory waits for
/// memory_import_again. Mappings still missing keep memory_released() true.
HIDDEN CUresult memory_reback_all(char *why, size_t length);
/// A new POSIX descriptor for own allocation `id` (the caller passes it on and closes it).
HIDDEN CUresult memory_export_again(uint64_t id, int *fd, char *why, size_t length);
/// Imports `fd` (the owner's new export) in place of imported allocation `id` and maps it where it was.
HIDDEN CUresult memory_import_again(uint64_t id, int fd, char *why, size_t length);
/// Imported allocation `id` becomes this process's own (its exporter is gone); *bytes: its size.
HIDDEN CUresult memory_adopt(uint64_t id, uint64_t *bytes, char *why, size_t length);
/// How many mappings are not in place.
HIDDEN int memory_unmapped(void);
HIDDEN int memory_released(void);
/// The pinned staging ring (allocated at the first backed allocation, never at checkpoint time).
HIDDEN void *memory_ring(void);
HIDDEN void memory_ensure_ring(void);
/// The shared ring unpinned while the device memory is released, and pinned again before it is re-created.
HIDDEN CUresult memory_ring_unpin(char *why, size_t length);
HIDDEN CUresult memory_ring_pin(char *why, size_t length);
HIDDEN void memory_after_fork_child(void);

/// Legacy CUDA IPC of memory the agent backs: a POSIX descriptor for the allocation holding `pointer`
/// (exported once, kept until RELEASE), its id, and where `pointer` lies in it. CUDA_ERROR_NOT_FOUND for
/// memory the agent does not hold.
HIDDEN CUresult memory_ipc_export(CUdeviceptr pointer, uint64_t *id, uint64_t *offset, uint64_t *size);
/// A duplicate of allocation `id`'s IPC descriptor (the caller closes it), exporting it again after a
/// restore; -1 when there is none.
HIDDEN int memory_ipc_fd(uint64_t id);

// ---- ipc.c: legacy CUDA IPC (cuIpcGetMemHandle / cuIpcOpenMemHandle) on memory the agent backs
HIDDEN CUresult ipc_get_mem_handle(cu_ipc_mem_handle *handle, CUdeviceptr pointer);
HIDDEN CUresult ipc_open_mem_handle(CUdeviceptr *pointer, cu_ipc_mem_handle handle, unsigned int flags);
HIDDEN CUresult ipc_close_mem_handle(CUdeviceptr pointer);

// ---- digest.c: the SHA-256 of chunks, computed on the GPU
typedef struct {
    CUdeviceptr address;  // 16-byte aligned
    uint64_t length;
    int device;
} digest_job;

typedef struct {
    uint8_t digest[32];
    int zero;  // every byte was zero
} digest_out;

/// Pins the small area the digest kernel's jobs and results pass through (with the ring: never at checkpoint time).
HIDDEN void digest_pin_area(void);
/// Loads the digest kernel on `device` (once); a CUresult, with `why` on failure.
HIDDEN CUresult digest_prepare(int device, char *why, size_t length);
/// Hashes every job on its device, all devices at once; a CUresult, with `why` on failure.
HIDDEN CUresult digest_chunks(const digest_job *jobs, size_t count, digest_out *out, char *why, size_t length);

// ---- control.c: the channel to stasis
HIDDEN void control_start(void);

#endif
