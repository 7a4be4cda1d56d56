// What bounds a transfer between the GPU and a store in memory (issue 29), measured part by part on the GPU
// machine, with no stasis in the way:
//   link    the link itself: 256 MiB copies from and to pinned memory (the figure every row is set beside)
//   copies  copies of one chunk (2 MiB) the way the agent's ring makes them: a ring of R MiB cycling through
//           slots on S streams, every slot's copy in flight until the oldest ends; and larger copies
//   pin     what pinning costs (cuMemHostRegister), by the kind of page under it: a memfd as the ring is, the
//           same memfd asked for transparent huge pages, anonymous memory with huge pages, hugetlbfs
//   pieces  the arena's layout (issue 29): 2 MiB copies into and out of pinned pieces 2 MiB + 4 KiB apart, the
//           payload at +12 bytes (after a chunk header) against +0; and pinning 8 GiB a 2 MiB piece at a time
//           on 1, 4 and 16 threads (can a refill pin the store's own pages as it goes?)
//   arena   what an arena (stasis run --arena) costs before its pin, without a GPU: 8 GiB of pieces in DIR taken
//           from blanks (rename, open, fallocate, mmap at their place) then faulted in (MADV_POPULATE_WRITE),
//           against new files; and given back (munmap, renames)
//   host    the CPU's part: a chunk file written into fresh tmpfs pages (write(2), what the store does), into
//           pages reused from an earlier file (pwrite, and through a mapping), and read back (pread), on 1, 8
//           and 16 threads
// The driver is reached through dlopen, as the agent does, so this builds with a plain C compiler:
//   gcc -O2 -pthread -o transfer-probe bench/transfer-probe.c -ldl
//   transfer-probe [link] [copies] [pin] [pieces] [arena] [host]   (default: all; DIR=/dev/shm/... for `arena`, `host`)
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;

static CUresult (*cuInit)(unsigned);
static CUresult (*cuDeviceGet)(CUdevice *, int);
static CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
static CUresult (*cuCtxSetCurrent)(CUcontext);
static CUresult (*cuMemAlloc)(CUdeviceptr *, size_t);
static CUresult (*cuMemHostRegister)(void *, size_t, unsigned);
static CUresult (*cuMemHostUnregister)(void *);
static CUresult (*cuMemcpyDtoHAsync)(void *, CUdeviceptr, size_t, CUstream);
static CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream);
static CUresult (*cuStreamCreate)(CUstream *, unsigned);
static CUresult (*cuStreamSynchronize)(CUstream);
static CUresult (*cuEventCreate)(CUevent *, unsigned);
static CUresult (*cuEventRecord)(CUevent, CUstream);
static CUresult (*cuEventSynchronize)(CUevent);

#define MIB ((size_t)1 << 20)
#define GIB ((size_t)1 << 30)
#define CHUNK (2 * MIB)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    return usage.ru_utime.tv_sec + usage.ru_utime.tv_usec / 1e6 + usage.ru_stime.tv_sec + usage.ru_stime.tv_usec / 1e6;
}

static void check(CUresult result, const char *what) {
    if (result != 0) {
        fprintf(stderr, "transfer-probe: %s failed: %d\n", what, result);
        exit(1);
    }
}

static CUcontext primary;

