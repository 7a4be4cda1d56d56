// Internal declarations shared by the agent's files. See include/stasis_agent.h for what the agent is.
#ifndef STASIS_AGENT_INTERNAL_H
#define STASIS_AGENT_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda_abi.h"
#include "stasis_agent_protocol.h"

#define HIDDEN __attribute__((visibility("hidden")))
#define MAX_DEVICES 64
/// The most slots the staging ring has (ring.c keeps an event per slot and device).
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
    unsigned streams;         // STASIS_AGENT_STREAMS: copy streams per device (4)
    int huge_ring;            // STASIS_AGENT_RING_HUGE=off: no transparent huge pages asked for the ring
    int verbose;              // STASIS_AGENT_LOG=1
    int arena_overlap;        // STASIS_AGENT_ARENA_OVERLAP=off: an evacuation into the arena hashes first, then copies
    int gpu_digests;          // STASIS_AGENT_GPU_DIGESTS=off leaves hashing to stasis's CPUs (to compare the two)
    size_t arena_bytes;       // STASIS_AGENT_ARENA_MIB: pinned pieces of the store to evacuate into (arena.c)
    char arena_directory[4096];  // STASIS_AGENT_ARENA_DIR: the store's reserve directory they live in
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

// ---- device memory the agent can evacuate: its tables (tables.h) and the files that keep them
// alloc.c: cuMemAlloc backed by the VMM API
HIDDEN CUresult memory_alloc(CUdeviceptr *pointer, size_t bytes);
HIDDEN CUresult memory_free(CUdeviceptr pointer);

// vmm.c: the program's own VMM calls, on the agent's handles
HIDDEN CUresult memory_create(CUmemGenericAllocationHandle *handle, size_t size, const cu_mem_allocation_prop *prop, unsigned long long flags);
HIDDEN CUresult memory_release(CUmemGenericAllocationHandle handle);
HIDDEN CUresult memory_map(CUdeviceptr pointer, size_t size, size_t offset, CUmemGenericAllocationHandle handle, unsigned long long flags);
HIDDEN CUresult memory_unmap(CUdeviceptr pointer, size_t size);
HIDDEN CUresult memory_set_access(CUdeviceptr pointer, size_t size, const cu_mem_access_desc *desc, size_t count);
HIDDEN CUresult memory_properties(cu_mem_allocation_prop *prop, CUmemGenericAllocationHandle handle);
HIDDEN CUresult memory_retain(CUmemGenericAllocationHandle *handle, void *address);
HIDDEN CUresult memory_multicast_bind_address(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset, CUdeviceptr address,
                                             size_t size, unsigned long long flags);
HIDDEN CUresult memory_multicast_bind(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset,
                                     CUmemGenericAllocationHandle handle, size_t offset, size_t size, unsigned long long flags);

// shared.c: memory shared between processes through POSIX descriptors
HIDDEN CUresult memory_export(void *shareable, CUmemGenericAllocationHandle handle, int type, unsigned long long flags);
HIDDEN CUresult memory_import(CUmemGenericAllocationHandle *handle, void *os_handle, int type);
/// A new POSIX descriptor for own allocation `id` (the caller passes it on and closes it).
HIDDEN CUresult memory_export_again(uint64_t id, int *fd, char *why, size_t length);
/// Imports `fd` (the owner's new export) in place of imported allocation `id` and maps it where it was.
HIDDEN CUresult memory_import_again(uint64_t id, int fd, char *why, size_t length);
/// Imported allocation `id` becomes this process's own (its exporter is gone); *bytes: its size.
HIDDEN CUresult memory_adopt(uint64_t id, uint64_t *bytes, char *why, size_t length);
/// Legacy CUDA IPC of memory the agent backs: a POSIX descriptor for the allocation holding `pointer`
/// (exported once, kept until RELEASE), its id, and where `pointer` lies in it. CUDA_ERROR_NOT_FOUND for
/// memory the agent does not hold.
HIDDEN CUresult memory_ipc_export(CUdeviceptr pointer, uint64_t *id, uint64_t *offset, uint64_t *size);
/// A duplicate of allocation `id`'s IPC descriptor (the caller closes it), exporting it again after a
/// restore; -1 when there is none.
HIDDEN int memory_ipc_fd(uint64_t id);

