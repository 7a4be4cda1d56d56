// An evacuation and a verification, chunk by chunk: every allocation cut into chunks of one slot, copied out
// through the ring (EVACUATE: a FILLED per slot, stasis gives each back with FREE) or into the arena's pieces
// (a FILLED per piece, nothing given back), or hashed on the GPU after a refill (VERIFY: a DIGEST per chunk).
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "agent.h"
#include "stasis_agent_protocol.h"

/// Every chunk of every allocation, in the table's order (malloc'd into *out); the count, or 0 with `why`
/// set when an allocation cannot be seen.
static size_t plan_chunks(planned_chunk **out, char *why, size_t length) {
    memory_entry *entries = NULL;
    size_t count = memory_table(&entries, NULL, NULL), chunks = 0;
    for (size_t i = 0; i < count; i++) chunks += (entries[i].bytes + settings.slot_bytes - 1) / settings.slot_bytes;
    planned_chunk *plan = calloc(chunks ? chunks : 1, sizeof *plan);
    size_t n = 0;
    for (size_t i = 0; plan && i < count; i++) {
        if (entries[i].bytes == 0) continue;  // imported: its owner moves it
        CUdeviceptr view;
        int device;
        size_t size;
        CUresult result = memory_view(entries[i].id, &view, &device, &size);
        if (result != CUDA_SUCCESS || size < entries[i].bytes) {
            snprintf(why, length, "no device memory %#llx to copy: %s", (unsigned long long)entries[i].id, driver_error_name(result));
            free(plan);
            plan = NULL;
            break;
        }
        for (uint64_t offset = 0; offset < entries[i].bytes; offset += settings.slot_bytes) {
            uint64_t piece = entries[i].bytes - offset < settings.slot_bytes ? entries[i].bytes - offset : settings.slot_bytes;
            plan[n++] = (planned_chunk){entries[i].id, offset, piece, view + offset, device, 0, {{0}, 0}};
        }
    }
    if (!plan && !why[0]) snprintf(why, length, "out of memory");
    free(entries);
    *out = plan;
    return plan ? n : 0;
}

/// Hashes every planned chunk on the GPUs; a CUresult, with `why` on failure (nothing marked hashed then).
static CUresult hash_plan(planned_chunk *plan, size_t count, char *why, size_t length) {
    if (count == 0) return CUDA_SUCCESS;
    digest_job *jobs = calloc(count, sizeof *jobs);
    digest_out *sums = calloc(count, sizeof *sums);
    CUresult result = CUDA_ERROR_OUT_OF_MEMORY;
    if (jobs && sums) {
        for (size_t i = 0; i < count; i++) jobs[i] = (digest_job){plan[i].address, plan[i].length, plan[i].device};
        result = digest_chunks(jobs, count, sums, why, length);
    } else {
        snprintf(why, length, "out of memory");
    }
    for (size_t i = 0; result == CUDA_SUCCESS && i < count; i++) {
        plan[i].sum = sums[i];
        plan[i].hashed = 1;
    }
    free(jobs);
    free(sums);
    return result;
}

/// Sends `op` about one planned chunk: where it is, and with `flags` its digest (FILLED of a chunk of zeros,
/// without a slot; DIGEST after a refill).
static int send_chunk(int fd, uint32_t op, const planned_chunk *chunk, uint32_t flags) {
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = op;
    message.slot = -1;
    message.id = chunk->id;
    message.offset = chunk->offset;
    message.length = chunk->length;
    message.device = chunk->device;
    if (flags & STASIS_AGENT_CHUNK_DIGEST) memcpy(message.digest, chunk->sum.digest, sizeof message.digest);
    message.chunk_flags = flags;
    return message_send(fd, &message, -1);
}

/// Whether the arena can take this evacuation: every chunk hashed (stasis takes a piece by its digest, never
/// reading it) and a piece for every chunk that is not zero.
static int arena_fits(const planned_chunk *plan, size_t count, size_t pieces) {
    size_t needed = 0;
    for (size_t i = 0; i < count; i++) {
        if (!plan[i].hashed) return 0;
        if (!plan[i].sum.zero) needed++;
    }
    return pieces > 0 && needed <= pieces;
}

