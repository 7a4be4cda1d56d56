// Which driver entry points the program gets. The agent's own implementations replace the allocation and
// VMM functions (so it knows, and can re-create, every byte of device memory it evacuates) and cuInit (to
// start its control channel); every other libcuda function is handed out behind the gate. A program reaches
// the driver three ways, and each is covered: symbols it links against (exported here), dlsym on libcuda
// (the exported dlsym below), and cuGetProcAddress (how the CUDA runtime, and through it PyTorch, gets them).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <string.h>

#include "agent.h"

static int active(void) { return settings.enabled && driver_load() == 0; }

// ---- the agent's implementations, exported under the driver's names

CUresult cuInit(unsigned int flags) {
    if (driver_load() != 0 && !real.cuInit) return CUDA_ERROR_NOT_INITIALIZED;
    CUresult result = real.cuInit(flags);
    if (result == CUDA_SUCCESS && active()) control_start();
    return result;
}

#define GATED(call)                 \
    do {                            \
        gate_enter();               \
        CUresult result_ = (call);  \
        gate_leave();               \
        return result_;             \
    } while (0)

// Without the agent (STASIS_AGENT=off, or a driver lacking what it needs) each goes straight to the driver.
#define PASS(name, ...) \
    if (!active()) return real.name ? real.name(__VA_ARGS__) : CUDA_ERROR_NOT_INITIALIZED

CUresult cuMemAlloc_v2(CUdeviceptr *pointer, size_t bytes) {
    PASS(cuMemAlloc_v2, pointer, bytes);
    GATED(memory_alloc(pointer, bytes));
}

CUresult cuMemFree_v2(CUdeviceptr pointer) {
    PASS(cuMemFree_v2, pointer);
    GATED(memory_free(pointer));
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const cu_mem_allocation_prop *prop, unsigned long long flags) {
    PASS(cuMemCreate, handle, size, prop, flags);
    GATED(memory_create(handle, size, prop, flags));
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    PASS(cuMemRelease, handle);
    GATED(memory_release(handle));
}

CUresult cuMemMap(CUdeviceptr pointer, size_t size, size_t offset, CUmemGenericAllocationHandle handle, unsigned long long flags) {
    PASS(cuMemMap, pointer, size, offset, handle, flags);
    GATED(memory_map(pointer, size, offset, handle, flags));
}

CUresult cuMemUnmap(CUdeviceptr pointer, size_t size) {
    PASS(cuMemUnmap, pointer, size);
    GATED(memory_unmap(pointer, size));
}

CUresult cuMemSetAccess(CUdeviceptr pointer, size_t size, const cu_mem_access_desc *desc, size_t count) {
    PASS(cuMemSetAccess, pointer, size, desc, count);
    GATED(memory_set_access(pointer, size, desc, count));
}

CUresult cuMemGetAllocationPropertiesFromHandle(cu_mem_allocation_prop *prop, CUmemGenericAllocationHandle handle) {
    PASS(cuMemGetAllocationPropertiesFromHandle, prop, handle);
    GATED(memory_properties(prop, handle));
}

CUresult cuMemRetainAllocationHandle(CUmemGenericAllocationHandle *handle, void *address) {
    PASS(cuMemRetainAllocationHandle, handle, address);
    GATED(memory_retain(handle, address));
}

CUresult cuMemExportToShareableHandle(void *shareable, CUmemGenericAllocationHandle handle, int type, unsigned long long flags) {
    PASS(cuMemExportToShareableHandle, shareable, handle, type, flags);
    GATED(memory_export(shareable, handle, type, flags));
}

CUresult cuMemImportFromShareableHandle(CUmemGenericAllocationHandle *handle, void *os_handle, int type) {
    PASS(cuMemImportFromShareableHandle, handle, os_handle, type);
    GATED(memory_import(handle, os_handle, type));
}

CUresult cuMulticastBindMem(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset, CUmemGenericAllocationHandle handle,
                            size_t offset, size_t size, unsigned long long flags) {
    PASS(cuMulticastBindMem, group, device, group_offset, handle, offset, size, flags);
    GATED(memory_multicast_bind(group, device, group_offset, handle, offset, size, flags));
}

CUresult cuMulticastBindAddr(CUmemGenericAllocationHandle group, CUdevice device, size_t group_offset, CUdeviceptr address, size_t size,
                             unsigned long long flags) {
    PASS(cuMulticastBindAddr, group, device, group_offset, address, size, flags);
    GATED(memory_multicast_bind_address(group, device, group_offset, address, size, flags));
}

CUresult cuIpcGetMemHandle(cu_ipc_mem_handle *handle, CUdeviceptr pointer) {
    PASS(cuIpcGetMemHandle, handle, pointer);
    GATED(ipc_get_mem_handle(handle, pointer));
}

CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pointer, cu_ipc_mem_handle handle, unsigned int flags) {
    PASS(cuIpcOpenMemHandle_v2, pointer, handle, flags);
    GATED(ipc_open_mem_handle(pointer, handle, flags));
}

CUresult cuIpcCloseMemHandle(CUdeviceptr pointer) {
    PASS(cuIpcCloseMemHandle, pointer);
    GATED(ipc_close_mem_handle(pointer));
}

CUresult cuCtxDestroy_v2(CUcontext context) {
    PASS(cuCtxDestroy_v2, context);
    gate_enter();
    memory_context_destroyed(context);
    CUresult result = real.cuCtxDestroy_v2(context);
    gate_leave();
    return result;
}

