// The few CUDA driver API types and entry points the agent calls, declared here from the CUDA driver API
// reference (cuda.h of CUDA 13.0), so that the agent builds without CUDA's headers.
#ifndef STASIS_AGENT_CUDA_ABI_H
#define STASIS_AGENT_CUDA_ABI_H

#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUstream_st *CUstream;
typedef struct CUevent_st *CUevent;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_TIMEOUT = 909,
};

// CUmemLocation, CUmemAllocationProp, CUmemAccessDesc.
typedef struct {
    int type;  // CU_MEM_LOCATION_TYPE_DEVICE = 1
    int id;
} cu_mem_location;

typedef struct {
    int type;                  // CU_MEM_ALLOCATION_TYPE_PINNED = 1
    int requested_handle_types;
    cu_mem_location location;
    void *win32_metadata;
    struct {
        unsigned char compression_type;
        unsigned char gpu_direct_rdma_capable;
        unsigned short usage;
        unsigned char reserved[4];
    } alloc_flags;
} cu_mem_allocation_prop;

typedef struct {
    cu_mem_location location;
    int flags;  // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
} cu_mem_access_desc;

/// CUipcMemHandle: 64 opaque bytes, passed by value.
typedef struct {
    char reserved[64];
} cu_ipc_mem_handle;

_Static_assert(sizeof(cu_mem_allocation_prop) == 32, "CUmemAllocationProp is 32 bytes");
_Static_assert(sizeof(cu_mem_access_desc) == 12, "CUmemAccessDesc is 12 bytes");

#define CU_MEM_LOCATION_TYPE_DEVICE 1
#define CU_MEM_ALLOCATION_TYPE_PINNED 1
#define CU_MEM_ACCESS_FLAGS_PROT_READWRITE 3
// CUmemAllocationHandleType: the shareable handles of cuMemExportToShareableHandle.
#define CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR 1
#define CU_MEM_HANDLE_TYPE_FABRIC 8
#define CU_MEM_ALLOC_GRANULARITY_RECOMMENDED 1
#define CU_MEMHOSTALLOC_PORTABLE 1
#define CU_MEMHOSTREGISTER_PORTABLE 1
#define CU_STREAM_NON_BLOCKING 1
#define CU_EVENT_DISABLE_TIMING 2

// The driver functions the agent calls itself, resolved from libcuda.so.1 (never through its own wrappers).
typedef struct {
    CUresult (*cuInit)(unsigned int);
    CUresult (*cuGetProcAddress)(const char *, void **, int, uint64_t);
    CUresult (*cuGetProcAddress_v2)(const char *, void **, int, uint64_t, int *);
    CUresult (*cuMemAlloc_v2)(CUdeviceptr *, size_t);
    CUresult (*cuMemFree_v2)(CUdeviceptr);
    CUresult (*cuMemCreate)(CUmemGenericAllocationHandle *, size_t, const cu_mem_allocation_prop *, unsigned long long);
    CUresult (*cuMemRelease)(CUmemGenericAllocationHandle);
    CUresult (*cuMemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*cuMemUnmap)(CUdeviceptr, size_t);
    CUresult (*cuMemSetAccess)(CUdeviceptr, size_t, const cu_mem_access_desc *, size_t);
    CUresult (*cuMemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*cuMemAddressFree)(CUdeviceptr, size_t);
    CUresult (*cuMemGetAllocationGranularity)(size_t *, const cu_mem_allocation_prop *, int);
    CUresult (*cuMemGetAllocationPropertiesFromHandle)(cu_mem_allocation_prop *, CUmemGenericAllocationHandle);
    CUresult (*cuMemRetainAllocationHandle)(CUmemGenericAllocationHandle *, void *);
    CUresult (*cuMemExportToShareableHandle)(void *, CUmemGenericAllocationHandle, int, unsigned long long);
    CUresult (*cuMemImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, int);
    CUresult (*cuCtxGetCurrent)(CUcontext *);
    CUresult (*cuCtxSetCurrent)(CUcontext);
    CUresult (*cuCtxGetDevice)(CUdevice *);
    CUresult (*cuCtxSynchronize)(void);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceCanAccessPeer)(int *, CUdevice, CUdevice);
    CUresult (*cuStreamCreate)(CUstream *, unsigned int);
    CUresult (*cuStreamSynchronize)(CUstream);
    CUresult (*cuEventCreate)(CUevent *, unsigned int);
    CUresult (*cuEventRecord)(CUevent, CUstream);
    CUresult (*cuEventQuery)(CUevent);
    CUresult (*cuEventSynchronize)(CUevent);
    CUresult (*cuMemcpyDtoHAsync_v2)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*cuMemcpyHtoDAsync_v2)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*cuMemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*cuMemHostAlloc)(void **, size_t, unsigned int);
    // The staging ring as a memfd mapping the agent pins itself (ring.c).
    CUresult (*cuMemHostRegister_v2)(void *, size_t, unsigned int);
    CUresult (*cuMemHostUnregister)(void *);
    CUresult (*cuGetErrorName)(CUresult, const char **);
    // Optional (drivers of CUDA 12.1 and later): binds VMM memory to a multicast object (NVLink SHARP).
    CUresult (*cuMulticastBindMem)(CUmemGenericAllocationHandle, CUdevice, size_t, CUmemGenericAllocationHandle, size_t, size_t,
                                   unsigned long long);
    CUresult (*cuMulticastBindAddr)(CUmemGenericAllocationHandle, CUdevice, size_t, CUdeviceptr, size_t, unsigned long long);
    CUresult (*cuCtxDestroy_v2)(CUcontext);
    // The GPU's chunk digests (digest.c).
    CUresult (*cuDeviceGetAttribute)(int *, int, CUdevice);
    CUresult (*cuMemHostGetDevicePointer_v2)(CUdeviceptr *, void *, unsigned int);
    CUresult (*cuModuleLoadData)(CUmodule *, const void *);
    CUresult (*cuModuleGetFunction)(CUfunction *, CUmodule, const char *);
    // Legacy CUDA IPC (ipc.c serves it for the memory the agent backs).
    CUresult (*cuIpcGetMemHandle)(cu_ipc_mem_handle *, CUdeviceptr);
    CUresult (*cuIpcOpenMemHandle_v2)(CUdeviceptr *, cu_ipc_mem_handle, unsigned int);
    CUresult (*cuIpcCloseMemHandle)(CUdeviceptr);
    CUresult (*cuLaunchKernel)(CUfunction, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int, unsigned int,
                               unsigned int, CUstream, void **, void **);
} cuda_driver;

#endif
