// cuda-workload: GPU processes that build CUDA state, get checkpointed and restored (CRIU together with the
// driver's cuCheckpointProcess* API), and then verify their own state. The GPU counterpart of
// Workloads/cpu/main.c, with the same protocol.
//
//   cuda-workload MODE --dir DIR [--daemon] [--mem MIB] [--count N]
//
// MODE:
//   buffers  cudaMalloc buffers of 4 KiB, 1 MiB, 64 MiB and --mem MiB (default 256) holding a pattern; the
//            loop re-checks a slice of each on the device
//   streams  --count streams (default 4), each kept busy with a queue of small kernels that bump its own counter
//   events   timed events recorded before ready; afterwards they must still be complete and time the same
//   graph    a captured graph (memset, kernel, copy, kernel) that the loop launches; the buffer it updates
//            must match the number of launches
//   vmm      --mem MiB mapped with cuMemCreate/cuMemAddressReserve/cuMemMap/cuMemSetAccess, as buffers
//   pool     allocations kept alive in the default stream-ordered pool and in a created one; the loop
//            allocates and frees temporaries in both
//   pinned   a pinned host buffer of --mem MiB and its device copy, round-tripped slice by slice
//   threads  --count host threads (default 4), each with its own stream, buffer and loop
//   tree     the root and one child (forked before any CUDA call), each running buffers
//   managed  64 MiB of managed memory touched from host and device (stasis is expected to refuse it)
//   ipc      a --mem MiB buffer exported with cudaIpcGetMemHandle (stasis is expected to refuse it)
//   share    the root and one child (forked before any CUDA call) sharing --mem MiB of VMM memory: the root
//            creates it, exports it as a POSIX descriptor and passes that over a unix socket (NCCL's way
//            inside a node); the child imports and maps it. Each fills its own part with a pattern and
//            keeps bumping a counter there with a kernel; each checks both parts, and that the other's
//            counter moves (so after a restore both still see each other's writes)
//   share3   the same with three processes: the root, its child, and the child's child (the descriptor
//            passed on by the middle one)
//   share-orphan  the child creates and exports the memory, the root imports it, and the child exits: the
//            memory lives on in the root alone
//   ipc-share  share through legacy CUDA IPC: the root's cudaMalloc buffer, cudaIpcGetMemHandle, the child's
//            cudaIpcOpenMemHandle
//   ipc-share-event  the same, plus an interprocess event (cudaIpcGetEventHandle / cudaIpcOpenEventHandle)
//            that the root records after each of its steps and the child's stream waits for
//
// With --daemon the workload detaches (setsid, double fork, stdio to DIR/log), prints its PID once its state
// is built and its loop runs, and exits, leaving the workload running. It writes DIR/ready when ready. On
// SIGUSR1 it checks its state, waits until its loops have made 5 more steps, checks again (so work done since a
// restore is checked too), and writes "PASS ..." or "FAIL ..." to DIR/result (atomically, through a rename).
// A CUDA error before ready makes it exit 2; after ready, the result becomes "FAIL <call>: <error name>".
//
// Built with: nvcc -O2 -arch=sm_90 -o cuda-workload cuda-workload.cu -lcuda
#include <cuda.h>
#include <cuda_runtime.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "../common/workload_protocol.h"

#define MAX_LOOPS 64
#define PROGRESS_TIMEOUT_MS 10000
// Below the test harness's 20 s wait for DIR/result, so that the tree's root always answers.
#define CHILD_RESULT_TIMEOUT_MS 15000
// What one loop step checks of a buffer: 1 MiB of 64-bit words.
#define SLICE_WORDS ((size_t)128 << 10)

static size_t mem_bytes = (size_t)256 << 20;
static int count = 4;

// Gives up before ready. _exit, not exit: loop threads may be inside the CUDA runtime, whose exit-time
// teardown could then hang.
[[noreturn]] static void give_up(const char *why) {
    fprintf(stderr, "cuda-workload: %s\n", why);
    _exit(2);
}

// ---- failures ------------------------------------------------------------------------------------------

// Why the last setup, step or check on this thread failed: the text that follows "FAIL " in a result.
static thread_local char failure_text[512];

static bool fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static bool fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(failure_text, sizeof failure_text, fmt, ap);
    va_end(ap);
    return false;
}

// Names the call by the expression's text up to its first '(' ("cudaMemcpy"), as results report it.
static bool cuda_failed(const char *expression, const char *error) {
    return fail("%.*s: %s", (int)strcspn(expression, "("), expression, error);
}

// For functions returning bool: a failed runtime or driver call fails the function.
#define TRY(call)                                                                           \
    do {                                                                                    \
        cudaError_t err_ = (call);                                                          \
        if (err_ != cudaSuccess) return cuda_failed(#call, cudaGetErrorName(err_));         \
    } while (0)
#define TRY_CU(call)                                                                        \
    do {                                                                                    \
        CUresult res_ = (call);                                                             \
        if (res_ != CUDA_SUCCESS) {                                                         \
            const char *name_ = "CUDA_ERROR_UNKNOWN";                                       \
            cuGetErrorName(res_, &name_);                                                   \
            return cuda_failed(#call, name_);                                               \
        }                                                                                   \
    } while (0)

// ---- the pattern and the kernels -----------------------------------------------------------------------

// The pattern: word i of a buffer seeded s is splitmix64(s ^ i), so host and device can regenerate it.
__host__ __device__ static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__global__ void fill_kernel(uint64_t *p, size_t words, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x)
        p[i] = splitmix64(seed ^ i);
}

// Counts into *errors the words of p[from, from + n) that differ from the pattern.
__global__ void check_kernel(const uint64_t *p, size_t from, size_t n, uint64_t seed, unsigned long long *errors) {
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < n; j += (size_t)gridDim.x * blockDim.x) {
        size_t i = from + j;
        if (p[i] != splitmix64(seed ^ i)) atomicAdd(errors, 1ull);
    }
}

// Busy for about `cycles` clock cycles, then bumps *counter if there is one: a kernel whose duration is known.
__global__ void spin_kernel(long long cycles, unsigned long long *counter) {
    long long start = clock64();
    while (clock64() - start < cycles) {}
    if (counter) *counter += 1;
}

__global__ void add_index_kernel(uint64_t *p, size_t words) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x)
        p[i] += i;
}

__global__ void add_kernel(uint64_t *p, const uint64_t *addend, size_t words, uint64_t constant) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x)
        p[i] += addend[i] + constant;
}

// Launches return their error like a call, so that TRY names the kernel ("FAIL launch_check: ...").
static unsigned blocks_for(size_t n) { return (unsigned)std::min<size_t>((n + 255) / 256, 1024); }

