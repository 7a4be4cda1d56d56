// The arena (issue 29): pinned host pages that become the chunk store's own, so that an evacuation costs one
// DMA a byte and no CPU copy. `stasis run --arena SIZE` names a store in memory (tmpfs); the agent then takes
// SIZE of chunk-sized files in its reserve directory (the reserve's blanks first: their pages exist already),
// maps them one after another into one address range, faults them in and pins them, on a thread of its own
// while the program runs. An evacuation into that store copies each chunk from the device straight into a
// piece's payload (after the 12-byte chunk header) and tells stasis the piece's file name; stasis writes the
// header and renames the file into the store. Nothing is copied by a CPU.
//
// The pieces stasis took are the store's from then on, so the arena is spent by one evacuation: at RELEASE
// (before the driver checkpoint and CRIU, which must see none of it) it is unpinned and unmapped, and the
// pieces stasis did not take (chunks the store had) go back to the reserve as blanks. After RESUME it is
// built anew, again off the program's path. While the arena exists the agent holds an exclusive flock on
// arena-ID.lock; `stasis gc` gives back the pieces of an arena whose lock nobody holds (its program died).
//
//     RESERVE/arena-ID.lock      held while the arena is mapped
//     RESERVE/arena-ID-K         piece K: a chunk file's header room and one chunk's payload
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

// A chunk file's header (ChunkFormat in the store) and one piece's size and place: files follow each other
// a whole number of pages apart, so each maps at its own page-aligned address.
#define CHUNK_HEADER_BYTES 12
#define PAGE_BYTES 4096

static struct {
    pthread_mutex_t lock;       // guards everything below against the builder thread's start and end
    pthread_t builder;
    int building;               // a builder thread exists (joined by arena_drop)
    _Atomic int cancel;         // the builder stops at its next piece
    _Atomic int ready;          // mapped and pinned: an evacuation may use it
    _Atomic int spent;          // an evacuation used it
    char *base;                 // the reserved address range (PROT_NONE where no piece is mapped)
    size_t pieces;              // pieces with a file
    size_t capacity;            // pieces the range has room for
    size_t stride;
    int registered_whole;       // pinned with one registration (else piece by piece, `registered` of them)
    size_t registered;
    int directory;              // the reserve directory, open
    int lock_file;
    char id[17];
    CUcontext context;
} arena = {.lock = PTHREAD_MUTEX_INITIALIZER, .directory = -1, .lock_file = -1};

static double seconds_between(const struct timespec *start, const struct timespec *end) {
    return (double)(end->tv_sec - start->tv_sec) + (double)(end->tv_nsec - start->tv_nsec) / 1e9;
}

static void piece_name(char *out, size_t length, const char *id, size_t piece) { snprintf(out, length, "arena-%s-%zu", id, piece); }

/// Up to `wanted` names of the reserve's blanks (malloc'd, with their strings); the count.
static size_t list_blanks(int directory, size_t wanted, char ***out) {
    *out = NULL;
    int listing = dup(directory);
    DIR *dir = listing >= 0 ? fdopendir(listing) : NULL;
    if (!dir) {
        if (listing >= 0) close(listing);
        return 0;
    }
    rewinddir(dir);
    char **names = calloc(wanted ? wanted : 1, sizeof *names);
    size_t count = 0;
    struct dirent *entry;
    while (names && count < wanted && (entry = readdir(dir))) {
        if (strncmp(entry->d_name, "blank-", 6) == 0) names[count++] = strdup(entry->d_name);
    }
    closedir(dir);
    *out = names;
    return count;
}

static void free_names(char **names, size_t count) {
    for (size_t i = 0; i < count; i++) free(names[i]);
    free(names);
}

