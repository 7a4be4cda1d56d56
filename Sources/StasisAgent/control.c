// The control channel: a thread that serves stasis on "@stasis-agent-<pid>" (see stasis_agent_protocol.h).
// It starts with the first successful cuInit, so processes of the tree that never use CUDA (a launcher
// shell, DataLoader workers) carry no thread and no socket.
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "include/stasis_agent.h"
#include "stasis_agent_protocol.h"


static pthread_mutex_t start_mutex = PTHREAD_MUTEX_INITIALIZER;
static int started;
static int listener = -1;
static int state = STASIS_AGENT_RUNNING;
// Set when physical memory is released, cleared by RESUME: from then on only stasis can put the contents
// back, so a lost connection must not let the program run on.
static int contents_lost;
// Set by a complete EVACUATE of the current hold: RELEASE gives nothing back before it.
static int evacuated;

// ---- messages

static int send_message(int fd, stasis_agent_message *message) {
    const char *bytes = (const char *)message;
    size_t done = 0;
    while (done < sizeof *message) {
        ssize_t sent = send(fd, bytes + done, sizeof *message - done, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) return -1;
        done += (size_t)sent;
    }
    return 0;
}

/// A descriptor that came with the last message (SCM_RIGHTS; IMPORT's), or -1. Whoever uses it closes it;
/// the next receive closes one nobody took.
static int passed_fd = -1;

static int receive_message(int fd, stasis_agent_message *message) {
    if (passed_fd >= 0) { close(passed_fd); passed_fd = -1; }
    char *bytes = (char *)message;
    size_t done = 0;
    while (done < sizeof *message) {
        struct iovec vector = {bytes + done, sizeof *message - done};
        union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
        struct msghdr header = {0};
        header.msg_iov = &vector;
        header.msg_iovlen = 1;
        header.msg_control = control.space;
        header.msg_controllen = sizeof control.space;
        ssize_t got = recvmsg(fd, &header, MSG_CMSG_CLOEXEC);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        struct cmsghdr *passed = CMSG_FIRSTHDR(&header);
        if (passed && passed->cmsg_level == SOL_SOCKET && passed->cmsg_type == SCM_RIGHTS) {
            int received;
            memcpy(&received, CMSG_DATA(passed), sizeof received);
            if (passed_fd >= 0) close(passed_fd);
            passed_fd = received;
        }
        done += (size_t)got;
    }
    return 0;
}

/// Sends `message` with descriptor `fd` attached (SCM_RIGHTS, on its first byte).
static int send_message_with_fd(int fd, stasis_agent_message *message, int passed) {
    struct iovec vector = {message, sizeof *message};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr header = {0};
    header.msg_iov = &vector;
    header.msg_iovlen = 1;
    header.msg_control = control.space;
    header.msg_controllen = sizeof control.space;
    struct cmsghdr *attached = CMSG_FIRSTHDR(&header);
    attached->cmsg_level = SOL_SOCKET;
    attached->cmsg_type = SCM_RIGHTS;
    attached->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(attached), &passed, sizeof passed);
    ssize_t sent;
    do { sent = sendmsg(fd, &header, MSG_NOSIGNAL); } while (sent < 0 && errno == EINTR);
    if (sent <= 0) return -1;
    if ((size_t)sent == sizeof *message) return 0;
    // The rest of the message, without the descriptor (it went with the first byte).
    const char *bytes = (const char *)message;
    for (size_t done = (size_t)sent; done < sizeof *message;) {
        ssize_t more = send(fd, bytes + done, sizeof *message - done, MSG_NOSIGNAL);
        if (more < 0 && errno == EINTR) continue;
        if (more <= 0) return -1;
        done += (size_t)more;
    }
    return 0;
}

static int reply(int fd, uint32_t op, int status, const char *format, ...) __attribute__((format(printf, 4, 5)));
static int reply(int fd, uint32_t op, int status, const char *format, ...) {
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = op;
    message.status = status;
    message.state = (uint32_t)state;
    if (format) {
        va_list arguments;
        va_start(arguments, format);
        vsnprintf(message.text, sizeof message.text, format, arguments);
        va_end(arguments);
        if (op == STASIS_AGENT_ERROR) agent_log("%s", message.text);
    }
    return send_message(fd, &message);
}

// ---- copies through the ring