static cudaError_t launch_fill(uint64_t *p, size_t words, uint64_t seed, cudaStream_t s) {
    fill_kernel<<<blocks_for(words), 256, 0, s>>>(p, words, seed);
    return cudaGetLastError();
}

static cudaError_t launch_check(const uint64_t *p, size_t from, size_t n, uint64_t seed, unsigned long long *errors, cudaStream_t s) {
    check_kernel<<<blocks_for(n), 256, 0, s>>>(p, from, n, seed, errors);
    return cudaGetLastError();
}

static cudaError_t launch_spin(long long cycles, unsigned long long *counter, cudaStream_t s) {
    spin_kernel<<<1, 1, 0, s>>>(cycles, counter);
    return cudaGetLastError();
}

static cudaError_t launch_add_index(uint64_t *p, size_t words, cudaStream_t s) {
    add_index_kernel<<<blocks_for(words), 256, 0, s>>>(p, words);
    return cudaGetLastError();
}

static cudaError_t launch_add(uint64_t *p, const uint64_t *addend, size_t words, uint64_t constant, cudaStream_t s) {
    add_kernel<<<blocks_for(words), 256, 0, s>>>(p, addend, words, constant);
    return cudaGetLastError();
}

// ---- buffers holding the pattern -----------------------------------------------------------------------

struct Buffer {
    char name[48];
    uint64_t *ptr;
    size_t bytes;
    uint64_t seed;
};

static Buffer make_buffer(const char *kind, uint64_t *ptr, size_t bytes, uint64_t seed) {
    Buffer b;
    if (bytes < ((size_t)1 << 20)) snprintf(b.name, sizeof b.name, "%s %zu KiB", kind, bytes >> 10);
    else snprintf(b.name, sizeof b.name, "%s %zu MiB", kind, bytes >> 20);
    b.ptr = ptr;
    b.bytes = bytes;
    b.seed = seed;
    return b;
}

// The slice of a buffer of `words` words that loop step `step` looks at: they rotate through the buffer.
static void slice_for(size_t words, uint64_t step, size_t *from, size_t *n) {
    size_t size = std::min(SLICE_WORDS, words);
    *from = (size_t)(step * size % words);
    *n = std::min(size, words - *from);
}

static cudaError_t check_slice(const Buffer &b, uint64_t step, unsigned long long *errors, cudaStream_t s) {
    size_t from, n;
    slice_for(b.bytes / 8, step, &from, &n);
    return launch_check(b.ptr, from, n, b.seed, errors, s);
}

// Returns the index (within p) of the first word of p, which holds words from..from+n-1, off the pattern; or -1.
static long first_bad(const uint64_t *p, size_t n, uint64_t seed, size_t from) {
    for (size_t j = 0; j < n; j++)
        if (p[j] != splitmix64(seed ^ (from + j))) return (long)j;
    return -1;
}

static bool compare_host(const char *what, const uint64_t *p, size_t words, uint64_t seed) {
    long bad = first_bad(p, words, seed, 0);
    if (bad >= 0) return fail("%s word %ld is %016" PRIx64 ", want %016" PRIx64, what, bad, p[bad], splitmix64(seed ^ (uint64_t)bad));
    return true;
}

// Copies device memory back in chunks and compares it with the pattern regenerated on the host.
static bool compare_device(const char *what, const uint64_t *device, size_t words, uint64_t seed) {
    const size_t chunk = (size_t)2 << 20;  // words: 16 MiB
    std::vector<uint64_t> host(std::min(words, chunk));
    for (size_t from = 0; from < words; from += chunk) {
        size_t n = std::min(chunk, words - from);
        TRY(cudaMemcpy(host.data(), device + from, n * 8, cudaMemcpyDeviceToHost));
        long bad = first_bad(host.data(), n, seed, from);
        if (bad >= 0) {
            size_t i = from + (size_t)bad;
            return fail("%s word %zu is %016" PRIx64 ", want %016" PRIx64, what, i, host[bad], splitmix64(seed ^ i));
        }
    }
    return true;
}

static bool no_errors_counted(const unsigned long long *errors) {
    unsigned long long n;
    TRY(cudaMemcpy(&n, errors, sizeof n, cudaMemcpyDeviceToHost));
    if (n != 0) return fail("the loop's device checks found %llu wrong words", n);
    return true;
}

// ---- workloads -----------------------------------------------------------------------------------------

// A workload builds its state in setup(), advances it in step() on each of its loops() threads, and checks it
// in check() while every loop is paused between two steps. Each returns false with failure_text set.
struct Workload {
    virtual ~Workload() {}
    virtual int loops() { return 1; }
    virtual bool setup() = 0;
    virtual bool step(int loop, uint64_t n) = 0;  // n: how many steps this loop has made
    virtual bool check() = 0;
    virtual void summary(char *text, size_t len) = 0;  // what a PASS says
};

// ---- buffers, vmm, managed, ipc, tree: pattern buffers from one allocator ----

enum class Memory { device, vmm, managed, ipc };