static void load(void) {
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    if (!cuda) {
        fprintf(stderr, "transfer-probe: no libcuda.so.1: %s\n", dlerror());
        exit(1);
    }
#define SYMBOL(name, exported) *(void **)&name = dlsym(cuda, exported); if (!name) { fprintf(stderr, "no %s\n", exported); exit(1); }
    SYMBOL(cuInit, "cuInit");
    SYMBOL(cuDeviceGet, "cuDeviceGet");
    SYMBOL(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    SYMBOL(cuCtxSetCurrent, "cuCtxSetCurrent");
    SYMBOL(cuMemAlloc, "cuMemAlloc_v2");
    SYMBOL(cuMemHostRegister, "cuMemHostRegister_v2");
    SYMBOL(cuMemHostUnregister, "cuMemHostUnregister");
    SYMBOL(cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2");
    SYMBOL(cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2");
    SYMBOL(cuStreamCreate, "cuStreamCreate");
    SYMBOL(cuStreamSynchronize, "cuStreamSynchronize");
    SYMBOL(cuEventCreate, "cuEventCreate");
    SYMBOL(cuEventRecord, "cuEventRecord");
    SYMBOL(cuEventSynchronize, "cuEventSynchronize");
    check(cuInit(0), "cuInit");
    CUdevice device;
    CUcontext context;
    check(cuDeviceGet(&device, 0), "cuDeviceGet");
    check(cuDevicePrimaryCtxRetain(&context, device), "cuDevicePrimaryCtxRetain");
    check(cuCtxSetCurrent(context), "cuCtxSetCurrent");
    primary = context;
}

/// `bytes` of a memfd mapped shared and populated, as the agent's ring is; `huge` asks for transparent huge
/// pages first (shmem THP: honoured where /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it).
static void *memfd_area(size_t bytes, int huge) {
    int fd = memfd_create("transfer-probe", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)bytes) != 0) { perror("memfd"); exit(1); }
    void *area = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (area == MAP_FAILED) { perror("mmap"); exit(1); }
    if (huge) madvise(area, bytes, MADV_HUGEPAGE);
    memset(area, 1, bytes);  // faulted in here, so that the pin below times the pin alone
    return area;
}

static CUstream streams[16];
static CUevent events[1024];

// ---- link

static void probe_link(CUdeviceptr device_memory) {
    size_t bytes = 256 * MIB;
    void *host = memfd_area(bytes, 0);
    check(cuMemHostRegister(host, bytes, 1), "cuMemHostRegister");
    for (int out = 1; out >= 0; out--) {
        double best = 0;
        for (int round = 0; round < 5; round++) {
            double start = now();
            for (int i = 0; i < 4; i++) {
                check(out ? cuMemcpyDtoHAsync(host, device_memory + i * bytes, bytes, streams[0])
                          : cuMemcpyHtoDAsync(device_memory + i * bytes, host, bytes, streams[0]), "copy");
            }
            check(cuStreamSynchronize(streams[0]), "sync");
            double rate = 4.0 * bytes / (now() - start) / 1e9;
            if (rate > best) best = rate;
        }
        printf("| link, 256 MiB copies, pinned | %s | %.1f GB/s |\n", out ? "device to host" : "host to device", best);
    }
    cuMemHostUnregister(host);
    munmap(host, bytes);
}

// ---- copies through a ring

/// Moves `total` bytes in copies of `copy` bytes through a ring of `ring` bytes on `nstreams` streams, every
/// slot in flight until the oldest ends (the agent's loop without stasis). GB/s.
static double ring_rate(CUdeviceptr device_memory, size_t device_bytes, void *host, size_t ring, size_t copy, int nstreams, int out,
                        size_t total) {
    unsigned slots = (unsigned)(ring / copy), head = 0, inflight = 0, turn = 0;
    size_t issued = 0, offset = 0;
    double start = now();
    while (issued < total || inflight > 0) {
        while (issued < total && inflight < slots) {
            unsigned slot = (head + inflight) % slots;
            CUstream stream = streams[turn++ % nstreams];
            char *h = (char *)host + (size_t)slot * copy;
            if (offset + copy > device_bytes) offset = 0;
            check(out ? cuMemcpyDtoHAsync(h, device_memory + offset, copy, stream) : cuMemcpyHtoDAsync(device_memory + offset, h, copy, stream),
                  "copy");
            check(cuEventRecord(events[slot], stream), "record");
            offset += copy;
            issued += copy;
            inflight++;
        }
        check(cuEventSynchronize(events[head]), "event");
        head = (head + 1) % slots;
        inflight--;
    }
    return total / (now() - start) / 1e9;
}

static void probe_copies(CUdeviceptr device_memory, size_t device_bytes) {
    size_t largest = 1024 * MIB;
    void *host = memfd_area(largest, 0);
    check(cuMemHostRegister(host, largest, 1), "cuMemHostRegister");
    size_t total = 16 * GIB;
    struct { size_t ring, copy; int streams; } cases[] = {
        {64 * MIB, CHUNK, 1}, {64 * MIB, CHUNK, 4}, {64 * MIB, CHUNK, 8},
        {256 * MIB, CHUNK, 4}, {256 * MIB, CHUNK, 8}, {1024 * MIB, CHUNK, 4}, {1024 * MIB, CHUNK, 8},
        {64 * MIB, 8 * MIB, 4}, {256 * MIB, 8 * MIB, 4}, {256 * MIB, 32 * MIB, 4}, {1024 * MIB, 32 * MIB, 8},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double d2h = ring_rate(device_memory, device_bytes, host, cases[i].ring, cases[i].copy, cases[i].streams, 1, total);
        double h2d = ring_rate(device_memory, device_bytes, host, cases[i].ring, cases[i].copy, cases[i].streams, 0, total);
        printf("| ring %zu MiB, copies of %zu MiB, %d stream(s) | %.1f GB/s out | %.1f GB/s in |\n", cases[i].ring / MIB,
               cases[i].copy / MIB, cases[i].streams, d2h, h2d);
    }
    cuMemHostUnregister(host);
    munmap(host, largest);
}

// ---- pinning

static void pin_row(const char *kind, void *area, size_t bytes, double touched) {
    double start = now();
    CUresult result = cuMemHostRegister(area, bytes, 1);
    double pinned = now() - start;
    if (result != 0) {
        printf("| %s | %zu GiB | touch %.2f s | cannot pin (%d) |\n", kind, bytes / GIB, touched, result);
        return;
    }
    start = now();
    cuMemHostUnregister(area);
    printf("| %s | %zu GiB | touch %.2f s | pin %.3f s (%.3f ms a MiB), unpin %.3f s |\n", kind, bytes / GIB, touched, pinned,
           pinned * 1e3 / (bytes / MIB), now() - start);
}

static void probe_pin(void) {
    char setting[128] = "?";
    FILE *file = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");
    if (file) { if (!fgets(setting, sizeof setting, file)) setting[0] = 0; fclose(file); }
    setting[strcspn(setting, "\n")] = 0;
    printf("shmem_enabled: %s\n", setting);
    size_t sizes[] = {1 * GIB, 8 * GIB};
    for (size_t s = 0; s < 2; s++) {
        size_t bytes = sizes[s];
        for (int huge = 0; huge <= 1; huge++) {
            double start = now();
            void *area = memfd_area(bytes, huge);
            pin_row(huge ? "memfd, MADV_HUGEPAGE" : "memfd (the ring today)", area, bytes, now() - start);
            munmap(area, bytes);
        }
        double start = now();
        void *anonymous = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        madvise(anonymous, bytes, MADV_HUGEPAGE);
        memset(anonymous, 1, bytes);
        pin_row("anonymous, MADV_HUGEPAGE", anonymous, bytes, now() - start);
        munmap(anonymous, bytes);
        start = now();
        int fd = memfd_create("transfer-probe-hugetlb", MFD_CLOEXEC | MFD_HUGETLB);
        void *hugetlb = fd >= 0 && ftruncate(fd, (off_t)bytes) == 0
            ? mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0) : MAP_FAILED;
        if (fd >= 0) close(fd);
        if (hugetlb == MAP_FAILED) {
            printf("| memfd, MFD_HUGETLB | %zu GiB | not available (vm.nr_hugepages too low) |\n", bytes / GIB);
        } else {
            memset(hugetlb, 1, bytes);
            pin_row("memfd, MFD_HUGETLB", hugetlb, bytes, now() - start);
            munmap(hugetlb, bytes);
        }
    }
}