/// Copies every chunk that is not zero into a piece of its own, as fast as the copy engines go: a window of
/// copies in flight, each told to stasis (FILLED with CHUNK_ARENA) once done, oldest first.
static int evacuate_into_arena(int fd, const planned_chunk *plan, size_t count, uint64_t *copied, char *why, size_t length) {
    unsigned window = settings.slot_count < 32 ? 32 : settings.slot_count;
    if (window > MAX_SLOTS) window = MAX_SLOTS;
    size_t piece = 0;
    int status = 0;
    ring_copies_reset();
    for (size_t i = 0; i < count && status == 0; i++) {
        if (plan[i].sum.zero) {
            if (send_chunk(fd, STASIS_AGENT_FILLED, &plan[i], STASIS_AGENT_CHUNK_ZERO) != 0) {
                snprintf(why, length, "stasis went away during the evacuation");
                status = -1;
            }
            continue;
        }
        while (status == 0 && ring_copies_in_flight() >= window) status = ring_finish_oldest(fd, STASIS_AGENT_FILLED, NULL, why, length);
        if (status != 0) break;
        if (ring_copy_to_arena(piece++, &plan[i], why, length) != CUDA_SUCCESS) {
            status = -1;
            break;
        }
        *copied += plan[i].length;
        status = ring_finish_done(fd, STASIS_AGENT_FILLED, why, length);
    }
    while (status == 0 && ring_copies_in_flight() > 0) status = ring_finish_oldest(fd, STASIS_AGENT_FILLED, NULL, why, length);
    ring_copies_abandon();
    return status;
}

/// FILLED for chunk `index` of the plan, copied into piece `index`: its digest, and the piece's file name.
static int send_piece(int fd, const planned_chunk *chunk, size_t index) {
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = STASIS_AGENT_FILLED;
    message.slot = (int32_t)index;
    message.id = chunk->id;
    message.offset = chunk->offset;
    message.length = chunk->length;
    message.device = chunk->device;
    memcpy(message.digest, chunk->sum.digest, sizeof message.digest);
    message.chunk_flags = STASIS_AGENT_CHUNK_DIGEST | STASIS_AGENT_CHUNK_ARENA;
    arena_piece_name(index, message.text, sizeof message.text);
    return message_send(fd, &message, -1);
}

/// The arena's fast way: the GPU hashes every chunk while the copy engines copy every chunk (zeros too) into
/// piece i for chunk i; once the digests are in, each chunk is reported as its copy ends (a zero chunk without
/// its piece, which stays the reserve's). For one GPU and one digest launch's worth of chunks, with a piece
/// for every chunk; 1 when it does not apply (nothing touched), else 0 or -1.
static int evacuate_overlapped(int fd, planned_chunk *plan, size_t count, uint64_t *copied, char *why, size_t length) {
    int device = plan[0].device;
    for (size_t i = 1; i < count; i++) {
        if (plan[i].device != device) return 1;
    }
    digest_job *jobs = calloc(count, sizeof *jobs);
    digest_out *sums = calloc(count, sizeof *sums);
    int status = 1;
    if (jobs && sums) {
        for (size_t i = 0; i < count; i++) jobs[i] = (digest_job){plan[i].address, plan[i].length, device};
        char reason[120] = "";
        if (digest_start_one_device(jobs, count, device, reason, sizeof reason) == CUDA_SUCCESS) status = 0;
        else agent_log("%s; the evacuation hashes, then copies", reason[0] ? reason : "no digest launch for this plan");
    }
    if (status == 0) {
        // Spent from here on, whatever happens: stasis may take any piece.
        arena_mark_spent();
        CUresult copies = ring_copy_plan_to_arena(plan, count, device, why, length);
        char reason[120] = "";
        CUresult digests = digest_finish_one_device(device, count, sums, reason, sizeof reason);
        if (copies != CUDA_SUCCESS) {
            status = -1;
        } else if (digests != CUDA_SUCCESS) {
            snprintf(why, length, "%s", reason);
            ring_wait_device(device);
            status = -1;
        }
    }
    for (size_t i = 0; status == 0 && i < count; i++) {
        plan[i].sum = sums[i];
        plan[i].hashed = 1;
        CUresult result = ring_arena_copy_wait(i);
        if (result != CUDA_SUCCESS) {
            snprintf(why, length, "copy of %#llx at %llu failed: %s", (unsigned long long)plan[i].id, (unsigned long long)plan[i].offset,
                     driver_error_name(result));
            ring_wait_device(device);
            status = -1;
        } else if (plan[i].sum.zero ? send_chunk(fd, STASIS_AGENT_FILLED, &plan[i], STASIS_AGENT_CHUNK_ZERO) != 0 : send_piece(fd, &plan[i], i) != 0) {
            snprintf(why, length, "stasis went away during the evacuation");
            ring_wait_device(device);
            status = -1;
        } else if (!plan[i].sum.zero) {
            *copied += plan[i].length;
        }
    }
    free(jobs);
    free(sums);
    return status;
}

static double seconds_between(const struct timespec *from, const struct timespec *to) {
    return (double)(to->tv_sec - from->tv_sec) + (double)(to->tv_nsec - from->tv_nsec) / 1e9;
}

/// Where an evacuation's time went (issue 29): the GPU's hashing from `start` to `hashed`, then the copies.
static void log_times(const char *how, size_t count, uint64_t copied, const struct timespec *start, const struct timespec *hashed) {
    struct timespec done;
    clock_gettime(CLOCK_MONOTONIC, &done);
    agent_log("evacuation: %zu chunks hashed in %.3f s, %llu MiB copied %s in %.3f s", count, seconds_between(start, hashed),
              (unsigned long long)(copied >> 20), how, seconds_between(hashed, &done));
}