// Maps about `want` bytes as growable allocators do: one reserved range backed by two physical allocations.
static bool map_vmm(size_t want, uint64_t **ptr, size_t *bytes) {
    int device;
    TRY(cudaGetDevice(&device));
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    size_t granularity;
    TRY_CU(cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
    size_t half = (want / 2 + granularity - 1) / granularity * granularity;
    CUdeviceptr base;
    TRY_CU(cuMemAddressReserve(&base, 2 * half, 0, 0, 0));
    CUmemAccessDesc access = {};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    for (int i = 0; i < 2; i++) {
        // The handles stay unreleased: the process keeps owning both allocations and their mappings.
        CUmemGenericAllocationHandle handle;
        TRY_CU(cuMemCreate(&handle, half, &prop, 0));
        TRY_CU(cuMemMap(base + i * half, half, 0, handle, 0));
        TRY_CU(cuMemSetAccess(base + i * half, half, &access, 1));
    }
    *ptr = (uint64_t *)base;
    *bytes = 2 * half;
    return true;
}

struct BuffersWorkload : Workload {
    Memory memory;
    uint64_t seed;
    cudaStream_t stream;
    unsigned long long *errors;  // wrong words the loop's checks found
    std::vector<Buffer> buffers;
    cudaIpcMemHandle_t exported;  // ipc: the export lasts for the process's life

    BuffersWorkload(Memory m, uint64_t s) : memory(m), seed(s) {}

    bool setup() override {
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaMalloc((void **)&errors, sizeof *errors));
        TRY(cudaMemset(errors, 0, sizeof *errors));
        uint64_t *p = nullptr;
        size_t bytes = 0;
        switch (memory) {
        case Memory::device: {
            const size_t sizes[] = {(size_t)4 << 10, (size_t)1 << 20, (size_t)64 << 20, mem_bytes};
            for (size_t size : sizes) {
                TRY(cudaMalloc((void **)&p, size));
                buffers.push_back(make_buffer("cudaMalloc", p, size, seed + buffers.size()));
            }
            break;
        }
        case Memory::vmm:
            if (!map_vmm(mem_bytes, &p, &bytes)) return false;
            buffers.push_back(make_buffer("cuMemMap", p, bytes, seed));
            break;
        case Memory::managed:
            bytes = (size_t)64 << 20;
            TRY(cudaMallocManaged((void **)&p, bytes, cudaMemAttachGlobal));
            buffers.push_back(make_buffer("cudaMallocManaged", p, bytes, seed));
            break;
        case Memory::ipc:
            TRY(cudaMalloc((void **)&p, mem_bytes));
            TRY(cudaIpcGetMemHandle(&exported, p));
            buffers.push_back(make_buffer("exported cudaMalloc", p, mem_bytes, seed));
            break;
        }
        for (const Buffer &b : buffers) TRY(launch_fill(b.ptr, b.bytes / 8, b.seed, stream));
        TRY(cudaStreamSynchronize(stream));
        return true;
    }

    bool step(int, uint64_t n) override {
        for (const Buffer &b : buffers) TRY(check_slice(b, n, errors, stream));
        TRY(cudaStreamSynchronize(stream));
        if (memory == Memory::managed) {
            // The host reads the slice the device checks next, so pages migrate both ways every step.
            const Buffer &b = buffers[0];
            size_t from, len;
            slice_for(b.bytes / 8, n + 1, &from, &len);
            long bad = first_bad(b.ptr + from, len, b.seed, from);
            if (bad >= 0) return fail("%s word %zu read on the host is wrong", b.name, from + (size_t)bad);
        }
        return true;
    }

    bool check() override {
        TRY(cudaStreamSynchronize(stream));
        if (!no_errors_counted(errors)) return false;
        for (const Buffer &b : buffers)
            if (!compare_device(b.name, b.ptr, b.bytes / 8, b.seed)) return false;
        return true;
    }

    void summary(char *text, size_t len) override {
        size_t used = (size_t)snprintf(text, len, "intact:");
        for (const Buffer &b : buffers)
            if (used < len) used += (size_t)snprintf(text + used, len - used, "%s %s", &b == &buffers[0] ? "" : ",", b.name);
    }
};

// ---- share, share3, share-orphan: one VMM allocation mapped by several processes ----

// Sends descriptor `fd` over the unix socket `channel` (one byte of data carries it).
static bool send_descriptor(int channel, int fd) {
    char byte = 'f';
    struct iovec vector = {&byte, 1};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    memset(&control, 0, sizeof control);
    struct msghdr message = {};
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control.space;
    message.msg_controllen = sizeof control.space;
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &fd, sizeof fd);
    if (sendmsg(channel, &message, 0) != 1) return fail("sendmsg: %s", strerror(errno));
    return true;
}

static bool receive_descriptor(int channel, int *fd) {
    char byte;
    struct iovec vector = {&byte, 1};
    union { struct cmsghdr header; char space[CMSG_SPACE(sizeof(int))]; } control;
    struct msghdr message = {};
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control.space;
    message.msg_controllen = sizeof control.space;
    if (recvmsg(channel, &message, MSG_CMSG_CLOEXEC) != 1) return fail("recvmsg: %s", strerror(errno));
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    if (!header || header->cmsg_type != SCM_RIGHTS) return fail("no descriptor came over the socket");
    memcpy(fd, CMSG_DATA(header), sizeof *fd);
    return true;
}

// ipc-share, ipc-share-event: legacy CUDA IPC instead of cuMem export and import (and an IPC event).
static bool share_legacy = false, share_event = false;

static bool send_bytes(int channel, const void *bytes, size_t length) {
    if (write(channel, bytes, length) != (ssize_t)length) return fail("cannot pass %zu bytes on: %s", length, strerror(errno));
    return true;
}

static bool receive_bytes(int channel, void *bytes, size_t length) {
    size_t done = 0;
    while (done < length) {
        ssize_t got = read(channel, (char *)bytes + done, length - done);
        if (got <= 0) return fail("the handle did not come over the socket");
        done += (size_t)got;
    }
    return true;
}

struct SharedWorkload : Workload {
    int part, parts;       // this process's part of the allocation, and how many there are
    bool creates;          // creates and exports the allocation (else imports it)
    int from = -1;         // the socket the descriptor comes over (an importer)
    int to = -1;           // the socket it is passed on over, or -1
    bool orphan = false;   // share-orphan's creator: exits once the root has imported
    std::vector<bool> live;  // parts whose owner still runs (their counters must move)
    uint64_t *base = nullptr;
    size_t part_words = 0;
    cudaStream_t stream;
    unsigned long long *errors;
    std::vector<uint64_t> seen;  // each part's counter at the last check
    cudaEvent_t event = nullptr;  // ipc-share-event: recorded by the creator, waited for by the importer
    // This part's counter is bumped by a thread of its own, never paused by check(): another process
    // checking that it moves must not wait on this process's own check.
    cudaStream_t bump_stream;
    std::atomic<bool> bump_failed{false};
    char bump_failure[256] = "";

    SharedWorkload(int part, int parts, bool creates) : part(part), parts(parts), creates(creates), live(parts, true), seen(parts, 0) {}

    static uint64_t seed_of(int part) { return 5000 + (uint64_t)part; }
    uint64_t *counter(int p) { return base + (size_t)p * part_words; }
    uint64_t *pattern(int p) { return counter(p) + 1; }

