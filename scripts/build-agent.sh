#!/usr/bin/env bash
# Builds the in-process agent, libstasis-agent.so, with the C compiler alone: a SwiftPM library product would
# link the Swift runtime into every program `stasis run` starts (and the GPU machine has no Swift runtime).
#   scripts/build-agent.sh [OUTPUT_DIR]     (default: .build/agent)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/agent}
mkdir -p "$out"
cc -shared -fPIC -O2 -Wall -Wextra -g \
    -ISources/CStasisAgentProtocol/include -ISources/StasisAgent \
    -o "$out/libstasis-agent.so" Sources/StasisAgent/*.c Sources/StasisAgent/*.S -ldl -lpthread
echo "$out/libstasis-agent.so"