static CUstream streams[MAX_DEVICES][8];
static CUevent events[MAX_DEVICES][MAX_SLOTS];
static unsigned stream_turn;

// One chunk of an evacuation: where it is and, when the GPU hashed it, its digest.
typedef struct {
    uint64_t id, offset, length;
    CUdeviceptr address;
    int device;
    int hashed;  // digest is the GPU's
    digest_out sum;
} planned_chunk;

typedef struct {
    int slot;
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

/// Starts a copy between slot `slot` of the ring and bytes [offset, offset + length) of allocation `id`.
static CUresult start_copy(int out, int slot, uint64_t id, uint64_t offset, uint64_t length, const planned_chunk *chunk, char *why,
                           size_t why_length) {
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
    char *host = (char *)memory_ring() + (size_t)slot * settings.slot_bytes;
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
    *entry = (copy){slot, device, id, offset, length, chunk};
    return CUDA_SUCCESS;
}

// Slots of an evacuation that stasis holds (sent FILLED, not yet FREE).
static char *lent_slots;

/// Waits for the oldest copy and tells stasis about it with `op`.
static int finish_oldest(int fd, uint32_t op, char *why, size_t length) {
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
    message.slot = entry->slot;
    message.id = entry->id;
    message.offset = entry->offset;
    message.length = entry->length;
    message.device = entry->device;
    if (entry->chunk && entry->chunk->hashed) {
        memcpy(message.digest, entry->chunk->sum.digest, sizeof message.digest);
        message.chunk_flags = STASIS_AGENT_CHUNK_DIGEST;
    }
    if (op == STASIS_AGENT_FILLED && lent_slots) lent_slots[entry->slot] = 1;
    if (send_message(fd, &message) != 0) {
        snprintf(why, length, "stasis went away during the copy");
        return -1;
    }
    return 0;
}

/// Tells stasis with `op` of every copy that has finished already, oldest first, without waiting: slots go
/// back as soon as their copies end, not only once the ring is full or stasis pauses.
static int finish_done(int fd, uint32_t op, char *why, size_t length) {
    while (flight_count > 0 && real.cuEventQuery(events[flight[flight_head].device][flight[flight_head].slot]) != CUDA_ERROR_NOT_READY) {
        // Finished, or failed: finish_oldest tells which.
        if (finish_oldest(fd, op, why, length) != 0) return -1;
    }
    return 0;
}

static int readable(int fd) {
    struct pollfd poller = {fd, POLLIN, 0};
    return poll(&poller, 1, 0) > 0;
}

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
    return send_message(fd, &message);
}

/// Copies every allocation out through the ring: a FILLED per slot, and stasis gives each slot back with
/// FREE once it has read it. With `with_digests`, the GPU hashes every chunk first: FILLED then carries the
/// digest, and chunks of zeros are not copied at all. Returns 0, or -1 with `why`.
static int evacuate(int fd, int with_digests, uint64_t *copied, char *why, size_t length) {
    planned_chunk *plan = NULL;
    size_t count = plan_chunks(&plan, why, length);
    if (!plan) return -1;
    if (with_digests) {
        char reason[120] = "";
        if (hash_plan(plan, count, reason, sizeof reason) != CUDA_SUCCESS) agent_log("%s; stasis hashes on its CPUs", reason);
    }
    int free_slots[MAX_SLOTS];
    char lent[MAX_SLOTS] = {0};  // slots stasis holds: a FREE for any other is refused
    unsigned free_count = 0, slots = settings.slot_count;
    for (unsigned s = 0; s < slots; s++) free_slots[free_count++] = (int)(slots - 1 - s);
    size_t next = 0;
    int status = 0;
    *copied = 0;
    flight_head = flight_count = 0;
    lent_slots = lent;
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
            if (start_copy(1, free_slots[--free_count], chunk->id, chunk->offset, chunk->length, chunk, why, length) != CUDA_SUCCESS) {
                status = -1;
                break;
            }
            *copied += chunk->length;
        }
        if (status != 0) break;
        if (flight_count > 0) {
            status = finish_oldest(fd, STASIS_AGENT_FILLED, why, length);
            if (status != 0) break;
        }
        // Take back the slots stasis has read: those already sent, and when nothing else can move (every
        // slot is out, or everything is copied), wait for one.
        int must_wait = flight_count == 0 && free_count < slots && (next == count || free_count == 0);
        while (status == 0 && (must_wait || readable(fd))) {
            must_wait = 0;
            stasis_agent_message message;
            if (receive_message(fd, &message) != 0) {
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
        if (next == count && flight_count == 0 && free_count == slots) break;
    }
    // On failure, let running copies end before anything else touches the ring.
    while (flight_count > 0) {
        real.cuEventSynchronize(events[flight[flight_head].device][flight[flight_head].slot]);
        flight_head = (flight_head + 1) % MAX_SLOTS;
        flight_count--;
    }
    lent_slots = NULL;
    free(plan);
    return status;
}