    bool setup() override {
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaMalloc((void **)&errors, sizeof *errors));
        TRY(cudaMemset(errors, 0, sizeof *errors));
        int device;
        TRY(cudaGetDevice(&device));
        CUmemAllocationProp prop = {};
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = device;
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        size_t granularity;
        TRY_CU(cuMemGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
        size_t bytes = (mem_bytes + granularity - 1) / granularity * granularity;
        part_words = bytes / 8 / parts;
        CUmemGenericAllocationHandle handle = 0;
        int fd = -1;
        cudaIpcMemHandle_t ipc_handle;
        cudaIpcEventHandle_t event_handle;
        if (share_legacy) {
            if (creates) {
                TRY(cudaMalloc((void **)&base, bytes));
                TRY(cudaIpcGetMemHandle(&ipc_handle, base));
                if (share_event) {
                    TRY(cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventInterprocess));
                    TRY(cudaIpcGetEventHandle(&event_handle, event));
                }
            } else {
                if (!receive_bytes(from, &ipc_handle, sizeof ipc_handle)) return false;
                TRY(cudaIpcOpenMemHandle((void **)&base, ipc_handle, cudaIpcMemLazyEnablePeerAccess));
                if (share_event) {
                    if (!receive_bytes(from, &event_handle, sizeof event_handle)) return false;
                    TRY(cudaIpcOpenEventHandle(&event, event_handle));
                }
            }
        } else if (creates) {
            TRY_CU(cuMemCreate(&handle, bytes, &prop, 0));
            TRY_CU(cuMemExportToShareableHandle(&fd, handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
        } else {
            if (!receive_descriptor(from, &fd)) return false;
            TRY_CU(cuMemImportFromShareableHandle(&handle, (void *)(uintptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
        }
        if (!share_legacy) {
            CUdeviceptr address;
            TRY_CU(cuMemAddressReserve(&address, bytes, 0, 0, 0));
            TRY_CU(cuMemMap(address, bytes, 0, handle, 0));
            CUmemAccessDesc access = {};
            access.location = prop.location;
            access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
            TRY_CU(cuMemSetAccess(address, bytes, &access, 1));
            // The mapping holds the memory: the handle and the descriptor go, as NCCL lets them go.
            TRY_CU(cuMemRelease(handle));
            base = (uint64_t *)address;
        }
        TRY(cudaMemsetAsync(counter(part), 0, 8, stream));
        TRY(launch_fill(pattern(part), part_words - 1, seed_of(part), stream));
        TRY(cudaStreamSynchronize(stream));
        // Passed on only once this part is filled: whoever maps it next may check it at once.
        if (to >= 0 && share_legacy) {
            if (!send_bytes(to, &ipc_handle, sizeof ipc_handle)) return false;
            if (share_event && !send_bytes(to, &event_handle, sizeof event_handle)) return false;
        } else if (to >= 0 && !send_descriptor(to, fd)) {
            return false;
        }
        if (fd >= 0) close(fd);
        TRY(cudaStreamCreateWithFlags(&bump_stream, cudaStreamNonBlocking));
        if (!orphan) {
            std::thread([this] {
                for (;;) {
                    cudaError_t error = launch_spin(0, (unsigned long long *)counter(part), bump_stream);
                    if (error == cudaSuccess) error = cudaStreamSynchronize(bump_stream);
                    if (error != cudaSuccess) {
                        snprintf(bump_failure, sizeof bump_failure, "bumping the counter: %s", cudaGetErrorName(error));
                        bump_failed.store(true);
                        return;
                    }
                    sleep_ms(1);
                }
            }).detach();
        }
        if (orphan) {
            char ack;
            if (read(to, &ack, 1) != 1) return fail("the importer did not confirm");
            _exit(0);  // the memory lives on in the importer
        }
        if (!creates && from >= 0 && to < 0 && parts == 2 && !live[1 - part]) {
            if (write(from, "k", 1) != 1) return fail("cannot confirm the import");
        }
        return true;
    }

    // Checks a slice of this part's pattern (and records or waits for the IPC event).
    bool step(int, uint64_t n) override {
        if (event && !creates) TRY(cudaStreamWaitEvent(stream, event, 0));
        TRY(launch_spin(0, nullptr, stream));
        if (event && creates) TRY(cudaEventRecord(event, stream));
        Buffer own = make_buffer("own part", pattern(part), (part_words - 1) * 8, seed_of(part));
        TRY(check_slice(own, n, errors, stream));
        TRY(cudaStreamSynchronize(stream));
        return true;
    }

    bool check() override {
        TRY(cudaStreamSynchronize(stream));
        if (!no_errors_counted(errors)) return false;
        if (bump_failed.load()) return fail("%s", bump_failure);
        for (int p = 0; p < parts; p++) {
            char what[64];
            snprintf(what, sizeof what, "part %d of the shared memory", p);
            if (!compare_device(what, pattern(p), part_words - 1, seed_of(p))) return false;
            uint64_t now;
            TRY(cudaMemcpy(&now, counter(p), 8, cudaMemcpyDeviceToHost));
            // Another process's counter must move past what the last check saw: its writes reach this mapping.
            for (uint64_t deadline = now_ms() + PROGRESS_TIMEOUT_MS; p != part && live[p] && seen[p] && now <= seen[p]; sleep_ms(10)) {
                if (now_ms() > deadline) return fail("the counter of part %d stays at %" PRIu64 ": its owner's writes no longer arrive", p, now);
                TRY(cudaMemcpy(&now, counter(p), 8, cudaMemcpyDeviceToHost));
            }
            seen[p] = now;
        }
        return true;
    }

    void summary(char *text, size_t len) override {
        snprintf(text, len, "shared memory intact: %d parts of %zu MiB, part %d %s, counters %" PRIu64 "/%" PRIu64, parts, part_words * 8 >> 20, part,
                 creates ? "created and exported here" : "imported", seen[0], seen[parts > 1 ? 1 : 0]);
    }
};

// ---- streams: work queued on every stream ----

#define STREAM_DEPTH 16                 // kernels kept queued on each stream
#define STREAM_KERNEL_CYCLES 2000000ll  // about 1 ms at the H200's boost clock

struct StreamsWorkload : Workload {
    struct Lane {
        cudaStream_t stream;
        cudaEvent_t done[STREAM_DEPTH];  // a ring: done[k % STREAM_DEPTH] follows the k-th kernel
        uint64_t launched, retired;      // kernels launched, and those whose event the loop has waited for
        unsigned long long checked;      // the stream's counter at the last check
    };
    std::vector<Lane> lanes;
    unsigned long long *counters;  // one per stream, bumped by each of its kernels

    bool setup() override {
        lanes.resize(count);
        TRY(cudaMalloc((void **)&counters, count * sizeof *counters));
        TRY(cudaMemset(counters, 0, count * sizeof *counters));
        for (Lane &lane : lanes) {
            TRY(cudaStreamCreateWithFlags(&lane.stream, cudaStreamNonBlocking));
            for (cudaEvent_t &e : lane.done) TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
            lane.launched = lane.retired = lane.checked = 0;
        }
        return true;
    }

    // Tops every stream's queue up to STREAM_DEPTH kernels, first waiting for the oldest where it is full.
    bool step(int, uint64_t) override {
        for (int i = 0; i < count; i++) {
            Lane &lane = lanes[i];
            if (lane.launched - lane.retired == STREAM_DEPTH) {
                TRY(cudaEventSynchronize(lane.done[lane.retired % STREAM_DEPTH]));
                lane.retired++;
            }
            TRY(launch_spin(STREAM_KERNEL_CYCLES, counters + i, lane.stream));
            TRY(cudaEventRecord(lane.done[lane.launched % STREAM_DEPTH], lane.stream));
            lane.launched++;
        }
        return true;
    }

    bool check() override {
        for (Lane &lane : lanes) TRY(cudaStreamSynchronize(lane.stream));
        std::vector<unsigned long long> seen(count);
        TRY(cudaMemcpy(seen.data(), counters, count * sizeof *counters, cudaMemcpyDeviceToHost));
        for (int i = 0; i < count; i++) {
            Lane &lane = lanes[i];
            if (seen[i] != lane.launched) return fail("stream %d ran %llu kernels of %" PRIu64 " launched", i, seen[i], lane.launched);
            if (seen[i] <= lane.checked) return fail("stream %d ran no kernel since the last check (%llu)", i, seen[i]);
            lane.checked = seen[i];
        }
        return true;
    }

    void summary(char *text, size_t len) override {
        uint64_t total = 0;
        for (const Lane &lane : lanes) total += lane.launched;
        snprintf(text, len, "%d streams ran all %" PRIu64 " kernels launched", count, total);
    }
};

// ---- events: recorded before the checkpoint, used after it ----

#define SHORT_KERNEL_CYCLES 400000ll    // a fraction of a millisecond
#define LONG_KERNEL_CYCLES 100000000ll  // about 50 ms

struct EventsWorkload : Workload {
    cudaStream_t stream, other;
    cudaEvent_t kept[3];     // before a short kernel, between it and a long one, after the long one
    float kept_ms[2];        // kept[0] to kept[1] and kept[1] to kept[2], measured before ready
    cudaEvent_t start, end;  // recorded again by every loop step

    bool setup() override {
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaStreamCreateWithFlags(&other, cudaStreamNonBlocking));
        for (cudaEvent_t &e : kept) TRY(cudaEventCreate(&e));
        TRY(cudaEventCreate(&start));
        TRY(cudaEventCreate(&end));
        TRY(cudaEventRecord(kept[0], stream));
        TRY(launch_spin(SHORT_KERNEL_CYCLES, nullptr, stream));
        TRY(cudaEventRecord(kept[1], stream));
        TRY(launch_spin(LONG_KERNEL_CYCLES, nullptr, stream));
        TRY(cudaEventRecord(kept[2], stream));
        TRY(cudaEventSynchronize(kept[2]));
        for (int i = 0; i < 2; i++) TRY(cudaEventElapsedTime(&kept_ms[i], kept[i], kept[i + 1]));
        return true;
    }

    bool step(int, uint64_t) override {
        TRY(cudaEventRecord(start, stream));
        TRY(launch_spin(SHORT_KERNEL_CYCLES, nullptr, stream));
        TRY(cudaEventRecord(end, stream));
        TRY(cudaEventSynchronize(end));
        float ms;
        TRY(cudaEventElapsedTime(&ms, start, end));
        if (!(ms > 0)) return fail("a loop kernel took %f ms by its events", ms);
        return true;
    }

    bool check() override {
        // The kept events completed long ago: they must still say so, and still hold the same timestamps.
        for (cudaEvent_t e : kept) TRY(cudaEventQuery(e));
        TRY(cudaEventSynchronize(kept[2]));
        for (int i = 0; i < 2; i++) {
            float ms;
            TRY(cudaEventElapsedTime(&ms, kept[i], kept[i + 1]));
            if (ms != kept_ms[i]) return fail("events %d to %d time %.6f ms, %.6f ms before", i, i + 1, ms, kept_ms[i]);
        }
        // New events, on a stream that first waits for a kept one.
        cudaEvent_t fresh[2];
        for (cudaEvent_t &e : fresh) TRY(cudaEventCreate(&e));
        TRY(cudaStreamWaitEvent(other, kept[2], 0));
        TRY(cudaEventRecord(fresh[0], other));
        TRY(launch_spin(SHORT_KERNEL_CYCLES, nullptr, other));
        TRY(cudaEventRecord(fresh[1], other));
        TRY(cudaEventSynchronize(fresh[1]));
        float ms;
        TRY(cudaEventElapsedTime(&ms, fresh[0], fresh[1]));
        for (cudaEvent_t e : fresh) TRY(cudaEventDestroy(e));
        if (!(ms > 0)) return fail("new events time %f ms", ms);
        return true;
    }

    void summary(char *text, size_t len) override {
        snprintf(text, len, "kept events complete, timing %.3f ms and %.3f ms as before; new events work", kept_ms[0], kept_ms[1]);
    }
};

// ---- graph: instantiated before the checkpoint, launched after it ----

#define GRAPH_WORDS ((size_t)512 << 10)  // 4 MiB
#define GRAPH_SEED 5
#define GRAPH_CONSTANT 0x9E3779B97F4A7C15ull

// Each launch adds i + GRAPH_CONSTANT to word i, so after n launches word i is pattern(i) + n * (i + GRAPH_CONSTANT).
struct GraphWorkload : Workload {
    cudaStream_t stream;
    uint64_t *buffer, *scratch, *copy;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    uint64_t launches = 0;

    bool setup() override {
        const size_t bytes = GRAPH_WORDS * 8;
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaMalloc((void **)&buffer, bytes));
        TRY(cudaMalloc((void **)&scratch, bytes));
        TRY(cudaMalloc((void **)&copy, bytes));
        TRY(launch_fill(buffer, GRAPH_WORDS, GRAPH_SEED, stream));
        TRY(cudaStreamSynchronize(stream));
        // One node of each common kind: memset, kernel, copy, kernel.
        TRY(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        TRY(cudaMemsetAsync(scratch, 0, bytes, stream));
        TRY(launch_add_index(scratch, GRAPH_WORDS, stream));
        TRY(cudaMemcpyAsync(copy, scratch, bytes, cudaMemcpyDeviceToDevice, stream));
        TRY(launch_add(buffer, copy, GRAPH_WORDS, GRAPH_CONSTANT, stream));
        TRY(cudaStreamEndCapture(stream, &graph));
        TRY(cudaGraphInstantiate(&exec, graph, 0));
        return true;
    }

    bool step(int, uint64_t) override {
        TRY(cudaGraphLaunch(exec, stream));
        TRY(cudaStreamSynchronize(stream));
        launches++;
        return true;
    }

    bool check() override {
        TRY(cudaStreamSynchronize(stream));
        std::vector<uint64_t> host(GRAPH_WORDS);
        TRY(cudaMemcpy(host.data(), buffer, GRAPH_WORDS * 8, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < GRAPH_WORDS; i++) {
            uint64_t want = splitmix64(GRAPH_SEED ^ i) + launches * (i + GRAPH_CONSTANT);
            if (host[i] != want)
                return fail("graph buffer word %zu is %016" PRIx64 " after %" PRIu64 " launches, want %016" PRIx64, i, host[i], launches, want);
        }
        return true;
    }

    void summary(char *text, size_t len) override { snprintf(text, len, "graph buffer right after %" PRIu64 " launches", launches); }
};

// ---- pool: stream-ordered allocations ----

struct PoolWorkload : Workload {
    cudaStream_t stream;
    cudaMemPool_t own;
    unsigned long long *errors;
    std::vector<Buffer> kept;  // allocated before ready, alive for the process's life

    bool setup() override {
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaMalloc((void **)&errors, sizeof *errors));
        TRY(cudaMemset(errors, 0, sizeof *errors));
        cudaMemPoolProps props = {};
        props.allocType = cudaMemAllocationTypePinned;
        props.handleTypes = cudaMemHandleTypeNone;
        props.location.type = cudaMemLocationTypeDevice;
        TRY(cudaGetDevice(&props.location.id));
        TRY(cudaMemPoolCreate(&own, &props));
        // The created pool keeps what is freed, so at a checkpoint it holds more memory than is allocated from it.
        uint64_t keep_all = UINT64_MAX;
        TRY(cudaMemPoolSetAttribute(own, cudaMemPoolAttrReleaseThreshold, &keep_all));
        uint64_t *p;
        const size_t from_default[] = {(size_t)1 << 20, mem_bytes}, from_own[] = {(size_t)4 << 20, (size_t)64 << 20};
        for (size_t size : from_default) {
            TRY(cudaMallocAsync((void **)&p, size, stream));
            kept.push_back(make_buffer("default pool", p, size, 300 + kept.size()));
        }
        for (size_t size : from_own) {
            TRY(cudaMallocFromPoolAsync((void **)&p, size, own, stream));
            kept.push_back(make_buffer("created pool", p, size, 300 + kept.size()));
        }
        for (const Buffer &b : kept) TRY(launch_fill(b.ptr, b.bytes / 8, b.seed, stream));
        TRY(cudaStreamSynchronize(stream));
        return true;
    }

    // Allocates, fills, checks and frees a temporary of 4 KiB to 1 MiB in each pool, and checks the kept ones.
    bool step(int, uint64_t n) override {
        size_t words = ((size_t)4096 << (n % 9)) / 8;
        uint64_t *a, *b;
        TRY(cudaMallocAsync((void **)&a, words * 8, stream));
        TRY(cudaMallocFromPoolAsync((void **)&b, words * 8, own, stream));
        TRY(launch_fill(a, words, n, stream));
        TRY(launch_fill(b, words, ~n, stream));
        TRY(launch_check(a, 0, words, n, errors, stream));
        TRY(launch_check(b, 0, words, ~n, errors, stream));
        TRY(cudaFreeAsync(a, stream));
        TRY(cudaFreeAsync(b, stream));
        for (const Buffer &k : kept) TRY(check_slice(k, n, errors, stream));
        TRY(cudaStreamSynchronize(stream));
        return true;
    }

    bool check() override {
        TRY(cudaStreamSynchronize(stream));
        if (!no_errors_counted(errors)) return false;
        for (const Buffer &b : kept)
            if (!compare_device(b.name, b.ptr, b.bytes / 8, b.seed)) return false;
        return true;
    }

    void summary(char *text, size_t len) override {
        snprintf(text, len, "%zu pool allocations intact, temporaries allocated and freed", kept.size());
    }
};

// ---- pinned: copies between pinned host memory and the device ----

#define PINNED_SEED 7

// Every step wipes one slice of each copy in turn and restores it from the other through cudaMemcpyAsync, so
// both copies keep the pattern only while pinned copies work in both directions.
struct PinnedWorkload : Workload {
    cudaStream_t stream;
    uint64_t *host, *device;
    size_t words;
    unsigned long long *errors;

    bool setup() override {
        words = mem_bytes / 8;
        TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        TRY(cudaHostAlloc((void **)&host, mem_bytes, cudaHostAllocDefault));
        TRY(cudaMalloc((void **)&device, mem_bytes));
        TRY(cudaMalloc((void **)&errors, sizeof *errors));
        TRY(cudaMemset(errors, 0, sizeof *errors));
        for (size_t i = 0; i < words; i++) host[i] = splitmix64(PINNED_SEED ^ i);
        TRY(cudaMemcpyAsync(device, host, mem_bytes, cudaMemcpyHostToDevice, stream));
        TRY(cudaStreamSynchronize(stream));
        return true;
    }

    bool step(int, uint64_t n) override {
        size_t from, len;
        slice_for(words, n, &from, &len);
        TRY(cudaMemsetAsync(device + from, 0, len * 8, stream));
        TRY(cudaMemcpyAsync(device + from, host + from, len * 8, cudaMemcpyHostToDevice, stream));
        TRY(launch_check(device, from, len, PINNED_SEED, errors, stream));
        TRY(cudaStreamSynchronize(stream));
        memset(host + from, 0, len * 8);
        TRY(cudaMemcpyAsync(host + from, device + from, len * 8, cudaMemcpyDeviceToHost, stream));
        TRY(cudaStreamSynchronize(stream));
        long bad = first_bad(host + from, len, PINNED_SEED, from);
        if (bad >= 0) return fail("pinned word %zu is wrong after its round trip", from + (size_t)bad);
        return true;
    }

    bool check() override {
        TRY(cudaStreamSynchronize(stream));
        if (!no_errors_counted(errors)) return false;
        return compare_host("pinned host", host, words, PINNED_SEED) && compare_device("device copy", device, words, PINNED_SEED);
    }

    void summary(char *text, size_t len) override { snprintf(text, len, "pinned %zu MiB and its device copy intact", mem_bytes >> 20); }
};

// ---- threads: one stream and buffer per host thread ----

struct ThreadsWorkload : Workload {
    struct Worker {
        cudaStream_t stream;
        Buffer buffer;
        unsigned long long *counts;  // [0]: wrong words the loop found, [1]: steps the device ran
        uint64_t steps;              // steps the host saw complete
    };
    std::vector<Worker> workers;

    int loops() override { return count; }

    bool setup() override {
        workers.resize(count);
        size_t bytes = std::max<size_t>(mem_bytes / count / 8 * 8, 8);
        for (int i = 0; i < count; i++) {
            Worker &w = workers[i];
            uint64_t *p;
            TRY(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking));
            TRY(cudaMalloc((void **)&p, bytes));
            TRY(cudaMalloc((void **)&w.counts, 2 * sizeof *w.counts));
            TRY(cudaMemsetAsync(w.counts, 0, 2 * sizeof *w.counts, w.stream));
            w.buffer = make_buffer("thread buffer", p, bytes, 100 + i);
            TRY(launch_fill(p, bytes / 8, w.buffer.seed, w.stream));
            TRY(cudaStreamSynchronize(w.stream));
            w.steps = 0;
        }
        return true;
    }

    bool step(int loop, uint64_t n) override {
        Worker &w = workers[loop];
        TRY(check_slice(w.buffer, n, w.counts, w.stream));
        TRY(launch_spin(0, w.counts + 1, w.stream));
        TRY(cudaStreamSynchronize(w.stream));
        w.steps++;
        return true;
    }

    bool check() override {
        for (int i = 0; i < count; i++) {
            Worker &w = workers[i];
            unsigned long long counts[2];
            TRY(cudaStreamSynchronize(w.stream));
            TRY(cudaMemcpy(counts, w.counts, sizeof counts, cudaMemcpyDeviceToHost));
            if (counts[0] != 0) return fail("thread %d: its device checks found %llu wrong words", i, counts[0]);
            if (counts[1] != w.steps) return fail("thread %d: the device ran %llu steps, the host saw %" PRIu64, i, counts[1], w.steps);
            if (!compare_device(w.buffer.name, w.buffer.ptr, w.buffer.bytes / 8, w.buffer.seed)) return false;
        }
        return true;
    }

    void summary(char *text, size_t len) override { snprintf(text, len, "%d threads progressing, buffers intact", count); }
};

// ---- the loops and verification ------------------------------------------------------------------------

struct Loop {
    pthread_t thread;
    Workload *workload;
    int index;
    std::mutex lock;  // held for each step: check() takes them all to see the state between steps
    std::atomic<uint64_t> ticks{0};
};
static Loop loops[MAX_LOOPS];

// The first failure of any loop; a failed loop stops, so its progress stops too.
static std::mutex failure_lock;
static char loop_failure[512];
static std::atomic<bool> loop_failed{false};

static void *loop_main(void *arg) {
    Loop *loop = (Loop *)arg;
    for (;;) {
        bool ok;
        {
            std::lock_guard<std::mutex> hold(loop->lock);
            ok = loop->workload->step(loop->index, loop->ticks.load());
        }
        if (!ok) {
            std::lock_guard<std::mutex> hold(failure_lock);
            if (!loop_failed.load()) {
                snprintf(loop_failure, sizeof loop_failure, "%s", failure_text);
                loop_failed.store(true);
            }
            return NULL;
        }
        loop->ticks.fetch_add(1);
        sleep_ms(1);  // lets check() take the lock between steps
    }
}

static bool check_paused(Workload &w) {
    for (int i = 0; i < w.loops(); i++) loops[i].lock.lock();
    bool ok = w.check();
    for (int i = 0; i < w.loops(); i++) loops[i].lock.unlock();
    return ok;
}

// Waits until ticks has advanced by `steps` from its value now; true on success.
static bool wait_progress(std::atomic<uint64_t> &ticks, uint64_t steps) {
    uint64_t start = ticks.load(), deadline = now_ms() + PROGRESS_TIMEOUT_MS;
    while (ticks.load() < start + steps) {
        if (now_ms() > deadline) return false;
        sleep_ms(5);
    }
    return true;
}

// Fills text with the result: "PASS ..." or "FAIL ...".
static void verify(Workload &w, char *text, size_t len) {
    if (loop_failed.load()) { snprintf(text, len, "FAIL %s", loop_failure); return; }
    if (!check_paused(w)) { snprintf(text, len, "FAIL %s", failure_text); return; }
    for (int i = 0; i < w.loops(); i++) {
        if (wait_progress(loops[i].ticks, 5)) continue;
        if (loop_failed.load()) snprintf(text, len, "FAIL %s", loop_failure);
        else snprintf(text, len, "FAIL loop %d made no progress in %d s", i, PROGRESS_TIMEOUT_MS / 1000);
        return;
    }
    // Again: what the loops did since a restore must be right too.
    if (!check_paused(w)) { snprintf(text, len, "FAIL %s", failure_text); return; }
    char summary[256];
    w.summary(summary, sizeof summary);
    uint64_t steps = 0;
    for (int i = 0; i < w.loops(); i++) steps += loops[i].ticks.load();
    snprintf(text, len, "PASS %s, %" PRIu64 " loop steps", summary, steps);
}

// The tree's root: forwards the request to the child, verifies itself meanwhile, and passes only if both pass.
static const char *child_ready = "ready-child", *child_result = "result-child";

static void verify_tree(Workload &w, pid_t child, char *text, size_t len) {
    char path[4096], own[1024], theirs[1024] = "";
    snprintf(path, sizeof path, "%s/%s", dir, child_result);
    unlink(path);
    int status;
    if (waitpid(child, &status, WNOHANG) != 0 || kill(child, SIGUSR1) != 0) {
        snprintf(text, len, "FAIL child %d is gone", (int)child);
        return;
    }
    verify(w, own, sizeof own);
    for (uint64_t deadline = now_ms() + CHILD_RESULT_TIMEOUT_MS; !theirs[0]; sleep_ms(10)) {
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(theirs, sizeof theirs, f)) snprintf(theirs, sizeof theirs, "FAIL empty result");
            theirs[strcspn(theirs, "\n")] = 0;
            fclose(f);
        } else if (waitpid(child, &status, WNOHANG) != 0) {
            snprintf(theirs, sizeof theirs, "FAIL exited");
        } else if (now_ms() > deadline) {
            snprintf(theirs, sizeof theirs, "FAIL no result in %d s", CHILD_RESULT_TIMEOUT_MS / 1000);
        }
    }
    bool own_pass = !strncmp(own, "PASS ", 5), their_pass = !strncmp(theirs, "PASS ", 5);
    if (own_pass && their_pass) snprintf(text, len, "PASS root: %s; child: %s", own + 5, theirs + 5);
    else if (!own_pass) snprintf(text, len, "FAIL root: %s", own + 5);
    else snprintf(text, len, "FAIL child: %s", strncmp(theirs, "FAIL ", 5) ? theirs : theirs + 5);
}