// contexts.c: the primary contexts the agent works in, the program's own it synchronises
/// The program destroyed `context`: it is no longer synchronised at checkpoints.
HIDDEN void memory_context_destroyed(CUcontext context);
/// Synchronises the contexts of every GPU the agent has memory on, giving up after `timeout_ms` (the
/// synchronisation goes on by itself); a CUresult, CUDA_ERROR_TIMEOUT on time-out.
HIDDEN CUresult memory_synchronize(unsigned timeout_ms, char *why, size_t length);
/// The context for copies on `device`, current on the calling thread afterwards.
HIDDEN CUresult memory_use_device(int device);

// tables.c: what the control channel reads of the tables
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
/// Why the memory cannot be evacuated (CUDA IPC), or NULL.
HIDDEN const char *memory_refusal(void);
/// How many mappings are not in place.
HIDDEN int memory_unmapped(void);
HIDDEN int memory_released(void);
HIDDEN void memory_after_fork_child(void);

// release.c: the physical memory taken away and put back while the gate is closed
/// A device address covering all of allocation `id`, and its size (mapping it temporarily where the program
/// has not mapped it whole with read-write access for its device).
HIDDEN CUresult memory_view(uint64_t id, CUdeviceptr *address, int *device, size_t *size);
HIDDEN void memory_drop_views(void);
HIDDEN CUresult memory_release_all(char *why, size_t length);
/// Re-creates the process's own memory and maps it where it was; imported memory waits for
/// memory_import_again. Mappings still missing keep memory_released() true.
HIDDEN CUresult memory_reback_all(char *why, size_t length);

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
/// Starts hashing `count` jobs, all on `device` (at most one launch's worth), without waiting; then waits for
/// them and hands their digests over, in the jobs' order.
HIDDEN CUresult digest_start_one_device(const digest_job *jobs, size_t count, int device, char *why, size_t length);
HIDDEN CUresult digest_finish_one_device(int device, size_t count, digest_out *out, char *why, size_t length);

// ---- message.c: one protocol message over a stream socket, the one send and receive path of every message
/// Sends `message` whole, with descriptor `passed` attached (SCM_RIGHTS, on its first byte) unless it is -1;
/// 0, or -1 when the peer is gone.
HIDDEN int message_send(int fd, const stasis_agent_message *message, int passed);
/// Receives a message whole; a descriptor that comes with it goes to *passed (closing one already there from
/// the same message), which the caller closes, even on failure. 0, or -1 when the peer is gone.
HIDDEN int message_receive(int fd, stasis_agent_message *message, int *passed);
/// Whether a message is waiting (without blocking).
HIDDEN int message_waiting(int fd);

// ---- ring.c: the pinned staging ring and the copies through its slots
/// The pinned staging ring (allocated at the first backed allocation, never at checkpoint time), or NULL.
HIDDEN void *ring_address(void);
/// Pins the ring in the current context, when it is not pinned yet.
HIDDEN void ring_ensure(void);
/// Pins the ring in `device`'s primary context, leaving the calling thread's current context as it was.
HIDDEN void ring_ensure_on(int device);
/// The shared ring unpinned while the device memory is released, and pinned again before it is re-created.
HIDDEN CUresult ring_unpin(char *why, size_t length);
HIDDEN CUresult ring_pin(char *why, size_t length);

// ---- arena.c: pinned pieces of a store in memory that an evacuation copies into (no CPU copy)
/// Builds the arena on a thread of its own, pinned in `context` (when asked for and not there yet).
HIDDEN void arena_start(CUcontext context);
/// Stops a build, unpins and unmaps the arena, and gives the pieces stasis did not take back to the reserve.
HIDDEN void arena_drop(void);
/// How many pieces an evacuation into the store whose reserve is `directory` may use (0: none; not built yet,
/// or another store).
HIDDEN size_t arena_usable(const char *directory);
/// Where piece `piece`'s chunk payload goes, and its file's name in the reserve directory.
HIDDEN char *arena_payload(size_t piece);
HIDDEN void arena_piece_name(size_t piece, char *out, size_t length);
/// An evacuation used it: stasis may have taken any piece, so it is dropped and built anew before the next.
HIDDEN void arena_mark_spent(void);
HIDDEN int arena_spent(void);
HIDDEN void arena_after_fork_child(void);

