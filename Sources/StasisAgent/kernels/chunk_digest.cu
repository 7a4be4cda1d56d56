// The SHA-256 of each chunk of device memory, computed on the GPU, one thread a chunk: stasis then stores
// the chunks under these digests without hashing them on its CPUs, and checks a refill by the same digests
// of what landed in the device. A 2 MiB chunk takes one thread some tens of milliseconds, and every chunk of
// an evacuation is hashed at once, so the GPU's time is about that of one chunk.
//
// Built by scripts/gen-chunk-digest.sh with NVRTC into PTX and cubins, which the agent embeds
// (chunk_digest_kernel.h) and loads with cuModuleLoadData. The same script compiles this file as host C++
// and checks it against sha256sum, so the code below is plain enough for both compilers.

#if defined(__CUDACC__)
#define STASIS_DEVICE __device__ __forceinline__
#define STASIS_CONSTANT __constant__
typedef unsigned int u32;
typedef unsigned long long u64;
// Byte-swapped 32-bit word: SHA-256 reads its words big-endian.
#define STASIS_SWAP(x) __byte_perm((x), 0, 0x0123)
static STASIS_DEVICE uint4 stasis_load16(const uint4 *p) { return __ldg(p); }
static STASIS_DEVICE unsigned char stasis_load8(const unsigned char *p) { return __ldg(p); }
#else
#include <stdint.h>
#include <string.h>
#define STASIS_DEVICE static inline
#define STASIS_CONSTANT static const
#define __global__
typedef uint32_t u32;
typedef uint64_t u64;
struct uint4 { u32 x, y, z, w; };
#define STASIS_SWAP(x) __builtin_bswap32(x)
STASIS_DEVICE uint4 stasis_load16(const uint4 *p) { uint4 v; memcpy(&v, p, sizeof v); return v; }
STASIS_DEVICE unsigned char stasis_load8(const unsigned char *p) { return *p; }
#endif

// What to hash: `length` bytes at device address `address` (16-byte aligned).
struct stasis_chunk_job {
    u64 address;
    u64 length;
};

// The digest's 32 bytes in SHA-256's order, and whether every byte was zero.
struct stasis_chunk_result {
    u32 digest[8];
    u32 zero;
    u32 reserved;
};

STASIS_CONSTANT u32 stasis_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define STASIS_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