/// Gives the pieces back: each file still named as a piece becomes a blank of the reserve again (a piece
/// stasis took is gone from here: ENOENT). Unmaps the range; the caller has unpinned it.
static void give_back_pieces(void) {
    char name[64], blank[64];
    for (size_t k = 0; k < arena.pieces; k++) {
        piece_name(name, sizeof name, arena.id, k);
        snprintf(blank, sizeof blank, "blank-%s-%zu", arena.id, k);
        renameat(arena.directory, name, arena.directory, blank);
    }
    if (arena.base) munmap(arena.base, arena.capacity * arena.stride);
    arena.base = NULL;
    arena.pieces = arena.capacity = 0;
    if (arena.lock_file >= 0) {
        char lock[64];
        snprintf(lock, sizeof lock, "arena-%s.lock", arena.id);
        unlinkat(arena.directory, lock, 0);
        close(arena.lock_file);
        arena.lock_file = -1;
    }
    // CRIU must find no descriptor into the store: a restore elsewhere would look for the directory.
    if (arena.directory >= 0) close(arena.directory);
    arena.directory = -1;
}

static CUresult unpin(void) {
    CUresult result = CUDA_SUCCESS;
    CUcontext previous = NULL;
    if (!arena.registered_whole && arena.registered == 0) return CUDA_SUCCESS;
    real.cuCtxGetCurrent(&previous);
    real.cuCtxSetCurrent(arena.context);
    if (arena.registered_whole) {
        result = real.cuMemHostUnregister(arena.base);
    } else {
        for (size_t k = 0; k < arena.registered; k++) {
            CUresult one = real.cuMemHostUnregister(arena.base + k * arena.stride);
            if (one != CUDA_SUCCESS) result = one;
        }
    }
    real.cuCtxSetCurrent(previous);
    arena.registered_whole = 0;
    arena.registered = 0;
    return result;
}

/// Maps piece `k` (a blank taken from the reserve, else a new file) at its place; 0 or -1.
static int map_piece(size_t k, char **blanks, size_t blank_count, size_t *next_blank, size_t *from_reserve) {
    char name[64];
    piece_name(name, sizeof name, arena.id, k);
    int taken = 0;
    while (!taken && *next_blank < blank_count) {
        // Another writer may take a listed blank first: the next one then.
        taken = renameat(arena.directory, blanks[(*next_blank)++], arena.directory, name) == 0;
    }
    int fd = openat(arena.directory, name, O_RDWR | O_NOFOLLOW | O_CLOEXEC | (taken ? 0 : O_CREAT | O_EXCL), 0600);
    if (fd < 0) return -1;
    // Allocated here, not at first touch: a tmpfs that is full fails this call instead of sending SIGBUS to
    // the program when a page is faulted in (a blank's pages are there already, which makes it cheap).
    int status = fallocate(fd, 0, 0, CHUNK_HEADER_BYTES + (off_t)settings.slot_bytes);
    void *at = status == 0 ? mmap(arena.base + k * arena.stride, arena.stride, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0)
                           : MAP_FAILED;
    close(fd);
    if (at == MAP_FAILED) {
        unlinkat(arena.directory, name, 0);
        return -1;
    }
    if (taken) (*from_reserve)++;
    return 0;
}

typedef struct {
    char *from;
    size_t bytes;
    int error;
} populate_share;

static void *populate_share_run(void *argument) {
    populate_share *share = argument;
    share->error = madvise(share->from, share->bytes, 23 /* MADV_POPULATE_WRITE */) == 0 ? 0 : errno;
    return NULL;
}

/// Faults every piece in (MADV_POPULATE_WRITE, Linux 5.14), shares of whole pieces on up to 8 threads: on a
/// VM it costs about 0.3 CPU-s a GiB even where the pages exist (docs/BENCHMARKS.md, issue 29), and scales
/// with the cores. 0, or the first error.
static int populate_in_parallel(void) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = cores < 1 ? 1 : cores > 8 ? 8 : (int)cores;
    if ((size_t)threads > arena.pieces) threads = (int)arena.pieces;
    pthread_t workers[8];
    populate_share shares[8];
    int started[8] = {0};
    for (int t = 0; t < threads; t++) {
        size_t first = arena.pieces * (size_t)t / (size_t)threads, last = arena.pieces * (size_t)(t + 1) / (size_t)threads;
        shares[t] = (populate_share){arena.base + first * arena.stride, (last - first) * arena.stride, 0};
        // A helper that cannot start leaves its share to this thread.
        started[t] = t > 0 && pthread_create(&workers[t], NULL, populate_share_run, &shares[t]) == 0;
    }
    for (int t = 0; t < threads; t++) {
        if (!started[t]) populate_share_run(&shares[t]);
    }
    int error = 0;
    for (int t = 0; t < threads; t++) {
        if (started[t]) pthread_join(workers[t], NULL);
        if (!error) error = shares[t].error;
    }
    return error;
}