/// Loads the digest kernel on every GPU the agent has memory on; answers OK with length 1, or 0 and why not.
static void prepare_digests(int fd) {
    char why[120] = "turned off (STASIS_AGENT_GPU_DIGESTS=off)";
    memory_entry *entries = NULL;
    size_t count = memory_table(&entries, NULL, NULL);
    CUresult result = settings.gpu_digests ? CUDA_SUCCESS : CUDA_ERROR_NOT_SUPPORTED;
    for (size_t i = 0; result == CUDA_SUCCESS && i < count; i++) result = digest_prepare(entries[i].device, why, sizeof why);
    free(entries);
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = STASIS_AGENT_OK;
    message.state = (uint32_t)state;
    message.length = result == CUDA_SUCCESS;
    if (result != CUDA_SUCCESS) snprintf(message.text, sizeof message.text, "%s", why);
    send_message(fd, &message);
}

/// Hashes every chunk now in the device and sends a DIGEST each, then OK; 0, or -1 with `why`.
static int verify(int fd, char *why, size_t length) {
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
    if (status == 0) reply(fd, STASIS_AGENT_OK, 0, NULL);
    return status;
}

// ---- the session with one stasis connection

static void hello(int fd) {
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = STASIS_AGENT_HELLO;
    message.version = STASIS_AGENT_PROTOCOL_VERSION;
    message.state = (uint32_t)state;
    message.ring_address = (uint64_t)(uintptr_t)memory_ring();
    message.slot_bytes = (uint32_t)settings.slot_bytes;
    message.slot_count = settings.slot_count > MAX_SLOTS ? MAX_SLOTS : settings.slot_count;
    message.chunk_flags = STASIS_AGENT_CAN_RESUME_ITSELF;
    memory_entry *entries = NULL;
    memory_table(&entries, &message.tracked_bytes, &message.driver_bytes);
    free(entries);
    gate_counts(&message.gated_functions, &message.ungated_functions);
    snprintf(message.text, sizeof message.text, "libstasis-agent protocol %d", STASIS_AGENT_PROTOCOL_VERSION);
    send_message(fd, &message);
}

