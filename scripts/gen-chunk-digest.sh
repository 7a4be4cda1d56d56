#!/usr/bin/env bash
# Regenerates Sources/StasisAgent/chunk_digest_kernel.h from Sources/StasisAgent/kernels/chunk_digest.cu:
# PTX (JIT-compiled by any driver of the GPU's architecture or newer) and cubins for the architectures we
# run on, compiled by NVRTC on this CPU (no GPU and no CUDA toolkit needed: NVRTC comes as a Python wheel).
# Before that, the kernel's code is compiled as host C++ and checked against sha256sum.
# Run it after changing the kernel, and commit the header; builds never run it.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=Sources/StasisAgent/kernels/chunk_digest.cu
header=Sources/StasisAgent/chunk_digest_kernel.h
work=.build/chunk-digest
mkdir -p "$work"

# 1. The algorithm, on the CPU, against sha256sum: lengths around the block and padding edges, a chunk, zeros.
cat >"$work/check.cpp" <<'EOF'
#include "chunk_digest.cu"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    for (int a = 1; a < argc; a++) {
        FILE *file = fopen(argv[a], "rb");
        if (!file) return 2;
        fseek(file, 0, SEEK_END);
        long size = ftell(file);
        fseek(file, 0, SEEK_SET);
        unsigned char *bytes = (unsigned char *)aligned_alloc(16, (size_t)size + 16);
        if (size && fread(bytes, 1, (size_t)size, file) != (size_t)size) return 2;
        fclose(file);
        stasis_chunk_job job = {(u64)(uintptr_t)bytes, (u64)size};
        stasis_chunk_result result;
        stasis_chunk_digests(&job, &result, 1);
        const unsigned char *digest = (const unsigned char *)result.digest;
        for (int i = 0; i < 32; i++) printf("%02x", digest[i]);
        printf("  %s%s\n", argv[a], result.zero ? " zero" : "");
        free(bytes);
    }
    return 0;
}
EOF
g++ -O2 -std=c++17 -I "$(dirname "$kernel")" -x c++ "$work/check.cpp" -o "$work/check"
samples=()
for length in 0 1 3 55 56 57 63 64 65 119 120 127 128 1000 65536 2097152 2097169; do
    head -c "$length" /dev/urandom >"$work/sample-$length"
    samples+=("$work/sample-$length")
done
head -c 2097152 /dev/zero >"$work/sample-zeros"
samples+=("$work/sample-zeros")
"$work/check" "${samples[@]}" | sed 's/ zero$//' >"$work/ours.txt"
sha256sum "${samples[@]}" >"$work/theirs.txt"
if ! diff -u "$work/theirs.txt" "$work/ours.txt"; then
    echo "gen-chunk-digest: the kernel's SHA-256 differs from sha256sum" >&2
    exit 1
fi
"$work/check" "$work/sample-zeros" | grep -q ' zero$' || { echo "gen-chunk-digest: zeros not flagged" >&2; exit 1; }
"$work/check" "$work/sample-1000" | grep -q ' zero$' && { echo "gen-chunk-digest: random bytes flagged as zeros" >&2; exit 1; }
echo "gen-chunk-digest: host check of ${#samples[@]} samples against sha256sum passed"

# 2. NVRTC, from the wheel unless NVRTC_LIB names libnvrtc.so.
nvrtc=${NVRTC_LIB:-}
if [ -z "$nvrtc" ]; then
    nvrtc=$(find "$work/nvrtc" -name 'libnvrtc.so.*' ! -name '*alt*' ! -name '*builtins*' 2>/dev/null | head -1 || true)
    if [ -z "$nvrtc" ]; then
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheel" 'nvidia-cuda-nvrtc-cu12==12.9.86'
        (cd "$work" && rm -rf nvrtc && mkdir nvrtc && cd nvrtc && python3 -m zipfile -e ../wheel/nvidia_cuda_nvrtc_cu12-*.whl .)
        nvrtc=$(find "$work/nvrtc" -name 'libnvrtc.so.*' ! -name '*alt*' ! -name '*builtins*' | head -1)
    fi
fi

python3 - "$nvrtc" "$kernel" "$header" <<'EOF'
import ctypes, sys
library, source_path, header_path = sys.argv[1:4]
nvrtc = ctypes.CDLL(library)
source = open(source_path, "rb").read()

def compile_for(architecture):
    program = ctypes.c_void_p()
    status = nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"chunk_digest.cu", 0, None, None)
    assert status == 0, status
    options = [b"--gpu-architecture=" + architecture.encode(), b"-default-device", b"--std=c++11"]
    array = (ctypes.c_char_p * len(options))(*options)
    status = nvrtc.nvrtcCompileProgram(program, len(options), array)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    if status != 0:
        sys.exit("NVRTC failed for %s:\n%s" % (architecture, log.value.decode()))
    if architecture.startswith("compute_"):
        nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(program, out)
    else:
        nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(program, out)
    return out.raw[:size.value]

version = (ctypes.c_int(), ctypes.c_int())
nvrtc.nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
ptx = compile_for("compute_70")
cubins = [(80, compile_for("sm_80")), (90, compile_for("sm_90"))]

def c_bytes(data):
    lines = []
    for start in range(0, len(data), 24):
        lines.append("    " + " ".join("0x%02x," % b for b in data[start:start + 24]))
    return "\n".join(lines)

with open(header_path, "w") as out:
    out.write("// Generated by scripts/gen-chunk-digest.sh from kernels/chunk_digest.cu with NVRTC %d.%d: do not edit.\n"
              % (version[0].value, version[1].value))
    out.write("// The kernel stasis_chunk_digests as cubins for the architectures listed (compute capability x10) and\n")
    out.write("// as PTX for the driver to compile for any other.\n")
    out.write("#ifndef STASIS_CHUNK_DIGEST_KERNEL_H\n#define STASIS_CHUNK_DIGEST_KERNEL_H\n\n")
    for arch, cubin in cubins:
        out.write("static const unsigned char chunk_digest_sm%d[] __attribute__((aligned(8))) = {\n%s\n};\n\n" % (arch, c_bytes(cubin)))
    out.write("static const struct { int architecture; const unsigned char *image; } chunk_digest_cubins[] = {\n")
    for arch, _ in cubins:
        out.write("    {%d, chunk_digest_sm%d},\n" % (arch, arch))
    out.write("};\n\n")
    text = ptx.rstrip(b"\0").decode()
    lines = "\n".join('    "%s\\n"' % line.replace("\\", "\\\\").replace('"', '\\"') for line in text.split("\n"))
    out.write("static const char chunk_digest_ptx[] =\n%s;\n\n" % lines)
    out.write("#endif\n")
print("gen-chunk-digest: wrote %s (PTX %d bytes, cubins %s)" % (header_path, len(ptx), ", ".join("sm_%d %d bytes" % (a, len(c)) for a, c in cubins)))
EOF
