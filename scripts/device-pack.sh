#!/usr/bin/env bash
# Builds what a device run needs into .device/ (ignored by git, carried by the device tool): a stasis built
# with the Swift runtime linked in (the GPU machine has no Swift), xz-compressed to fit the carry limit; the
# C workloads; a CRIU 4.2 binary built here, with CRIU's own cuda plugin and NVIDIA's cuda-checkpoint (the
# benchmarks' baseline); and the CRIU library packages from ../shared/device/criu-debs.
set -euo pipefail
cd "$(dirname "$0")/.."
CRIU_UPSTREAM_CUDA_PLUGIN=1 ./scripts/install-criu.sh
./scripts/install-build-deps.sh
swift build -c release --static-swift-stdlib --scratch-path .build-static 2>&1 | tail -n 1
rm -rf .device && mkdir -p .device/criu-debs
strip -o .device/stasis .build-static/release/stasis
xz -T0 -3 -f .device/stasis
# The store bench only when asked for (STORE_BENCH=1): the carry is bounded (64 MiB).
if [[ ${STORE_BENCH:-} == 1 ]]; then
    strip -o .device/stasis-store-bench .build-static/release/stasis-store-bench
    xz -T0 -3 -f .device/stasis-store-bench
fi
strip -o .device/stasis-workload .build-static/release/stasis-workload
xz -T0 -3 -f .device/stasis-workload
./scripts/build-criu-plugin.sh .device/criu-plugins >/dev/null
./scripts/build-agent.sh .device >/dev/null
cp "$(command -v criu)" .device/criu
# The benchmarks' baseline: CRIU's own cuda plugin and NVIDIA's cuda-checkpoint, which it runs.
mkdir -p .device/criu-cuda-plugin && cp /usr/local/lib/criu/cuda_plugin.so .device/criu-cuda-plugin/
cp ../shared/device/cuda-checkpoint/cuda-checkpoint .device/
cp ../shared/device/criu-debs/*.deb .device/criu-debs/
# runc for the container section (Debian's, with the libseccomp it links), unpacked there with dpkg -x.
mkdir -p .device/runc-debs && (cd .device/runc-debs && apt-get download runc libseccomp2 >/dev/null 2>&1)
# ip (iproute2) and the libraries it links beyond libc, for the migrate section's network namespaces, in case
# the GPU machine lacks it.
mkdir -p .device/iproute/lib && cp /usr/sbin/ip .device/iproute/
ldd /usr/sbin/ip | awk '/=> \// { print $3 }' | grep -v -e libc.so -e ld-linux | xargs -I{} cp -L {} .device/iproute/lib/
# The codecs' and OpenSSL's shared libraries, in case the GPU machine lacks them (scripts/device/lib.sh puts .device/lib on the path).
mkdir -p .device/lib && cp -L /usr/lib/x86_64-linux-gnu/libzstd.so.1 /usr/lib/x86_64-linux-gnu/liblz4.so.1 \
    /usr/lib/x86_64-linux-gnu/libssl.so.3 /usr/lib/x86_64-linux-gnu/libcrypto.so.3 .device/lib/
# The registry bench's tools (issue 30): Debian's docker-registry (static) and skopeo, with the libraries
# skopeo links beyond libc in a directory of their own (not on every program's path), behind a wrapper.
if command -v docker-registry >/dev/null && command -v skopeo >/dev/null; then
    xz -T0 -3 -c "$(command -v docker-registry)" >.device/docker-registry.xz
    xz -T0 -3 -c "$(command -v skopeo)" >.device/skopeo.xz
    mkdir -p .device/skopeo-lib
    ldd "$(command -v skopeo)" | awk '/=> \// { print $3 }' | grep -v -e libc.so -e libm.so -e ld-linux | xargs -I{} cp -L {} .device/skopeo-lib/
fi
du -sh .device