static void quiesce(int fd, unsigned timeout_ms) {
    char why[160] = "";
    if (state != STASIS_AGENT_RUNNING) { reply(fd, STASIS_AGENT_ERROR, 0, "a checkpoint is already in progress"); return; }
    const char *refusal = memory_refusal();
    if (refusal) { reply(fd, STASIS_AGENT_ERROR, CUDA_ERROR_NOT_SUPPORTED, "%s", refusal); return; }
    struct timespec started;
    clock_gettime(CLOCK_MONOTONIC, &started);
    long inside = gate_close(timeout_ms);
    if (inside > 0) {
        reply(fd, STASIS_AGENT_ERROR, 0, "%ld thread(s) stayed inside CUDA calls for %u ms; the program runs on", inside, timeout_ms);
        return;
    }
    refusal = memory_refusal();
    // The synchronisation gets what is left of the same time limit.
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long spent = (now.tv_sec - started.tv_sec) * 1000 + (now.tv_nsec - started.tv_nsec) / 1000000;
    // At least a second: a slow drain must not leave the synchronisation no time at all.
    unsigned left = spent + 1000 >= (long)timeout_ms ? 1000 : timeout_ms - (unsigned)spent;
    CUresult result = refusal ? CUDA_ERROR_NOT_SUPPORTED : memory_synchronize(left, why, sizeof why);
    if (result == CUDA_SUCCESS && !memory_ring()) {
        // No backed allocation pinned it yet (memory made before the agent saw a context): pin it now.
        memory_entry *entries = NULL;
        size_t count = memory_table(&entries, NULL, NULL);
        if (count > 0 && memory_use_device(entries[0].device) == CUDA_SUCCESS) memory_ensure_ring();
        free(entries);
        if (count > 0 && !memory_ring()) {
            result = CUDA_ERROR_OUT_OF_MEMORY;
            snprintf(why, sizeof why, "cannot pin the staging ring (%u MiB)", (unsigned)(settings.slot_count * settings.slot_bytes >> 20));
        }
    }
    if (result != CUDA_SUCCESS) {
        gate_open();
        reply(fd, STASIS_AGENT_ERROR, result, "%s", refusal ? refusal : why);
        return;
    }
    state = STASIS_AGENT_HELD;
    evacuated = 0;
    memory_entry *entries = NULL;
    uint64_t tracked = 0, driver_path = 0;
    size_t count = memory_table(&entries, &tracked, &driver_path);
    for (size_t i = 0; i < count; i++) {
        stasis_agent_message message;
        memset(&message, 0, sizeof message);
        message.op = STASIS_AGENT_TABLE_ENTRY;
        message.id = entries[i].id;
        message.length = entries[i].bytes;
        message.device = entries[i].device;
        message.chunk_flags = entries[i].share_flags;
        message.share_count = (uint32_t)entries[i].share_count;
        message.slot = entries[i].share_count > 0 ? entries[i].share_fds[0] : -1;
        memcpy(message.digest, entries[i].share_fds, sizeof entries[i].share_fds);
        if (send_message(fd, &message) != 0) break;
    }
    free(entries);
    stasis_agent_message end;
    memset(&end, 0, sizeof end);
    end.op = STASIS_AGENT_TABLE_END;
    end.id = count;
    end.length = tracked;
    end.tracked_bytes = tracked;
    end.driver_bytes = driver_path;
    end.ring_address = (uint64_t)(uintptr_t)memory_ring();
    end.slot_bytes = (uint32_t)settings.slot_bytes;
    end.slot_count = settings.slot_count > MAX_SLOTS ? MAX_SLOTS : settings.slot_count;
    end.state = (uint32_t)state;
    send_message(fd, &end);
}

