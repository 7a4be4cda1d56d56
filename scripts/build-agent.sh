#!/usr/bin/env bash
# Builds the in-process agent, libstasis-agent.so, with the C compiler alone: a SwiftPM library product would
# link the Swift runtime into every program `stasis run` starts (and the GPU machine has no Swift runtime).
# The library is replaced by a rename, and only when it changed: running programs map it, and CRIU restores
# them only onto the very file they mapped (same size and build id).
#   scripts/build-agent.sh [OUTPUT_DIR]     (default: .build/agent)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/agent}
mkdir -p "$out"
fresh=$(mktemp "$out/.libstasis-agent.so.XXXXXX")
trap 'rm -f "$fresh"' EXIT
# -z nodelete: the library registers a thread-exit destructor (the gate's per-thread counters) and atexit
# handlers, so a dlclose (the tests dlopen it for its self-test) must never unmap it.
cc -shared -fPIC -O2 -Wall -Wextra -g -Wl,-z,nodelete \
    -ISources/CStasisAgentProtocol/include -ISources/StasisAgent \
    -o "$fresh" Sources/StasisAgent/*.c Sources/StasisAgent/*.S -ldl -lpthread
chmod 755 "$fresh"
cmp -s "$fresh" "$out/libstasis-agent.so" || mv -f "$fresh" "$out/libstasis-agent.so"
echo "$out/libstasis-agent.so"