// One chunk of an evacuation: where it is and, when the GPU hashed it, its digest.
typedef struct {
    uint64_t id, offset, length;
    CUdeviceptr address;
    int device;
    int hashed;  // digest is the GPU's
    digest_out sum;
} planned_chunk;

/// Forgets the copies in flight (a new connection, a new evacuation).
HIDDEN void ring_copies_reset(void);
HIDDEN unsigned ring_copies_in_flight(void);
/// Starts a copy between slot `slot` of the ring and bytes [offset, offset + length) of allocation `id`: out
/// of the device (`out`) or into it; `chunk`: an evacuation's, what FILLED tells stasis of it.
HIDDEN CUresult ring_copy_start(int out, int slot, uint64_t id, uint64_t offset, uint64_t length, const planned_chunk *chunk, char *why,
                                size_t why_length);
/// Waits for the oldest copy and tells stasis about it with `op`; `lent_slots` (an evacuation's FILLED):
/// the slots stasis holds, its slot marked. 0, or -1 with `why`.
/// Starts copying every chunk of `plan` (all on `device`) into the arena, chunk i into piece i, each marked by
/// an event of its own, without waiting for any (the host waits only where the streams' queues are full).
HIDDEN CUresult ring_copy_plan_to_arena(const planned_chunk *plan, size_t count, int device, char *why, size_t length);
/// Waits for the copy of chunk `index` of that plan.
HIDDEN CUresult ring_arena_copy_wait(size_t index);
/// Waits for every copy on `device`'s streams (after a failure, before anything touches their memory).
HIDDEN void ring_wait_device(int device);
/// Starts copying `chunk` out of the device into arena piece `piece`.
HIDDEN CUresult ring_copy_to_arena(size_t piece, const planned_chunk *chunk, char *why, size_t why_length);
/// Starts building the arena in the ring's context (after a checkpoint let the program run on).
HIDDEN void ring_start_arena(void);
HIDDEN int ring_finish_oldest(int fd, uint32_t op, char *lent_slots, char *why, size_t length);
/// Tells stasis with `op` of every copy that has finished already, oldest first, without waiting: slots go
/// back as soon as their copies end, not only once the ring is full or stasis pauses.
HIDDEN int ring_finish_done(int fd, uint32_t op, char *why, size_t length);
/// Waits for every copy in flight and tells stasis nothing (an evacuation that failed).
HIDDEN void ring_copies_abandon(void);
/// Fills bytes [offset, offset + length) of allocation `id` with zeros, on a copy stream.
HIDDEN CUresult ring_zero(uint64_t id, uint64_t offset, uint64_t length, char *why, size_t why_length);
/// Finishes every copy into the device and waits for the zero fills; 0, or -1 with `why`.
HIDDEN int ring_flush_writes(int fd, char *why, size_t length);

// ---- evacuate.c: every allocation chunk by chunk, copied out or hashed
/// Copies every allocation out through the ring: a FILLED per slot, and stasis gives each slot back with
/// FREE once it has read it. With `with_digests`, the GPU hashes every chunk first: FILLED then carries the
/// digest, and chunks of zeros are not copied at all. Returns 0, or -1 with `why`.
HIDDEN int evacuate(int fd, int with_digests, const char *arena_directory, uint64_t *copied, char *why, size_t length);
/// Hashes every chunk now in the device and sends a DIGEST each; 0, or -1 with `why`.
HIDDEN int verify(int fd, char *why, size_t length);

// ---- control.c: the channel to stasis
HIDDEN void control_start(void);
/// Receives the next message from stasis, keeping a descriptor that came with it for IMPORT.
HIDDEN int control_receive(int fd, stasis_agent_message *message);

#endif
