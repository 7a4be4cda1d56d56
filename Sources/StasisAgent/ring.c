// The staging ring: pinned host memory of slots, one chunk of the store each, that every copy between the
// device and stasis passes through; and the copies themselves, asynchronous on a few streams per device,
// each told to stasis (FILLED, WRITTEN) once it has finished, oldest first.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "stasis_agent_protocol.h"

// ---- the ring's memory

static void *ring;
static int ring_shared;        // a memfd mapping the agent pins itself (else the driver's pinned memory)
static int ring_pinned;
static CUcontext ring_context; // the context it was pinned in (a primary context: it lives as long as the process)

/// The ring as a memfd mapped shared, so that stasis can map the same pages and copy a chunk once on the CPU
/// (between the slot and the store's file) instead of twice (process_vm_readv, then write). Not inherited by
/// children (DataLoader workers carry no ring, as with the driver's pinned memory).
/// Huge pages are asked for before the pages exist (shmem THP, where the kernel's shmem_enabled allows
/// "advise"): pinning walks 512 times fewer pages, and the copies cross fewer TLB entries.
static void *map_shared_ring(size_t bytes) {
    int fd = memfd_create(STASIS_AGENT_RING_NAME, MFD_CLOEXEC);
    if (fd < 0) return NULL;
    void *address = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) == 0) address = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (address == MAP_FAILED) return NULL;
    if (settings.huge_ring) madvise(address, bytes, MADV_HUGEPAGE);
    // Faulted in now (MADV_POPULATE_WRITE, Linux 5.14; else by touching every page), not inside the pin.
    if (madvise(address, bytes, 23 /* MADV_POPULATE_WRITE */) != 0) {
        for (size_t offset = 0; offset < bytes; offset += 4096) ((volatile char *)address)[offset] = 0;
    }
    madvise(address, bytes, MADV_DONTFORK);
    return address;
}

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

HIDDEN void ring_ensure(void) {
    if (ring) return;
    size_t bytes = settings.slot_bytes * settings.slot_count;
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    void *shared = settings.shared_ring ? map_shared_ring(bytes) : NULL;
    double mapped = seconds_since(&start);
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
        if (result == CUDA_SUCCESS) {
            ring = pinned;
            real.cuCtxGetCurrent(&ring_context);
        }
    }
    if (ring) {
        // The ring's start-up cost (issue 29): what `stasis run` adds before the program's first allocation.
        agent_log("pinned %sstaging ring: %u slots of %zu bytes (mapped in %.3f s, pinned in %.3f s)", ring_shared ? "shared " : "",
                  settings.slot_count, settings.slot_bytes, mapped, seconds_since(&start) - mapped);
        digest_pin_area();
        arena_start(ring_context);
    } else {
        agent_log("cannot pin the staging ring: %s", driver_error_name(result));
    }
}