/// Finishes every copy into the device and waits for the zero fills; 0, or -1 with `why`.
static int flush_writes(int fd, char *why, size_t length) {
    while (flight_count > 0) {
        if (finish_oldest(fd, STASIS_AGENT_WRITTEN, why, length) != 0) return -1;
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

static void serve(int fd) {
    char why[160];
    flight_head = flight_count = 0;
    for (;;) {
        // Copies into the device finish while stasis sends more: report those that have ended, and when it
        // pauses, wait for the oldest.
        if (flight_count > 0 && finish_done(fd, STASIS_AGENT_WRITTEN, why, sizeof why) != 0) {
            reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
            return;
        }
        if (flight_count > 0 && !readable(fd)) {
            if (finish_oldest(fd, STASIS_AGENT_WRITTEN, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); return; }
            continue;
        }
        stasis_agent_message message;
        if (receive_message(fd, &message) != 0) return;
        why[0] = 0;
        switch (message.op) {
        case STASIS_AGENT_HELLO:
            hello(fd);
            break;
        case STASIS_AGENT_QUIESCE:
            quiesce(fd, message.length ? (unsigned)message.length : 10000);
            break;
        case STASIS_AGENT_EVACUATE: {
            uint64_t copied = 0;
            if (state != STASIS_AGENT_HELD) { reply(fd, STASIS_AGENT_ERROR, 0, "not held: quiesce first"); break; }
            if (evacuate(fd, message.length == 1, &copied, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            evacuated = 1;
            stasis_agent_message done;
            memset(&done, 0, sizeof done);
            done.op = STASIS_AGENT_EVACUATED;
            done.length = copied;
            send_message(fd, &done);
            break;
        }
        case STASIS_AGENT_RELEASE:
            if (state != STASIS_AGENT_HELD || !evacuated) { reply(fd, STASIS_AGENT_ERROR, 0, "nothing evacuated: quiesce and evacuate first"); break; }
            state = STASIS_AGENT_RELEASED;
            contents_lost = 1;
            if (memory_release_all(why, sizeof why) != CUDA_SUCCESS || memory_ring_unpin(why, sizeof why) != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
            } else {
                stasis_agent_orphan_released(fd);
                reply(fd, STASIS_AGENT_OK, 0, NULL);
            }
            break;
        case STASIS_AGENT_RESCUE_STORE:
            stasis_agent_orphan_store_piece(&message);
            break;
        case STASIS_AGENT_REBACK:
            if (state == STASIS_AGENT_RUNNING) { reply(fd, STASIS_AGENT_ERROR, 0, "not held"); break; }
            if (memory_ring_pin(why, sizeof why) != CUDA_SUCCESS || memory_reback_all(why, sizeof why) != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
                break;
            }
            state = STASIS_AGENT_HELD;
            reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        case STASIS_AGENT_WRITE:
            if (state != STASIS_AGENT_HELD || message.slot < 0 || (unsigned)message.slot >= settings.slot_count || message.length > settings.slot_bytes) {
                reply(fd, STASIS_AGENT_ERROR, 0, "bad WRITE (state %d, slot %d, %llu bytes)", state, message.slot, (unsigned long long)message.length);
                return;
            }
            while (flight_count >= settings.slot_count) {
                if (finish_oldest(fd, STASIS_AGENT_WRITTEN, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); return; }
            }
            if (start_copy(0, message.slot, message.id, message.offset, message.length, NULL, why, sizeof why) != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
                return;
            }
            break;
        case STASIS_AGENT_ZERO: {
            CUdeviceptr view;
            int device;
            size_t size = 0;
            CUresult result = state == STASIS_AGENT_HELD ? memory_view(message.id, &view, &device, &size) : CUDA_ERROR_INVALID_VALUE;
            if (result == CUDA_SUCCESS && (message.offset > size || message.length > size - message.offset)) result = CUDA_ERROR_INVALID_VALUE;
            if (result == CUDA_SUCCESS && prepare_device(device, why, sizeof why) == CUDA_SUCCESS) {
                result = real.cuMemsetD8Async(view + message.offset, 0, message.length, streams[device][stream_turn++ % settings.streams]);
            }
            if (result != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, result, "cannot zero %#llx: %s", (unsigned long long)message.id, driver_error_name(result));
                return;
            }
            break;
        }
        case STASIS_AGENT_FLUSH:
            if (flush_writes(fd, why, sizeof why) != 0) reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
            else reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        case STASIS_AGENT_DIGESTS:
            if (state == STASIS_AGENT_RUNNING) { reply(fd, STASIS_AGENT_ERROR, 0, "not held"); break; }
            prepare_digests(fd);
            break;
        case STASIS_AGENT_VERIFY:
            if (state != STASIS_AGENT_HELD) { reply(fd, STASIS_AGENT_ERROR, 0, "nothing to verify (state %d)", state); break; }
            if (flush_writes(fd, why, sizeof why) != 0 || verify(fd, why, sizeof why) != 0) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
                return;
            }
            break;
        case STASIS_AGENT_EXPORT: {
            int exported = -1;
            if (state != STASIS_AGENT_HELD) { reply(fd, STASIS_AGENT_ERROR, 0, "not held: reback first"); break; }
            if (memory_export_again(message.id, &exported, why, sizeof why) != CUDA_SUCCESS) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            stasis_agent_message answer;
            memset(&answer, 0, sizeof answer);
            answer.op = STASIS_AGENT_OK;
            answer.id = message.id;
            send_message_with_fd(fd, &answer, exported);
            close(exported);
            break;
        }
        case STASIS_AGENT_IMPORT: {
            int imported = passed_fd;
            passed_fd = -1;
            if (state != STASIS_AGENT_HELD || imported < 0) {
                if (imported >= 0) close(imported);
                reply(fd, STASIS_AGENT_ERROR, 0, imported < 0 ? "IMPORT came without a descriptor" : "not held: reback first");
                break;
            }
            CUresult result = memory_import_again(message.id, imported, why, sizeof why);
            close(imported);
            if (result != CUDA_SUCCESS) reply(fd, STASIS_AGENT_ERROR, result, "%s", why);
            else reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        }
        case STASIS_AGENT_ADOPT:
            if (state != STASIS_AGENT_HELD || evacuated) { reply(fd, STASIS_AGENT_ERROR, 0, "adopt between QUIESCE and EVACUATE"); break; }
        {
            uint64_t bytes = 0;
            if (memory_adopt(message.id, &bytes, why, sizeof why) != CUDA_SUCCESS) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            stasis_agent_message answer;
            memset(&answer, 0, sizeof answer);
            answer.op = STASIS_AGENT_OK;
            answer.id = message.id;
            answer.length = bytes;  // its size: now this agent's to copy out
            send_message(fd, &answer);
            break;
        }
        case STASIS_AGENT_IPC_FD: {
            // Another process's agent opening this process's memory (legacy CUDA IPC), at any time but while
            // the memory is released.
            int exported = state == STASIS_AGENT_RELEASED ? -1 : memory_ipc_fd(message.id);
            if (exported < 0) { reply(fd, STASIS_AGENT_ERROR, 0, "no IPC export of %#llx here now", (unsigned long long)message.id); return; }
            stasis_agent_message answer;
            memset(&answer, 0, sizeof answer);
            answer.op = STASIS_AGENT_OK;
            answer.id = message.id;
            send_message_with_fd(fd, &answer, exported);
            close(exported);
            return;  // one request per connection
        }
        case STASIS_AGENT_RESUME:
            if (state == STASIS_AGENT_RELEASED) { reply(fd, STASIS_AGENT_ERROR, 0, "device memory is released: reback and refill first"); break; }
            if (memory_unmapped() > 0) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%d mapping(s) of device memory are not back yet (imported memory waits for IMPORT)", memory_unmapped());
                break;
            }
            // Copies still running into the device finish before any program thread goes on.
            if (flush_writes(fd, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            state = STASIS_AGENT_RUNNING;
            contents_lost = 0;
            stasis_agent_orphan_resumed();
            gate_open();
            reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        default:
            reply(fd, STASIS_AGENT_ERROR, 0, "unknown request %u", message.op);
            return;
        }
    }
}

static int allowed(int fd) {
    struct ucred peer;
    socklen_t length = sizeof peer;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0) return 0;
    return peer.uid == 0 || peer.uid == geteuid();
}

static void *control_thread(void *unused) {
    (void)unused;
    for (;;) {
        // While memory is released, wait in turns: the stasis that released it may die (orphan.c). A poll
        // interrupted (CRIU seized and let go of this thread) is a turn too, never a blocking accept.
        int turn = stasis_agent_orphan_step(contents_lost);
        struct pollfd waiting = {listener, POLLIN, 0};
        if (turn >= 0 && poll(&waiting, 1, turn) <= 0) continue;
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED) {
                struct timespec pause = {0, 100 * 1000000L};
                nanosleep(&pause, NULL);
            }
            continue;
        }
        if (allowed(fd)) {
            serve(fd);
            // stasis went away while the memory was still backed: nothing was lost, the program runs on.
            if (state == STASIS_AGENT_HELD && !contents_lost) {
                memory_drop_views();
                state = STASIS_AGENT_RUNNING;
                gate_open();
                agent_log("the checkpoint was abandoned; CUDA calls proceed");
            }
        }
        close(fd);
    }
    return NULL;
}