static void *build(void *unused) {
    (void)unused;
    struct timespec start, mapped, populated, pinned;
    clock_gettime(CLOCK_MONOTONIC, &start);
    size_t wanted = arena.capacity;
    char **blanks = NULL;
    size_t blank_count = list_blanks(arena.directory, wanted, &blanks), next_blank = 0, from_reserve = 0;
    int failed = 0;
    for (size_t k = 0; k < wanted && !failed; k++) {
        if (atomic_load(&arena.cancel)) { failed = -1; break; }
        if (map_piece(k, blanks, blank_count, &next_blank, &from_reserve) != 0) {
            agent_log("arena: cannot make piece %zu: %s", k, strerror(errno));
            failed = 1;
            break;
        }
        arena.pieces = k + 1;
    }
    free_names(blanks, blank_count);
    clock_gettime(CLOCK_MONOTONIC, &mapped);
    size_t bytes = arena.pieces * arena.stride;
    if (!failed) {
        // Not inherited by children (DataLoader workers); faulted in now (MADV_POPULATE_WRITE, Linux 5.14),
        // not inside the pin.
        madvise(arena.base, bytes, MADV_DONTFORK);
        // The pages exist (fallocate); only a kernel without MADV_POPULATE_WRITE (EINVAL) has them touched.
        int error = populate_in_parallel();
        if (error == EINVAL) {
            volatile char *page = arena.base;
            for (size_t offset = 0; offset < bytes && !atomic_load(&arena.cancel); offset += PAGE_BYTES) page[offset] = page[offset];
        } else if (error != 0) {
            agent_log("arena: cannot fault it in: %s", strerror(error));
            failed = 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &populated);
    CUresult result = CUDA_SUCCESS;
    if (!failed && !atomic_load(&arena.cancel)) {
        CUcontext previous = NULL;
        real.cuCtxGetCurrent(&previous);
        real.cuCtxSetCurrent(arena.context);
        // One registration over every piece's mapping; a driver that refuses a range of many mappings gets
        // one registration a piece.
        result = real.cuMemHostRegister_v2(arena.base, bytes, CU_MEMHOSTREGISTER_PORTABLE);
        if (result == CUDA_SUCCESS) {
            arena.registered_whole = 1;
        } else {
            agent_log("arena: one registration of %zu pieces refused (%s): one a piece", arena.pieces, driver_error_name(result));
            result = CUDA_SUCCESS;
            for (size_t k = 0; k < arena.pieces && result == CUDA_SUCCESS && !atomic_load(&arena.cancel); k++) {
                result = real.cuMemHostRegister_v2(arena.base + k * arena.stride, arena.stride, CU_MEMHOSTREGISTER_PORTABLE);
                if (result == CUDA_SUCCESS) arena.registered = k + 1;
            }
        }
        real.cuCtxSetCurrent(previous);
        if (result != CUDA_SUCCESS) {
            agent_log("arena: cannot pin it: %s", driver_error_name(result));
            failed = 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &pinned);
    if (failed || atomic_load(&arena.cancel)) {
        unpin();
        give_back_pieces();
        return NULL;
    }
    atomic_store(&arena.ready, 1);
    // The arena's cost (issue 29), paid on this thread while the program runs.
    agent_log("arena: %zu pieces (%zu MiB), %zu from the reserve, mapped in %.3f s, faulted in in %.3f s, pinned in %.3f s (%s)", arena.pieces,
              arena.pieces * settings.slot_bytes >> 20, from_reserve, seconds_between(&start, &mapped), seconds_between(&mapped, &populated),
              seconds_between(&populated, &pinned), arena.registered_whole ? "one registration" : "a registration a piece");
    return NULL;
}

HIDDEN void arena_start(CUcontext context) {
    if (!settings.arena_bytes || !settings.arena_directory[0] || !context) return;
    pthread_mutex_lock(&arena.lock);
    if (arena.building || arena.base) {
        pthread_mutex_unlock(&arena.lock);
        return;
    }
    arena.context = context;
    arena.stride = (CHUNK_HEADER_BYTES + settings.slot_bytes + PAGE_BYTES - 1) / PAGE_BYTES * PAGE_BYTES;
    arena.capacity = settings.arena_bytes / settings.slot_bytes;
    uint64_t random_id = 0;
    if (getrandom(&random_id, sizeof random_id, 0) != (ssize_t)sizeof random_id) random_id = (uint64_t)getpid() << 32 ^ (uint64_t)time(NULL);
    snprintf(arena.id, sizeof arena.id, "%016llx", (unsigned long long)random_id);
    char lock[64];
    snprintf(lock, sizeof lock, "arena-%s.lock", arena.id);
    arena.directory = open(settings.arena_directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    arena.lock_file = arena.directory >= 0 ? openat(arena.directory, lock, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600) : -1;
    void *base = MAP_FAILED;
    if (arena.lock_file >= 0 && flock(arena.lock_file, LOCK_EX | LOCK_NB) == 0) {
        base = mmap(NULL, arena.capacity * arena.stride, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    }
    if (base == MAP_FAILED) {
        agent_log("arena: cannot start one in %s: %s", settings.arena_directory, strerror(errno));
        if (arena.lock_file >= 0) {
            unlinkat(arena.directory, lock, 0);
            close(arena.lock_file);
            arena.lock_file = -1;
        }
        if (arena.directory >= 0) close(arena.directory);
        arena.directory = -1;
        pthread_mutex_unlock(&arena.lock);
        return;
    }
    arena.base = base;
    arena.pieces = 0;
    atomic_store(&arena.cancel, 0);
    atomic_store(&arena.ready, 0);
    // The builder (and its helpers) take none of the program's signals: they are the program's threads to get.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    arena.building = pthread_create(&arena.builder, NULL, build, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (!arena.building) give_back_pieces();
    pthread_mutex_unlock(&arena.lock);
}

HIDDEN void arena_drop(void) {
    pthread_mutex_lock(&arena.lock);
    if (arena.building) {
        atomic_store(&arena.cancel, 1);
        pthread_join(arena.builder, NULL);
        arena.building = 0;
    }
    if (atomic_load(&arena.ready)) {
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        CUresult result = unpin();
        atomic_store(&arena.ready, 0);
        atomic_store(&arena.spent, 0);
        give_back_pieces();
        clock_gettime(CLOCK_MONOTONIC, &end);
        agent_log("arena: dropped in %.3f s%s%s", seconds_between(&start, &end), result == CUDA_SUCCESS ? "" : "; unpinning failed: ",
                  result == CUDA_SUCCESS ? "" : driver_error_name(result));
    }
    pthread_mutex_unlock(&arena.lock);
}

HIDDEN size_t arena_usable(const char *directory) {
    if (!atomic_load(&arena.ready) || !directory || !directory[0]) return 0;
    struct stat wanted, own;
    if (stat(directory, &wanted) != 0 || fstat(arena.directory, &own) != 0) return 0;
    return wanted.st_dev == own.st_dev && wanted.st_ino == own.st_ino ? arena.pieces : 0;
}

HIDDEN void arena_mark_spent(void) { atomic_store(&arena.spent, 1); }
HIDDEN int arena_spent(void) { return atomic_load(&arena.spent); }

HIDDEN char *arena_payload(size_t piece) { return arena.base + piece * arena.stride + CHUNK_HEADER_BYTES; }

HIDDEN void arena_piece_name(size_t piece, char *out, size_t length) { piece_name(out, length, arena.id, piece); }

HIDDEN void arena_after_fork_child(void) {
    // The child maps none of it (MADV_DONTFORK) and has no builder; the lock stays its parent's.
    pthread_mutex_init(&arena.lock, NULL);
    if (arena.lock_file >= 0) close(arena.lock_file);
    arena.lock_file = -1;
    arena.building = 0;
    arena.base = NULL;
    arena.pieces = arena.capacity = 0;
    atomic_store(&arena.ready, 0);
}