// ---- the arena's layout

/// Moves `total` bytes in 2 MiB copies between the device and pieces `stride` apart starting `shift` bytes in,
/// a window of 32 copies in flight on 4 streams. GB/s.
static double pieces_rate(CUdeviceptr device_memory, size_t device_bytes, char *host, size_t pieces, size_t stride, size_t shift, int out,
                          size_t total) {
    unsigned window = 32, head = 0, inflight = 0, turn = 0;
    size_t issued = 0, offset = 0, piece = 0;
    double start = now();
    while (issued < total || inflight > 0) {
        while (issued < total && inflight < window) {
            unsigned slot = (head + inflight) % window;
            CUstream stream = streams[turn++ % 4];
            char *h = host + (piece++ % pieces) * stride + shift;
            if (offset + CHUNK > device_bytes) offset = 0;
            check(out ? cuMemcpyDtoHAsync(h, device_memory + offset, CHUNK, stream) : cuMemcpyHtoDAsync(device_memory + offset, h, CHUNK, stream),
                  "copy");
            check(cuEventRecord(events[slot], stream), "record");
            offset += CHUNK;
            issued += CHUNK;
            inflight++;
        }
        check(cuEventSynchronize(events[head]), "event");
        head = (head + 1) % window;
        inflight--;
    }
    return total / (now() - start) / 1e9;
}