static bool start(Workload &w) {
    // cudaSetDevice creates the primary context and makes it current here, which the driver calls of vmm need.
    TRY(cudaSetDevice(0));
    return w.setup();
}

// Builds the state, starts the loops, reports ready as DIR/READY_NAME and then answers SIGUSR1 in
// DIR/RESULT_NAME. The tree's root passes its child, whose own ready it waits for.
[[noreturn]] static void serve(Workload &w, const char *ready_name, const char *result_name, pid_t child) {
    if (!start(w)) give_up(failure_text);
    for (int i = 0; i < w.loops(); i++) {
        loops[i].workload = &w;
        loops[i].index = i;
        if (pthread_create(&loops[i].thread, NULL, loop_main, &loops[i]) != 0) die("pthread_create");
    }
    for (int i = 0; i < w.loops(); i++)
        if (!wait_progress(loops[i].ticks, 3)) give_up(loop_failed.load() ? loop_failure : "a loop did not start");
    if (child > 0) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, child_ready);
        for (uint64_t deadline = now_ms() + 60000; access(path, F_OK) != 0; sleep_ms(10)) {
            int status;
            if (now_ms() > deadline || waitpid(child, &status, WNOHANG) != 0) give_up("the child never became ready");
        }
    }
    write_file(ready_name, "%d\n", (int)getpid());
    for (;;) {
        if (verify_requested) {
            verify_requested = 0;
            char text[4096];
            if (child > 0) verify_tree(w, child, text, sizeof text);
            else verify(w, text, sizeof text);
            write_file(result_name, "%s\n", text);
        }
        sleep_ms(10);
    }
}