HIDDEN int evacuate(int fd, int with_digests, const char *arena_directory, uint64_t *copied, char *why, size_t length) {
    planned_chunk *plan = NULL;
    size_t count = plan_chunks(&plan, why, length);
    if (!plan) return -1;
    struct timespec start, hashed;
    clock_gettime(CLOCK_MONOTONIC, &start);
    *copied = 0;
    if (with_digests && settings.arena_overlap && count > 0 && arena_usable(arena_directory) >= count) {
        int status = evacuate_overlapped(fd, plan, count, copied, why, length);
        if (status != 1) {
            clock_gettime(CLOCK_MONOTONIC, &hashed);
            agent_log("evacuation: %zu chunks hashed while %llu MiB were copied into the arena, in %.3f s", count,
                      (unsigned long long)(*copied >> 20), seconds_between(&start, &hashed));
            free(plan);
            return status;
        }
    }
    if (with_digests) {
        char reason[120] = "";
        if (hash_plan(plan, count, reason, sizeof reason) != CUDA_SUCCESS) agent_log("%s; stasis hashes on its CPUs", reason);
    }
    clock_gettime(CLOCK_MONOTONIC, &hashed);
    *copied = 0;
    if (with_digests && arena_fits(plan, count, arena_usable(arena_directory))) {
        // Spent from here on, whatever happens: stasis may have taken any piece.
        arena_mark_spent();
        int status = evacuate_into_arena(fd, plan, count, copied, why, length);
        log_times("into the arena", count, *copied, &start, &hashed);
        free(plan);
        return status;
    }
    int free_slots[MAX_SLOTS];
    char lent[MAX_SLOTS] = {0};  // slots stasis holds: a FREE for any other is refused
    unsigned free_count = 0, slots = settings.slot_count;
    for (unsigned s = 0; s < slots; s++) free_slots[free_count++] = (int)(slots - 1 - s);
    size_t next = 0;
    int status = 0;
    *copied = 0;
    ring_copies_reset();
    while (status == 0) {
        while (next < count && (plan[next].hashed && plan[next].sum.zero)) {
            if (send_chunk(fd, STASIS_AGENT_FILLED, &plan[next++], STASIS_AGENT_CHUNK_ZERO) != 0) {
                snprintf(why, length, "stasis went away during the evacuation");
                status = -1;
                break;
            }
        }
        while (status == 0 && free_count > 0 && next < count && !(plan[next].hashed && plan[next].sum.zero)) {
            const planned_chunk *chunk = &plan[next++];
            if (ring_copy_start(1, free_slots[--free_count], chunk->id, chunk->offset, chunk->length, chunk, why, length) != CUDA_SUCCESS) {
                status = -1;
                break;
            }
            *copied += chunk->length;
        }
        if (status != 0) break;
        if (ring_copies_in_flight() > 0) {
            status = ring_finish_oldest(fd, STASIS_AGENT_FILLED, lent, why, length);
            if (status != 0) break;
        }
        // Take back the slots stasis has read: those already sent, and when nothing else can move (every
        // slot is out, or everything is copied), wait for one.
        int must_wait = ring_copies_in_flight() == 0 && free_count < slots && (next == count || free_count == 0);
        while (status == 0 && (must_wait || message_waiting(fd))) {
            must_wait = 0;
            stasis_agent_message message;
            if (control_receive(fd, &message) != 0) {
                snprintf(why, length, "stasis went away during the evacuation");
                status = -1;
            } else if (message.op != STASIS_AGENT_FREE || message.slot < 0 || (unsigned)message.slot >= slots || !lent[message.slot]) {
                snprintf(why, length, "unexpected message %u (slot %d) during the evacuation", message.op, message.slot);
                status = -1;
            } else {
                lent[message.slot] = 0;
                free_slots[free_count++] = message.slot;
            }
        }
        if (next == count && ring_copies_in_flight() == 0 && free_count == slots) break;
    }
    // On failure, let running copies end before anything else touches the ring.
    ring_copies_abandon();
    log_times("through the ring", count, *copied, &start, &hashed);
    free(plan);
    return status;
}

HIDDEN int verify(int fd, char *why, size_t length) {
    planned_chunk *plan = NULL;
    size_t count = plan_chunks(&plan, why, length);
    if (!plan) return -1;
    int status = hash_plan(plan, count, why, length) != CUDA_SUCCESS ? -1 : 0;
    for (size_t i = 0; status == 0 && i < count; i++) {
        uint32_t flags = STASIS_AGENT_CHUNK_DIGEST | (plan[i].sum.zero ? STASIS_AGENT_CHUNK_ZERO : 0);
        if (send_chunk(fd, STASIS_AGENT_DIGEST, &plan[i], flags) != 0) status = -1;
    }
    free(plan);
    memory_drop_views();
    return status;
}
