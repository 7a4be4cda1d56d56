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

/// A descriptor that came with the last message (SCM_RIGHTS; IMPORT's), or -1. Whoever uses it closes it;
/// the next receive closes one nobody took.
static int passed_fd = -1;

HIDDEN int control_receive(int fd, stasis_agent_message *message) {
    if (passed_fd >= 0) { close(passed_fd); passed_fd = -1; }
    return message_receive(fd, message, &passed_fd);
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
    return message_send(fd, &message, -1);
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
    message_send(fd, &message, -1);
}

// ---- the session with one stasis connection

static void hello(int fd) {
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = STASIS_AGENT_HELLO;
    message.version = STASIS_AGENT_PROTOCOL_VERSION;
    message.state = (uint32_t)state;
    message.ring_address = (uint64_t)(uintptr_t)ring_address();
    message.slot_bytes = (uint32_t)settings.slot_bytes;
    message.slot_count = settings.slot_count > MAX_SLOTS ? MAX_SLOTS : settings.slot_count;
    message.chunk_flags = STASIS_AGENT_CAN_RESUME_ITSELF;
    memory_entry *entries = NULL;
    memory_table(&entries, &message.tracked_bytes, &message.driver_bytes);
    free(entries);
    gate_counts(&message.gated_functions, &message.ungated_functions);
    snprintf(message.text, sizeof message.text, "libstasis-agent protocol %d", STASIS_AGENT_PROTOCOL_VERSION);
    message_send(fd, &message, -1);
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
    if (result == CUDA_SUCCESS && !ring_address()) {
        // No backed allocation pinned it yet (memory made before the agent saw a context): pin it now.
        memory_entry *entries = NULL;
        size_t count = memory_table(&entries, NULL, NULL);
        if (count > 0 && memory_use_device(entries[0].device) == CUDA_SUCCESS) ring_ensure();
        free(entries);
        if (count > 0 && !ring_address()) {
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
        if (message_send(fd, &message, -1) != 0) break;
    }
    free(entries);
    stasis_agent_message end;
    memset(&end, 0, sizeof end);
    end.op = STASIS_AGENT_TABLE_END;
    end.id = count;
    end.length = tracked;
    end.tracked_bytes = tracked;
    end.driver_bytes = driver_path;
    end.ring_address = (uint64_t)(uintptr_t)ring_address();
    end.slot_bytes = (uint32_t)settings.slot_bytes;
    end.slot_count = settings.slot_count > MAX_SLOTS ? MAX_SLOTS : settings.slot_count;
    end.state = (uint32_t)state;
    message_send(fd, &end, -1);
}

/// After the program goes on: an arena an evacuation used is dropped (stasis may have taken any piece), and
/// one is built where none is (after a restore, or a RELEASE), on its own thread.
static void renew_arena(void) {
    if (arena_spent()) arena_drop();
    ring_start_arena();
}

static void serve(int fd) {
    char why[160];
    ring_copies_reset();
    for (;;) {
        // Copies into the device finish while stasis sends more: report those that have ended, and when it
        // pauses, wait for the oldest.
        if (ring_copies_in_flight() > 0 && ring_finish_done(fd, STASIS_AGENT_WRITTEN, why, sizeof why) != 0) {
            reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
            return;
        }
        if (ring_copies_in_flight() > 0 && !message_waiting(fd)) {
            if (ring_finish_oldest(fd, STASIS_AGENT_WRITTEN, NULL, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); return; }
            continue;
        }
        stasis_agent_message message;
        if (control_receive(fd, &message) != 0) return;
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
            message.text[sizeof message.text - 1] = 0;  // the store's reserve directory, when it has one
            if (evacuate(fd, message.length == 1, message.text, &copied, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            evacuated = 1;
            stasis_agent_message done;
            memset(&done, 0, sizeof done);
            done.op = STASIS_AGENT_EVACUATED;
            done.length = copied;
            message_send(fd, &done, -1);
            break;
        }
        case STASIS_AGENT_RELEASE:
            if (state != STASIS_AGENT_HELD || !evacuated) { reply(fd, STASIS_AGENT_ERROR, 0, "nothing evacuated: quiesce and evacuate first"); break; }
            state = STASIS_AGENT_RELEASED;
            contents_lost = 1;
            // The driver's checkpoint and CRIU must see no arena: its pieces are the store's now.
            arena_drop();
            if (memory_release_all(why, sizeof why) != CUDA_SUCCESS || ring_unpin(why, sizeof why) != CUDA_SUCCESS) {
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
            if (ring_pin(why, sizeof why) != CUDA_SUCCESS || memory_reback_all(why, sizeof why) != CUDA_SUCCESS) {
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
            while (ring_copies_in_flight() >= settings.slot_count) {
                if (ring_finish_oldest(fd, STASIS_AGENT_WRITTEN, NULL, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); return; }
            }
            if (ring_copy_start(0, message.slot, message.id, message.offset, message.length, NULL, why, sizeof why) != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
                return;
            }
            break;
        case STASIS_AGENT_ZERO: {
            CUresult result = state == STASIS_AGENT_HELD ? ring_zero(message.id, message.offset, message.length, why, sizeof why)
                                                         : CUDA_ERROR_INVALID_VALUE;
            if (result != CUDA_SUCCESS) {
                reply(fd, STASIS_AGENT_ERROR, result, "cannot zero %#llx: %s", (unsigned long long)message.id, driver_error_name(result));
                return;
            }
            break;
        }
        case STASIS_AGENT_FLUSH:
            if (ring_flush_writes(fd, why, sizeof why) != 0) reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
            else reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        case STASIS_AGENT_DIGESTS:
            if (state == STASIS_AGENT_RUNNING) { reply(fd, STASIS_AGENT_ERROR, 0, "not held"); break; }
            prepare_digests(fd);
            break;
        case STASIS_AGENT_VERIFY:
            if (state != STASIS_AGENT_HELD) { reply(fd, STASIS_AGENT_ERROR, 0, "nothing to verify (state %d)", state); break; }
            if (ring_flush_writes(fd, why, sizeof why) != 0 || verify(fd, why, sizeof why) != 0) {
                reply(fd, STASIS_AGENT_ERROR, 0, "%s", why);
                return;
            }
            reply(fd, STASIS_AGENT_OK, 0, NULL);
            break;
        case STASIS_AGENT_EXPORT: {
            int exported = -1;
            if (state != STASIS_AGENT_HELD) { reply(fd, STASIS_AGENT_ERROR, 0, "not held: reback first"); break; }
            if (memory_export_again(message.id, &exported, why, sizeof why) != CUDA_SUCCESS) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            stasis_agent_message answer;
            memset(&answer, 0, sizeof answer);
            answer.op = STASIS_AGENT_OK;
            answer.id = message.id;
            message_send(fd, &answer, exported);
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
            message_send(fd, &answer, -1);
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
            message_send(fd, &answer, exported);
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
            if (ring_flush_writes(fd, why, sizeof why) != 0) { reply(fd, STASIS_AGENT_ERROR, 0, "%s", why); break; }
            state = STASIS_AGENT_RUNNING;
            contents_lost = 0;
            stasis_agent_orphan_resumed();
            gate_open();
            renew_arena();
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
                renew_arena();
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
    arena_after_fork_child();
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