// The root and one child, each with its own buffers. The fork comes before any CUDA call: CUDA state does
// not survive a fork.
[[noreturn]] static void run_tree(void) {
    char path[4096];
    snprintf(path, sizeof path, "%s/ready-child", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/result-child", dir);
    unlink(path);
    pid_t root = getpid(), pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        // A child that outlived its root would hold the GPU with nobody to ask it anything.
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("prctl");
        if (getppid() != root) _exit(2);  // the root died before prctl
        static BuffersWorkload child(Memory::device, 1001);
        serve(child, "ready-child", "result-child", 0);
    }
    static BuffersWorkload own(Memory::device, 1);
    serve(own, "ready", "result", pid);
}

// share and share3: the root creates; each child imports what its parent passes it, and passes it on. The
// forks come before any CUDA call; each child's verification is forwarded by its parent.
[[noreturn]] static void run_share(int parts) {
    char path[4096];
    for (const char *name : {"ready-child", "result-child", "ready-child2", "result-child2"}) {
        snprintf(path, sizeof path, "%s/%s", dir, name);
        unlink(path);
    }
    int up = -1;  // the socket to this process's parent
    pid_t parent = getpid();
    for (int part = 0; part < parts; part++) {
        int pair[2] = {-1, -1};
        pid_t child = 0;
        if (part + 1 < parts) {
            if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
            child = fork();
            if (child < 0) die("fork");
        }
        if (child == 0 && part + 1 < parts) {
            // The child: the next part.
            if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("prctl");
            if (getppid() != parent) _exit(2);
            close(pair[0]);
            up = pair[1];
            parent = getpid();
            continue;
        }
        if (pair[1] >= 0) close(pair[1]);
        static SharedWorkload *own;
        own = new SharedWorkload(part, parts, part == 0);
        own->from = up;
        own->to = pair[0];
        // Names: the root answers in "result", its child in "result-child", that one's child in "result-child2".
        const char *ready = part == 0 ? "ready" : part == 1 ? "ready-child" : "ready-child2";
        const char *result = part == 0 ? "result" : part == 1 ? "result-child" : "result-child2";
        child_ready = part == 0 ? "ready-child" : "ready-child2";
        child_result = part == 0 ? "result-child" : "result-child2";
        serve(*own, ready, result, child);
    }
    _exit(2);
}