// One block of SHA-256's compression into `h`; `w` holds the block's 16 words and is used up.
STASIS_DEVICE void stasis_compress(u32 *h, u32 *w) {
    u32 a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < 64; i++) {
        if (i >= 16) {
            u32 w1 = w[(i + 1) & 15], w14 = w[(i + 14) & 15];
            u32 s0 = STASIS_ROTR(w1, 7) ^ STASIS_ROTR(w1, 18) ^ (w1 >> 3);
            u32 s1 = STASIS_ROTR(w14, 17) ^ STASIS_ROTR(w14, 19) ^ (w14 >> 10);
            w[i & 15] += s0 + w[(i + 9) & 15] + s1;
        }
        u32 t1 = hh + (STASIS_ROTR(e, 6) ^ STASIS_ROTR(e, 11) ^ STASIS_ROTR(e, 25)) + ((e & f) ^ (~e & g)) + stasis_k[i] + w[i & 15];
        u32 t2 = (STASIS_ROTR(a, 2) ^ STASIS_ROTR(a, 13) ^ STASIS_ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += hh;
}

STASIS_DEVICE void stasis_words(u32 *w, uint4 q0, uint4 q1, uint4 q2, uint4 q3, u32 *seen) {
    w[0] = STASIS_SWAP(q0.x); w[1] = STASIS_SWAP(q0.y); w[2] = STASIS_SWAP(q0.z); w[3] = STASIS_SWAP(q0.w);
    w[4] = STASIS_SWAP(q1.x); w[5] = STASIS_SWAP(q1.y); w[6] = STASIS_SWAP(q1.z); w[7] = STASIS_SWAP(q1.w);
    w[8] = STASIS_SWAP(q2.x); w[9] = STASIS_SWAP(q2.y); w[10] = STASIS_SWAP(q2.z); w[11] = STASIS_SWAP(q2.w);
    w[12] = STASIS_SWAP(q3.x); w[13] = STASIS_SWAP(q3.y); w[14] = STASIS_SWAP(q3.z); w[15] = STASIS_SWAP(q3.w);
    *seen |= q0.x | q0.y | q0.z | q0.w | q1.x | q1.y | q1.z | q1.w | q2.x | q2.y | q2.z | q2.w | q3.x | q3.y | q3.z | q3.w;
}

// Word `index` (0-15) of padded block `block` past the message's whole blocks: the message's last bytes, the
// 0x80 that ends it, zeros, and in the last block the length in bits.
STASIS_DEVICE u32 stasis_tail_word(const unsigned char *bytes, u64 length, u64 block, u64 blocks, int index, u32 *seen) {
    if (block + 1 == blocks && index >= 14) return index == 14 ? (u32)((length * 8) >> 32) : (u32)(length * 8);
    u32 word = 0;
    for (int i = 0; i < 4; i++) {
        u64 position = block * 64 + (u64)(index * 4 + i);
        u32 byte = position < length ? stasis_load8(bytes + position) : position == length ? 0x80u : 0;
        if (position < length) *seen |= byte;
        word |= byte << (24 - 8 * i);
    }
    return word;
}

// The SHA-256 of `length` bytes at `bytes` (16-byte aligned) into `result`. One loop over the padded message,
// so that the 64 unrolled rounds exist once in the code.
STASIS_DEVICE void stasis_digest(const unsigned char *bytes, u64 length, struct stasis_chunk_result *result) {
    u32 h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    u32 w[16];
    u32 seen = 0;
    const uint4 *data = (const uint4 *)bytes;
    u64 full = length / 64, blocks = (length + 8) / 64 + 1;
    // The next whole block is loaded before this one is compressed, so that its memory latency hides behind the rounds.
    uint4 n0 = {0, 0, 0, 0}, n1 = n0, n2 = n0, n3 = n0;
    if (full > 0) {
        n0 = stasis_load16(data);
        n1 = stasis_load16(data + 1);
        n2 = stasis_load16(data + 2);
        n3 = stasis_load16(data + 3);
    }
    for (u64 block = 0; block < blocks; block++) {
        if (block < full) {
            uint4 q0 = n0, q1 = n1, q2 = n2, q3 = n3;
            if (block + 1 < full) {
                const uint4 *next = data + (block + 1) * 4;
                n0 = stasis_load16(next);
                n1 = stasis_load16(next + 1);
                n2 = stasis_load16(next + 2);
                n3 = stasis_load16(next + 3);
            }
            stasis_words(w, q0, q1, q2, q3, &seen);
        } else {
            for (int i = 0; i < 16; i++) w[i] = stasis_tail_word(bytes, length, block, blocks, i, &seen);
        }
        stasis_compress(h, w);
    }
    for (int i = 0; i < 8; i++) result->digest[i] = STASIS_SWAP(h[i]);
    result->zero = seen == 0;
    result->reserved = 0;
}

// Thread i hashes jobs[i] into results[i]; both arrays live in pinned host memory mapped into the device.
extern "C" __global__ void stasis_chunk_digests(const struct stasis_chunk_job *jobs, struct stasis_chunk_result *results, u32 count) {
#if defined(__CUDACC__)
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    struct stasis_chunk_job job = jobs[i];
    struct stasis_chunk_result result;
    stasis_digest((const unsigned char *)job.address, job.length, &result);
    results[i] = result;
#else
    for (u32 i = 0; i < count; i++) stasis_digest((const unsigned char *)(uintptr_t)jobs[i].address, jobs[i].length, &results[i]);
#endif
}
