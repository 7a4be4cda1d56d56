// Legacy CUDA IPC (cuIpcGetMemHandle / cuIpcOpenMemHandle / cuIpcCloseMemHandle) of memory the agent backs.
// The driver's IPC does not work on VMM memory, which is what the agent backs cudaMalloc with; and memory
// one process opened from another's is what the driver cannot restore. So the agents serve it themselves:
// the exporter's handle carries its PID, the allocation's id and the offset; the importer's agent asks the
// exporter's agent for the allocation's POSIX descriptor (STASIS_AGENT_IPC_FD on its control socket),
// imports it and maps it in an address range of its own. From then on it is memory shared through a POSIX
// descriptor, which checkpoints carry (see stasis_agent_protocol.h). Memory the agent does not back keeps
// the driver's IPC.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "agent.h"
#include "stasis_agent_protocol.h"

#define IPC_MAGIC "stasisIPC1"

typedef struct {
    char magic[16];
    int32_t pid;       // the exporter, as it sees itself (its agent's socket name)
    int32_t reserved;
    uint64_t id;       // the allocation, as the exporter's agent names it
    uint64_t offset;   // of the exported pointer in it
    uint64_t size;     // of the allocation
} ipc_handle;
_Static_assert(sizeof(ipc_handle) <= sizeof(cu_ipc_mem_handle), "the agent's IPC handle fits CUipcMemHandle");

// What this process opened, so that cuIpcCloseMemHandle can give it back.
#define MAX_OPENED 256
typedef struct {
    CUdeviceptr base;   // the range reserved for it
    CUdeviceptr pointer;  // what the program got (base + offset)
    size_t size;
} opened_range;
static opened_range opened[MAX_OPENED];
static int opened_count;
static pthread_mutex_t opened_lock = PTHREAD_MUTEX_INITIALIZER;

HIDDEN CUresult ipc_get_mem_handle(cu_ipc_mem_handle *handle, CUdeviceptr pointer) {
    uint64_t id = 0, offset = 0, size = 0;
    CUresult result = handle ? memory_ipc_export(pointer, &id, &offset, &size) : CUDA_ERROR_INVALID_VALUE;
    if (result == CUDA_ERROR_NOT_FOUND) return real.cuIpcGetMemHandle(handle, pointer);
    if (result != CUDA_SUCCESS) return result;
    ipc_handle ours;
    memset(&ours, 0, sizeof ours);
    memcpy(ours.magic, IPC_MAGIC, sizeof IPC_MAGIC);
    ours.pid = getpid();
    ours.id = id;
    ours.offset = offset;
    ours.size = size;
    memset(handle, 0, sizeof *handle);
    memcpy(handle, &ours, sizeof ours);
    return CUDA_SUCCESS;
}

/// Asks the agent of `pid` for allocation `id`'s descriptor; -1 when it cannot be had.
static int descriptor_from(int32_t pid, uint64_t id) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un address;
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    int length = snprintf(address.sun_path + 1, sizeof address.sun_path - 1, "%s%d", STASIS_AGENT_SOCKET_PREFIX, pid);
    struct timeval limit = {30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    stasis_agent_message message;
    memset(&message, 0, sizeof message);
    message.op = STASIS_AGENT_IPC_FD;
    message.id = id;
    int received = -1;
    if (connect(fd, (struct sockaddr *)&address, (socklen_t)(sizeof(sa_family_t) + 1 + (size_t)length)) == 0 &&
        message_send(fd, &message, -1) == 0) {
        if (message_receive(fd, &message, &received) != 0 || message.op != STASIS_AGENT_OK) {
            if (received >= 0) close(received);
            received = -1;
            agent_log("the agent of PID %d did not give allocation %#llx: %.*s", pid, (unsigned long long)id, (int)sizeof message.text, message.text);
        }
    }
    close(fd);
    return received;
}

HIDDEN CUresult ipc_open_mem_handle(CUdeviceptr *pointer, cu_ipc_mem_handle handle, unsigned int flags) {
    ipc_handle theirs;
    memcpy(&theirs, &handle, sizeof theirs);
    if (memcmp(theirs.magic, IPC_MAGIC, sizeof IPC_MAGIC) != 0) return real.cuIpcOpenMemHandle_v2(pointer, handle, flags);
    if (!pointer || theirs.offset >= theirs.size) return CUDA_ERROR_INVALID_VALUE;
    CUdevice device;
    CUresult result = real.cuCtxGetDevice(&device);
    if (result != CUDA_SUCCESS) return result;
    int fd = descriptor_from(theirs.pid, theirs.id);
    if (fd < 0) return CUDA_ERROR_INVALID_HANDLE;
    // Through the agent's own VMM calls: the import, the mapping and its rights are tracked as the
    // program's would be.
    CUmemGenericAllocationHandle imported = 0;
    CUdeviceptr base = 0;
    result = memory_import(&imported, (void *)(intptr_t)fd, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    close(fd);
    if (result != CUDA_SUCCESS) return result;
    int mapped = 0;
    result = real.cuMemAddressReserve(&base, theirs.size, 0, 0, 0);
    if (result == CUDA_SUCCESS) result = memory_map(base, theirs.size, 0, imported, 0);
    mapped = result == CUDA_SUCCESS;
    cu_mem_access_desc access = {{CU_MEM_LOCATION_TYPE_DEVICE, device}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    if (result == CUDA_SUCCESS) result = memory_set_access(base, theirs.size, &access, 1);
    pthread_mutex_lock(&opened_lock);
    if (result == CUDA_SUCCESS && opened_count == MAX_OPENED) result = CUDA_ERROR_OUT_OF_MEMORY;
    if (result == CUDA_SUCCESS) opened[opened_count++] = (opened_range){base, base + theirs.offset, theirs.size};
    pthread_mutex_unlock(&opened_lock);
    // The mapping holds the memory; the handle is not the program's to release.
    memory_release(imported);
    if (result != CUDA_SUCCESS) {
        if (mapped) memory_unmap(base, theirs.size);
        if (base) real.cuMemAddressFree(base, theirs.size);
        return result;
    }
    *pointer = base + theirs.offset;
    return CUDA_SUCCESS;
}

HIDDEN CUresult ipc_close_mem_handle(CUdeviceptr pointer) {
    pthread_mutex_lock(&opened_lock);
    for (int i = 0; i < opened_count; i++) {
        if (opened[i].pointer != pointer) continue;
        opened_range range = opened[i];
        opened[i] = opened[--opened_count];
        pthread_mutex_unlock(&opened_lock);
        // As the driver's close does: the memory is no longer used by this process once this returns.
        real.cuCtxSynchronize();
        CUresult result = memory_unmap(range.base, range.size);
        if (result == CUDA_SUCCESS) result = real.cuMemAddressFree(range.base, range.size);
        return result;
    }
    pthread_mutex_unlock(&opened_lock);
    return real.cuIpcCloseMemHandle(pointer);
}