CUresult cuGetProcAddress(const char *symbol, void **function, int version, uint64_t flags) {
    if (driver_load() != 0 && !real.cuGetProcAddress) return CUDA_ERROR_NOT_INITIALIZED;
    CUresult result = real.cuGetProcAddress(symbol, function, version, flags);
    if (result == CUDA_SUCCESS && function && *function && active()) {
        void *ours = interpose(symbol, *function, version);
        if (ours) *function = ours;
    }
    return result;
}

CUresult cuGetProcAddress_v2(const char *symbol, void **function, int version, uint64_t flags, int *status) {
    if (driver_load() != 0 && !real.cuGetProcAddress_v2) return CUDA_ERROR_NOT_INITIALIZED;
    CUresult result = real.cuGetProcAddress_v2(symbol, function, version, flags, status);
    if (result == CUDA_SUCCESS && function && *function && active()) {
        void *ours = interpose(symbol, *function, version);
        if (ours) *function = ours;
    }
    return result;
}

// ---- the table: a driver function, found by its address or by its name, and what replaces it

typedef struct {
    const char *name;         // as cuGetProcAddress is asked for it
    const char *symbol;       // as libcuda exports this ABI
    int since;                // the first CUDA version whose cuGetProcAddress gives this ABI
    void *const *real;        // where driver.c keeps the real one
    void *ours;
} replacement;

#define REPLACE(name_, symbol_, since_) {#name_, #symbol_, since_, (void *const *)&real.symbol_, (void *)symbol_}

static const replacement replacements[] = {
    REPLACE(cuInit, cuInit, 0),
    REPLACE(cuGetProcAddress, cuGetProcAddress, 0),
    REPLACE(cuGetProcAddress, cuGetProcAddress_v2, 12000),
    REPLACE(cuMemAlloc, cuMemAlloc_v2, 3020),
    REPLACE(cuMemFree, cuMemFree_v2, 3020),
    REPLACE(cuMemCreate, cuMemCreate, 0),
    REPLACE(cuMemRelease, cuMemRelease, 0),
    REPLACE(cuMemMap, cuMemMap, 0),
    REPLACE(cuMemUnmap, cuMemUnmap, 0),
    REPLACE(cuMemSetAccess, cuMemSetAccess, 0),
    REPLACE(cuMemGetAllocationPropertiesFromHandle, cuMemGetAllocationPropertiesFromHandle, 0),
    REPLACE(cuMemRetainAllocationHandle, cuMemRetainAllocationHandle, 0),
    REPLACE(cuMemExportToShareableHandle, cuMemExportToShareableHandle, 0),
    REPLACE(cuMemImportFromShareableHandle, cuMemImportFromShareableHandle, 0),
    REPLACE(cuMulticastBindMem, cuMulticastBindMem, 0),
    REPLACE(cuMulticastBindAddr, cuMulticastBindAddr, 0),
    REPLACE(cuCtxDestroy, cuCtxDestroy_v2, 4000),
    REPLACE(cuIpcGetMemHandle, cuIpcGetMemHandle, 0),
    REPLACE(cuIpcOpenMemHandle, cuIpcOpenMemHandle_v2, 11000),
    REPLACE(cuIpcCloseMemHandle, cuIpcCloseMemHandle, 0),
};

#define COUNT (sizeof replacements / sizeof replacements[0])

HIDDEN void *interpose(const char *name, void *real_pointer, int version) {
    if (!name || !real_pointer) return NULL;
    counters.lookups++;
    // By address first: whatever name or version the program asked for, this is the driver's function.
    for (size_t i = 0; i < COUNT; i++) {
        if (*replacements[i].real == real_pointer) return replacements[i].ours;
    }
    // By name: a driver may hand out another address for the same function through cuGetProcAddress.
    for (size_t i = 0; i < COUNT; i++) {
        const replacement *r = &replacements[i];
        if (version < 0) {
            if (!strcmp(name, r->symbol)) return r->ours;
            continue;
        }
        if (strcmp(name, r->name) || version < r->since) continue;
        // The newest ABI this version gets (the table lists them oldest first).
        const replacement *best = r;
        for (size_t j = i + 1; j < COUNT; j++) {
            if (!strcmp(name, replacements[j].name) && version >= replacements[j].since) best = &replacements[j];
        }
        return best->ours;
    }
    return gate_wrap(real_pointer);
}

// ---- dlsym on libcuda

HIDDEN void *stasis_dlsym_hook(void *handle, const char *name) {
    void *found = real_dlsym(handle, name);
    if (!found || !name || name[0] != 'c' || name[1] != 'u' || !settings.enabled) return found;
    if (driver_load() != 0) return found;
    // Only libcuda's functions: not another library's cu* symbol, nor a data symbol of libcuda's.
    Dl_info info;
    const ElfW(Sym) *symbol = NULL;
    if (!dladdr1(found, &info, (void **)&symbol, RTLD_DL_SYMENT) || !info.dli_fname || !strstr(info.dli_fname, "libcuda.so")) return found;
    if (symbol && ELF64_ST_TYPE(symbol->st_info) != STT_FUNC && ELF64_ST_TYPE(symbol->st_info) != STT_GNU_IFUNC) return found;
    void *ours = interpose(name, found, -1);
    return ours ? ours : found;
}