typedef struct {
    char *base;
    size_t first, count, stride;
    int unpin;
    int failures;
} pin_share;

static void *pin_pieces(void *argument) {
    pin_share *share = argument;
    cuCtxSetCurrent(primary);
    for (size_t k = share->first; k < share->first + share->count; k++) {
        char *piece = share->base + k * share->stride;
        if ((share->unpin ? cuMemHostUnregister(piece) : cuMemHostRegister(piece, share->stride, 1)) != 0) share->failures++;
    }
    return NULL;
}

/// Pins (or unpins) every piece on `threads` threads, each a share; seconds.
static double pin_in_pieces(char *base, size_t pieces, size_t stride, int threads, int unpin, int *failures) {
    pthread_t workers[16];
    pin_share shares[16];
    double start = now();
    for (int t = 0; t < threads; t++) {
        size_t first = pieces * t / threads, last = pieces * (t + 1) / threads;
        shares[t] = (pin_share){base, first, last - first, stride, unpin, 0};
        pthread_create(&workers[t], NULL, pin_pieces, &shares[t]);
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(workers[t], NULL);
        *failures += shares[t].failures;
    }
    return now() - start;
}

static void probe_pieces(CUdeviceptr device_memory, size_t device_bytes) {
    size_t stride = CHUNK + 4096, pieces = 4096, bytes = pieces * stride;  // 8 GiB of payload
    char *area = memfd_area(bytes, 0);
    check(cuMemHostRegister(area, bytes, 1), "cuMemHostRegister");
    for (size_t shift = 0; shift <= 12; shift += 12) {
        double out = pieces_rate(device_memory, device_bytes, area, pieces, stride, shift, 1, 16 * GIB);
        double in = pieces_rate(device_memory, device_bytes, area, pieces, stride, shift, 0, 16 * GIB);
        printf("| pieces 2 MiB + 4 KiB apart, payload at +%zu, 32 copies in flight on 4 streams | %.1f GB/s out | %.1f GB/s in |\n", shift, out, in);
    }
    cuMemHostUnregister(area);
    int threads[] = {1, 4, 16};
    for (int t = 0; t < 3; t++) {
        int failures = 0;
        double pinned = pin_in_pieces(area, pieces, stride, threads[t], 0, &failures);
        double unpinned = pin_in_pieces(area, pieces, stride, threads[t], 1, &failures);
        printf("| 8 GiB pinned a 2 MiB piece at a time | %d thread(s) | pin %.3f s (%.1f GB/s), unpin %.3f s | %d failed |\n", threads[t], pinned,
               bytes / pinned / 1e9, unpinned, failures);
    }
    munmap(area, bytes);
}

// ---- the CPU's part of a store in memory

enum { FRESH, REUSED_PWRITE, REUSED_MAPPED, READ };
static const char *dir;
static int mode;
static unsigned per_thread;
static char *source;