// share-orphan: the child creates the memory and passes it to the root, which imports it; then the child
// exits and the root serves alone.
[[noreturn]] static void run_share_orphan(void) {
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
    pid_t root = getpid(), child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) die("prctl");
        if (getppid() != root) _exit(2);
        close(pair[0]);
        static SharedWorkload creator(0, 2, true);
        creator.to = pair[1];
        creator.orphan = true;
        if (!start(creator)) give_up(failure_text);
        _exit(0);
    }
    close(pair[1]);
    static SharedWorkload importer(1, 2, false);
    importer.from = pair[0];
    importer.live[0] = false;
    std::thread reaper([child] { int status; waitpid(child, &status, 0); });
    reaper.detach();
    serve(importer, "ready", "result", 0);
}

static Workload *workload_for(const char *mode) {
    if (!strcmp(mode, "buffers")) return new BuffersWorkload(Memory::device, 1);
    if (!strcmp(mode, "vmm")) return new BuffersWorkload(Memory::vmm, 1);
    if (!strcmp(mode, "managed")) return new BuffersWorkload(Memory::managed, 1);
    if (!strcmp(mode, "ipc")) return new BuffersWorkload(Memory::ipc, 1);
    if (!strcmp(mode, "streams")) return new StreamsWorkload;
    if (!strcmp(mode, "events")) return new EventsWorkload;
    if (!strcmp(mode, "graph")) return new GraphWorkload;
    if (!strcmp(mode, "pool")) return new PoolWorkload;
    if (!strcmp(mode, "pinned")) return new PinnedWorkload;
    if (!strcmp(mode, "threads")) return new ThreadsWorkload;
    return NULL;
}