/// Pins the ring in `device`'s primary context, leaving the calling thread's current context as it was.
HIDDEN void ring_ensure_on(int device) {
    if (ring) return;
    CUcontext previous = NULL;
    if (real.cuCtxGetCurrent(&previous) != CUDA_SUCCESS || memory_use_device(device) != CUDA_SUCCESS) return;
    ring_ensure();
    real.cuCtxSetCurrent(previous);
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
HIDDEN CUresult ring_unpin(char *why, size_t length) { return ring_pin_state(0, why, length); }
HIDDEN CUresult ring_pin(char *why, size_t length) { return ring_pin_state(1, why, length); }

HIDDEN void *ring_address(void) { return ring; }

HIDDEN void ring_start_arena(void) {
    if (ring) arena_start(ring_context);
}

// ---- copies through the ring

static CUstream streams[MAX_DEVICES][8];
static CUevent events[MAX_DEVICES][MAX_SLOTS];
static unsigned stream_turn;

typedef struct {
    int slot;       // the ring's slot, or for an arena piece the event it uses (piece % MAX_SLOTS)
    long piece;     // the arena piece copied into, or -1
    int device;
    uint64_t id, offset, length;
    const planned_chunk *chunk;  // an evacuation's: what FILLED tells stasis of it
} copy;

// The copies in flight, oldest first.
static copy flight[MAX_SLOTS];
static unsigned flight_head, flight_count;

static CUresult prepare_device(int device, char *why, size_t length) {
    CUresult result = memory_use_device(device);
    for (unsigned s = 0; result == CUDA_SUCCESS && s < settings.streams; s++) {
        if (!streams[device][s]) result = real.cuStreamCreate(&streams[device][s], CU_STREAM_NON_BLOCKING);
    }
    if (result != CUDA_SUCCESS) snprintf(why, length, "cannot use GPU %d for copies: %s", device, driver_error_name(result));
    return result;
}

static CUresult slot_event(int device, int slot, CUevent *event) {
    if (!events[device][slot]) {
        CUresult result = real.cuEventCreate(&events[device][slot], CU_EVENT_DISABLE_TIMING);
        if (result != CUDA_SUCCESS) return result;
    }
    *event = events[device][slot];
    return CUDA_SUCCESS;
}

HIDDEN void ring_copies_reset(void) { flight_head = flight_count = 0; }
HIDDEN unsigned ring_copies_in_flight(void) { return flight_count; }

/// Starts one copy between `host` and bytes [offset, offset + length) of allocation `id`, recorded on event
/// `slot` (the ring's slot, or an arena piece's: piece % MAX_SLOTS).
static CUresult copy_start(int out, char *host, int slot, long piece, uint64_t id, uint64_t offset, uint64_t length, const planned_chunk *chunk,
                           char *why, size_t why_length) {
    CUdeviceptr view;
    int device;
    size_t size;
    CUresult result = memory_view(id, &view, &device, &size);
    if (result != CUDA_SUCCESS) {
        snprintf(why, why_length, "no device memory %#llx to copy: %s", (unsigned long long)id, driver_error_name(result));
        return result;
    }
    if (offset > size || length > size - offset || length > settings.slot_bytes) {
        snprintf(why, why_length, "bytes %llu..%llu are outside allocation %#llx (%zu bytes)", (unsigned long long)offset,
                 (unsigned long long)(offset + length), (unsigned long long)id, size);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((result = prepare_device(device, why, why_length)) != CUDA_SUCCESS) return result;
    CUstream stream = streams[device][stream_turn++ % settings.streams];
    CUevent event = NULL;
    result = out ? real.cuMemcpyDtoHAsync_v2(host, view + offset, length, stream)
                 : real.cuMemcpyHtoDAsync_v2(view + offset, host, length, stream);
    if (result == CUDA_SUCCESS) result = slot_event(device, slot, &event);
    if (result == CUDA_SUCCESS) result = real.cuEventRecord(event, stream);
    if (result != CUDA_SUCCESS) {
        snprintf(why, why_length, "copy %s GPU %d failed: %s", out ? "from" : "to", device, driver_error_name(result));
        return result;
    }
    copy *entry = &flight[(flight_head + flight_count++) % MAX_SLOTS];
    *entry = (copy){slot, piece, device, id, offset, length, chunk};
    return CUDA_SUCCESS;
}

HIDDEN CUresult ring_copy_start(int out, int slot, uint64_t id, uint64_t offset, uint64_t length, const planned_chunk *chunk, char *why,
                                size_t why_length) {
    char *host = (char *)ring_address() + (size_t)slot * settings.slot_bytes;
    return copy_start(out, host, slot, -1, id, offset, length, chunk, why, why_length);
}

// An evacuation into the arena that copies while the GPU hashes: an event a chunk, made once in the context of
// the device they were first made for (kept for the next evacuation).
static CUevent *marks;
static size_t mark_count;
static int mark_device = -1;

HIDDEN CUresult ring_copy_plan_to_arena(const planned_chunk *plan, size_t count, int device, char *why, size_t length) {
    CUresult result = prepare_device(device, why, length);
    if (result != CUDA_SUCCESS) return result;
    if (mark_device >= 0 && mark_device != device) {
        snprintf(why, length, "the arena's copy events belong to GPU %d", mark_device);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (mark_count < count) {
        CUevent *grown = realloc(marks, count * sizeof *grown);
        if (!grown) {
            snprintf(why, length, "out of memory");
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        marks = grown;
        for (; mark_count < count; mark_count++) {
            if ((result = real.cuEventCreate(&marks[mark_count], CU_EVENT_DISABLE_TIMING)) != CUDA_SUCCESS) {
                snprintf(why, length, "cannot make copy events: %s", driver_error_name(result));
                return result;
            }
        }
        mark_device = device;
    }
    for (size_t i = 0; i < count && result == CUDA_SUCCESS; i++) {
        CUstream stream = streams[device][i % settings.streams];
        result = real.cuMemcpyDtoHAsync_v2(arena_payload(i), plan[i].address, plan[i].length, stream);
        if (result == CUDA_SUCCESS) result = real.cuEventRecord(marks[i], stream);
    }
    if (result != CUDA_SUCCESS) {
        snprintf(why, length, "copy from GPU %d failed: %s", device, driver_error_name(result));
        ring_wait_device(device);
    }
    return result;
}

HIDDEN CUresult ring_arena_copy_wait(size_t index) { return index < mark_count ? real.cuEventSynchronize(marks[index]) : CUDA_ERROR_INVALID_VALUE; }

HIDDEN void ring_wait_device(int device) {
    if (memory_use_device(device) != CUDA_SUCCESS) return;
    for (unsigned s = 0; s < settings.streams; s++) {
        if (streams[device][s]) real.cuStreamSynchronize(streams[device][s]);
    }
}

HIDDEN CUresult ring_copy_to_arena(size_t piece, const planned_chunk *chunk, char *why, size_t why_length) {
    return copy_start(1, arena_payload(piece), (int)(piece % MAX_SLOTS), (long)piece, chunk->id, chunk->offset, chunk->length, chunk, why,
                      why_length);
}

HIDDEN int ring_finish_oldest(int fd, uint32_t op, char *lent_slots, char *why, size_t length) {
    copy *entry = &flight[flight_head];
    CUresult result = real.cuEventSynchronize(events[entry->device][entry->slot]);
    flight_head = (flight_head + 1) % MAX_SLOTS;
    flight_count--;
    if (result != CUDA_SUCCESS) {
        snprintf(why, length, "copy of %#llx at %llu failed: %s", (unsigned long long)entry->id, (unsigned long long)entry->offset,
                 driver_error_name(result));
        return -1;
    }
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = op;
    message.slot = entry->piece >= 0 ? (int32_t)entry->piece : entry->slot;
    message.id = entry->id;
    message.offset = entry->offset;
    message.length = entry->length;
    message.device = entry->device;
    if (entry->chunk && entry->chunk->hashed) {
        memcpy(message.digest, entry->chunk->sum.digest, sizeof message.digest);
        message.chunk_flags = STASIS_AGENT_CHUNK_DIGEST;
    }
    if (entry->piece >= 0) {
        // Stasis takes the piece's file into the store by this name: no slot to give back.
        message.chunk_flags |= STASIS_AGENT_CHUNK_ARENA;
        arena_piece_name((size_t)entry->piece, message.text, sizeof message.text);
    } else if (op == STASIS_AGENT_FILLED && lent_slots) {
        lent_slots[entry->slot] = 1;
    }
    if (message_send(fd, &message, -1) != 0) {
        snprintf(why, length, "stasis went away during the copy");
        return -1;
    }
    return 0;
}

HIDDEN int ring_finish_done(int fd, uint32_t op, char *why, size_t length) {
    while (flight_count > 0 && real.cuEventQuery(events[flight[flight_head].device][flight[flight_head].slot]) != CUDA_ERROR_NOT_READY) {
        // Finished, or failed: ring_finish_oldest tells which.
        if (ring_finish_oldest(fd, op, NULL, why, length) != 0) return -1;
    }
    return 0;
}

HIDDEN void ring_copies_abandon(void) {
    while (flight_count > 0) {
        real.cuEventSynchronize(events[flight[flight_head].device][flight[flight_head].slot]);
        flight_head = (flight_head + 1) % MAX_SLOTS;
        flight_count--;
    }
}

HIDDEN CUresult ring_zero(uint64_t id, uint64_t offset, uint64_t length, char *why, size_t why_length) {
    CUdeviceptr view;
    int device;
    size_t size = 0;
    CUresult result = memory_view(id, &view, &device, &size);
    if (result == CUDA_SUCCESS && (offset > size || length > size - offset)) result = CUDA_ERROR_INVALID_VALUE;
    // A device that cannot be prepared fails the request: skipping the fill would leave stale bytes where the
    // checkpoint holds zeros, and the refill would report success.
    if (result == CUDA_SUCCESS) result = prepare_device(device, why, why_length);
    if (result == CUDA_SUCCESS) {
        result = real.cuMemsetD8Async(view + offset, 0, length, streams[device][stream_turn++ % settings.streams]);
    }
    return result;
}

HIDDEN int ring_flush_writes(int fd, char *why, size_t length) {
    while (flight_count > 0) {
        if (ring_finish_oldest(fd, STASIS_AGENT_WRITTEN, NULL, why, length) != 0) return -1;
    }
    for (int device = 0; device < MAX_DEVICES; device++) {
        for (unsigned s = 0; s < settings.streams; s++) {
            if (!streams[device][s]) continue;
            CUresult result = memory_use_device(device);
            if (result == CUDA_SUCCESS) result = real.cuStreamSynchronize(streams[device][s]);
            if (result != CUDA_SUCCESS) {
                snprintf(why, length, "writing GPU %d failed: %s", device, driver_error_name(result));
                return -1;
            }
        }
    }
    memory_drop_views();
    return 0;
}