static void *host_worker(void *argument) {
    long index = (long)argument;
    char path[512], blank[512], header[12] = "STCK";
    char *buffer = aligned_alloc(4096, CHUNK);
    memset(buffer, 0, CHUNK);
    for (unsigned i = 0; i < per_thread; i++) {
        snprintf(path, sizeof path, "%s/c%ld-%u", dir, index, i);
        snprintf(blank, sizeof blank, "%s/blank%ld-%u", dir, index, i);
        struct iovec parts[2] = {{header, sizeof header}, {source, CHUNK}};
        int fd;
        switch (mode) {
        case FRESH:
            fd = open(path, O_CREAT | O_EXCL | O_WRONLY, 0600);
            if (fd < 0 || pwritev(fd, parts, 2, 0) != (ssize_t)(CHUNK + sizeof header)) { perror(path); exit(1); }
            close(fd);
            break;
        case REUSED_PWRITE:
            if (rename(blank, path) != 0 || (fd = open(path, O_WRONLY)) < 0) { perror(blank); exit(1); }
            if (pwritev(fd, parts, 2, 0) != (ssize_t)(CHUNK + sizeof header)) { perror(path); exit(1); }
            close(fd);
            break;
        case REUSED_MAPPED: {
            if (rename(blank, path) != 0 || (fd = open(path, O_RDWR)) < 0) { perror(blank); exit(1); }
            char *file = mmap(NULL, CHUNK + sizeof header, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
            if (file == MAP_FAILED) { perror("mmap"); exit(1); }
            memcpy(file, header, sizeof header);
            memcpy(file + sizeof header, source, CHUNK);
            munmap(file, CHUNK + sizeof header);
            close(fd);
            break;
        }
        case READ:
            fd = open(path, O_RDONLY);
            if (fd < 0 || pread(fd, buffer, CHUNK, sizeof header) != CHUNK) { perror(path); exit(1); }
            close(fd);
            break;
        }
    }
    free(buffer);
    return NULL;
}

static void run_threads(int threads) {
    pthread_t workers[64];
    for (long t = 0; t < threads; t++) pthread_create(&workers[t], NULL, host_worker, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
}

/// Blank chunk files for the reused modes, written (not fallocated: tmpfs clears a fallocated page at its
/// first fault, so a mapping of one would pay the clear on the timed part).
static void make_blanks(int threads) {
    char blank[512];
    char *zeros = calloc(1, CHUNK + 12);
    for (long t = 0; t < threads; t++) {
        for (unsigned i = 0; i < per_thread; i++) {
            snprintf(blank, sizeof blank, "%s/blank%ld-%u", dir, t, i);
            int fd = open(blank, O_CREAT | O_WRONLY, 0600);
            if (fd < 0 || pwrite(fd, zeros, CHUNK + 12, 0) != (ssize_t)(CHUNK + 12)) { perror(blank); exit(1); }
            close(fd);
        }
    }
    free(zeros);
}

static void clear_dir(void) {
    char command[600];
    snprintf(command, sizeof command, "rm -rf '%s' && mkdir -p '%s'", dir, dir);
    if (system(command) != 0) exit(1);
}

static void probe_host(void) {
    dir = getenv("DIR") ? getenv("DIR") : "/dev/shm/transfer-probe";
    source = aligned_alloc(4096, CHUNK);
    for (size_t i = 0; i < CHUNK; i++) source[i] = (char)(i * 7 + 3);
    int counts[] = {1, 8, 16};
    const char *names[] = {"written into fresh pages (write(2), the store today)", "written into reused pages (pwrite)",
                           "written into reused pages (mapped, memcpy)", "read back (pread, the refill today)"};
    for (size_t c = 0; c < 3; c++) {
        int threads = counts[c];
        per_thread = (unsigned)(8 * GIB / CHUNK / threads);
        for (int m = FRESH; m <= READ; m++) {
            if (m != READ) clear_dir();
            if (m == REUSED_PWRITE || m == REUSED_MAPPED) make_blanks(threads);
            mode = m;
            double start = now(), cpu = cpu_seconds();
            run_threads(threads);
            double seconds = now() - start, cores = (cpu_seconds() - cpu) / seconds;
            double rate = 8.0 * GIB / seconds / 1e9;
            printf("| 8 GiB of chunk files %s | %d thread(s) | %.1f GB/s | %.1f cores | %.2f GB/s a core |\n", names[m], threads, rate, cores,
                   rate / (cores > 0 ? cores : 1));
        }
    }
    clear_dir();
    rmdir(dir);
}

// ---- an arena's build, before its pin

/// Builds an arena of `pieces` in `dir` as the agent does (blanks first when `from_blanks`), faults it in and
/// gives it back; prints the times.
typedef struct {
    char *from;
    size_t bytes;
} populate_share;

static void *populate_share_run(void *argument) {
    populate_share *share = argument;
    if (madvise(share->from, share->bytes, 23 /* MADV_POPULATE_WRITE */) != 0) perror("MADV_POPULATE_WRITE");
    return NULL;
}

/// Faults every piece in, `threads` shares of whole pieces at once.
static void populate_in_parallel(char *base, size_t pieces, size_t stride, int threads) {
    pthread_t workers[16];
    populate_share shares[16];
    for (int t = 0; t < threads; t++) {
        size_t first = pieces * t / threads, last = pieces * (t + 1) / threads;
        shares[t] = (populate_share){base + first * stride, (last - first) * stride};
        pthread_create(&workers[t], NULL, populate_share_run, &shares[t]);
    }
    for (int t = 0; t < threads; t++) pthread_join(workers[t], NULL);
}

static void arena_row(size_t pieces, int from_blanks, int threads) {
    size_t size = CHUNK + 12, stride = CHUNK + 4096;
    char name[256], blank[256];
    if (from_blanks) {
        char *zeros = calloc(1, size);
        for (size_t k = 0; k < pieces; k++) {
            snprintf(blank, sizeof blank, "%s/blank-%zu", dir, k);
            int fd = open(blank, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd < 0 || write(fd, zeros, size) != (ssize_t)size) { perror("blank"); exit(1); }
            close(fd);
        }
        free(zeros);
    }
    char *base = mmap(NULL, pieces * stride, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    double start = now(), cpu = cpu_seconds();
    for (size_t k = 0; k < pieces; k++) {
        snprintf(name, sizeof name, "%s/arena-%zu", dir, k);
        snprintf(blank, sizeof blank, "%s/blank-%zu", dir, k);
        int taken = from_blanks && rename(blank, name) == 0;
        int fd = open(name, O_RDWR | (taken ? 0 : O_CREAT | O_EXCL), 0600);
        if (fd < 0 || fallocate(fd, 0, 0, (off_t)size) != 0 ||
            mmap(base + k * stride, stride, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) { perror("piece"); exit(1); }
        close(fd);
    }
    double mapped = now();
    populate_in_parallel(base, pieces, stride, threads);
    double populated = now(), used = cpu_seconds() - cpu;
    munmap(base, pieces * stride);
    for (size_t k = 0; k < pieces; k++) {
        snprintf(name, sizeof name, "%s/arena-%zu", dir, k);
        snprintf(blank, sizeof blank, "%s/blank-%zu", dir, k);
        rename(name, blank);
    }
    double dropped = now();
    printf("| arena of %zu GiB, pieces %s | made and mapped %.3f s | faulted in on %d thread(s) %.3f s | %.1f CPU-s | unmapped and given back %.3f s |\n",
           pieces * CHUNK / GIB, from_blanks ? "from the reserve's blanks" : "as new files", mapped - start, threads, populated - mapped, used,
           dropped - populated);
    clear_dir();
}

static void probe_arena(void) {
    dir = getenv("DIR") ? getenv("DIR") : "/dev/shm/transfer-probe";
    mkdir(dir, 0700);
    clear_dir();
    arena_row(4096, 0, 1);
    int threads[] = {1, 2, 8};
    for (int t = 0; t < 3; t++) arena_row(4096, 1, threads[t]);
    rmdir(dir);
}

int main(int argc, char **argv) {
    int all = argc < 2, want_link = all, want_copies = all, want_pin = all, want_pieces = all, want_arena = all, want_host = all;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "link")) want_link = 1;
        else if (!strcmp(argv[i], "copies")) want_copies = 1;
        else if (!strcmp(argv[i], "pin")) want_pin = 1;
        else if (!strcmp(argv[i], "pieces")) want_pieces = 1;
        else if (!strcmp(argv[i], "arena")) want_arena = 1;
        else if (!strcmp(argv[i], "host")) want_host = 1;
        else { fprintf(stderr, "usage: transfer-probe [link] [copies] [pin] [pieces] [arena] [host]\n"); return 2; }
    }
    if (want_link || want_copies || want_pin || want_pieces) {
        load();
        size_t device_bytes = 4 * GIB;
        CUdeviceptr device_memory;
        check(cuMemAlloc(&device_memory, device_bytes), "cuMemAlloc");
        for (int s = 0; s < 16; s++) check(cuStreamCreate(&streams[s], 1), "cuStreamCreate");
        for (int e = 0; e < 1024; e++) check(cuEventCreate(&events[e], 2), "cuEventCreate");
        if (want_link) probe_link(device_memory);
        if (want_copies) probe_copies(device_memory, device_bytes);
        if (want_pin) probe_pin();
        if (want_pieces) probe_pieces(device_memory, device_bytes);
    }
    if (want_arena) probe_arena();
    if (want_host) probe_host();
    return 0;
}
