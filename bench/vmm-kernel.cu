// Does a kernel run slower on VMM-backed memory (cuMemCreate + cuMemMap, what the agent backs cudaMalloc
// with) than on the driver's own cudaMalloc memory? One process, both kinds at once, the same kernels taking
// turns, timed by CUDA events: the median of each, in milliseconds. Run it without the agent, so that
// cudaMalloc is the driver's. Two kernels: a streaming copy (bandwidth) and a scattered gather over 2 GiB
// (TLB reach).
//   nvcc -O2 -o vmm-kernel bench/vmm-kernel.cu -lcuda && ./vmm-kernel
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#define CHECK(call)                                                              \
    do {                                                                         \
        if ((call) != 0) { std::printf("failed: %s\n", #call); return 1; }      \
    } while (0)

__global__ void stream(const float *in, float *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) out[i] = in[i] * 1.0001f;
}

__global__ void gather(const float *in, float *out, size_t n, size_t reads) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= reads) return;
    // A scattered index per thread (Knuth's multiplicative hash): every 2 MiB page is touched.
    size_t j = (i * 2654435761ull) % n;
    out[i % (n / 2)] = in[j];
}

static float timed(void (*launch)(float *, float *, size_t), float *a, float *b, size_t n, cudaEvent_t start, cudaEvent_t stop) {
    cudaEventRecord(start);
    launch(a, b, n);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return ms;
}

static void launch_stream(float *a, float *b, size_t n) { stream<<<1056, 256>>>(a, b, n / 2); }
static void launch_gather(float *a, float *b, size_t n) { gather<<<(16u << 20) / 256, 256>>>(a, b, n, 16u << 20); }

int main() {
    const size_t bytes = 2ull << 30, n = bytes / sizeof(float);
    CHECK(cudaFree(0));
    float *driver = nullptr;
    CHECK(cudaMalloc(&driver, bytes));
    CUdevice device;
    CHECK(cuCtxGetDevice(&device));
    CUmemAllocationProp prop = {};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device;
    CUmemGenericAllocationHandle handle;
    CUdeviceptr address;
    CHECK(cuMemCreate(&handle, bytes, &prop, 0));
    CHECK(cuMemAddressReserve(&address, bytes, 0, 0, 0));
    CHECK(cuMemMap(address, bytes, 0, handle, 0));
    CUmemAccessDesc access = {};
    access.location = prop.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    CHECK(cuMemSetAccess(address, bytes, &access, 1));
    float *vmm = (float *)address;
    CHECK(cudaMemset(driver, 1, bytes));
    CHECK(cudaMemset(vmm, 1, bytes));
    cudaEvent_t start, stop;
    cudaEventCreate(&start);
    cudaEventCreate(&stop);
    struct Kernel { const char *name; void (*launch)(float *, float *, size_t); } kernels[] = {{"stream 1 GiB", launch_stream}, {"gather 16M over 2 GiB", launch_gather}};
    for (auto &kernel : kernels) {
        std::vector<float> on_driver, on_vmm;
        for (int round = 0; round < 3; round++) { timed(kernel.launch, driver, driver + n / 2, n, start, stop); timed(kernel.launch, vmm, vmm + n / 2, n, start, stop); }
        for (int round = 0; round < 60; round++) {
            on_driver.push_back(timed(kernel.launch, driver, driver + n / 2, n, start, stop));
            on_vmm.push_back(timed(kernel.launch, vmm, vmm + n / 2, n, start, stop));
        }
        std::sort(on_driver.begin(), on_driver.end());
        std::sort(on_vmm.begin(), on_vmm.end());
        float d = on_driver[30], v = on_vmm[30];
        std::printf("| %s, median of 60 (ms) | %.4f | %.4f | %.4f |\n", kernel.name, d, v, v / d);
    }
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
