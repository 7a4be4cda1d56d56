#!/usr/bin/env bash
# Builds the CRIU plugin, libstasis_cuda_plugin.so, with the C compiler alone: a SwiftPM library product
# would link the Swift runtime into it, which CRIU's process (and a GPU machine without Swift) lacks.
#   scripts/build-criu-plugin.sh [OUTPUT_DIR]     (default: .build/criu-plugins)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/criu-plugins}
mkdir -p "$out"
cc -shared -fPIC -O2 -Wall -Wextra -fvisibility=hidden \
    -ISources/CStasisCUDA/include -ISources/StasisCRIUPlugin/include \
    -o "$out/libstasis_cuda_plugin.so" Sources/StasisCRIUPlugin/plugin.c Sources/CStasisCUDA/cuda_steps.c -lpthread
echo "$out/libstasis_cuda_plugin.so"
