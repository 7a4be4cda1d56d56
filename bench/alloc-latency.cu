// Allocation latency: cudaMalloc + cudaFree of a few sizes, the median of many, in microseconds. Run bare and
// under `stasis run` (whose agent backs allocations of 2 MiB and more with the VMM API) to compare.
//   nvcc -O2 -o alloc-latency bench/alloc-latency.cu && ./alloc-latency
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

int main() {
    const size_t sizes[] = {4u << 10, 1u << 20, 2u << 20, 64u << 20, 1u << 30};
    cudaFree(0);  // the context, outside the timing
    for (size_t size : sizes) {
        int rounds = size >= (1u << 30) ? 20 : 200;
        std::vector<double> malloc_us, free_us;
        for (int i = 0; i < rounds; i++) {
            void *p = nullptr;
            auto a = std::chrono::steady_clock::now();
            if (cudaMalloc(&p, size) != cudaSuccess) { std::printf("cudaMalloc of %zu failed\n", size); return 1; }
            auto b = std::chrono::steady_clock::now();
            cudaFree(p);
            auto c = std::chrono::steady_clock::now();
            malloc_us.push_back(std::chrono::duration<double, std::micro>(b - a).count());
            free_us.push_back(std::chrono::duration<double, std::micro>(c - b).count());
        }
        std::sort(malloc_us.begin(), malloc_us.end());
        std::sort(free_us.begin(), free_us.end());
        std::printf("%zu\t%.1f\t%.1f\n", size, malloc_us[rounds / 2], free_us[rounds / 2]);
    }
    return 0;
}