// ---- start-up ------------------------------------------------------------------------------------------

int main(int argc, char **argv) {
    program_name = "cuda-workload";
    if (argc < 2) {
        fprintf(stderr, "usage: cuda-workload buffers|streams|events|graph|vmm|pool|pinned|threads|tree|managed|ipc|share|share3|share-orphan|ipc-share|ipc-share-event --dir DIR [--daemon] [--mem MIB] [--count N]\n");
        return 2;
    }
    const char *mode = argv[1];
    int detach = 0;
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(arg, "--daemon")) { detach = 1; continue; }
        if (!value) { fprintf(stderr, "%s needs a value\n", arg); return 2; }
        if (!strcmp(arg, "--dir")) dir = value;
        else if (!strcmp(arg, "--mem")) mem_bytes = (size_t)strtoull(value, NULL, 10) << 20;
        else if (!strcmp(arg, "--count")) count = atoi(value);
        else { fprintf(stderr, "unknown option %s\n", arg); return 2; }
        i++;
    }
    if (mem_bytes < ((size_t)1 << 20)) mem_bytes = (size_t)1 << 20;
    if (count < 1 || count > MAX_LOOPS) { fprintf(stderr, "--count must be 1..%d\n", MAX_LOOPS); return 2; }
    // Decided before detaching, so that a bad mode is reported to the caller. Constructing touches no CUDA.
    bool forks = !strcmp(mode, "tree") || !strncmp(mode, "share", 5) || !strncmp(mode, "ipc-share", 9);
    Workload *workload = forks ? NULL : workload_for(mode);
    if (!forks && !workload) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }
    if (forks && strcmp(mode, "tree") && strcmp(mode, "share") && strcmp(mode, "share3") && strcmp(mode, "share-orphan") &&
        strcmp(mode, "ipc-share") && strcmp(mode, "ipc-share-event")) {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    char resolved[4096];
    if (!realpath(dir, resolved)) die(dir);
    dir = strdup(resolved);
    if (detach) daemonize();

    listen_for_verify_requests();

    share_legacy = !strncmp(mode, "ipc-share", 9);
    share_event = !strcmp(mode, "ipc-share-event");
    if (!strcmp(mode, "share") || share_legacy) run_share(2);
    if (!strcmp(mode, "share3")) run_share(3);
    if (!strcmp(mode, "share-orphan")) run_share_orphan();
    if (!workload) run_tree();
    serve(*workload, "ready", "result", 0);
}