static void after_fork_child(void) {
    // The child has no control thread, and CUDA does not work across fork: it starts afresh if it execs.
    if (listener >= 0) close(listener);
    listener = -1;
    started = 0;
    state = STASIS_AGENT_RUNNING;
    contents_lost = 0;
    stasis_agent_orphan_after_fork_child();
    pthread_mutex_init(&start_mutex, NULL);
    gate_after_fork_child();
    memory_after_fork_child();
}

HIDDEN void control_start(void) {
    pthread_mutex_lock(&start_mutex);
    if (started) { pthread_mutex_unlock(&start_mutex); return; }
    started = 1;
    static int atfork_registered;
    if (!atfork_registered) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_registered = 1;
    }
    struct sockaddr_un address;
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    int name = snprintf(address.sun_path + 1, sizeof address.sun_path - 1, STASIS_AGENT_SOCKET_PREFIX "%d", getpid());
    socklen_t length = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)name);
    listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, length) != 0 || listen(listener, 4) != 0) {
        agent_log("cannot listen on @%s: %s; checkpoints take the driver path", address.sun_path + 1, strerror(errno));
        if (listener >= 0) close(listener);
        listener = -1;
        pthread_mutex_unlock(&start_mutex);
        return;
    }
    // The thread takes no signal of the program's.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    pthread_t thread;
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attributes, control_thread, NULL) == 0) {
        pthread_setname_np(thread, "stasis-agent");
        agent_log("listening on @%s", address.sun_path + 1);
    } else {
        close(listener);
        listener = -1;
    }
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    pthread_mutex_unlock(&start_mutex);
}
