#!/usr/bin/env bash
# Installs CRIU when it is missing or too old for stasis.
#
# stasis runs with CRIU >= 4.0, but this script wants 4.2: on kernels >= 6.16, CRIU 4.1 cannot dump any
# INET socket (it asks for SO_PASSCRED, which those kernels refuse on non-UNIX sockets: "Can't get 1:16 opt:
# Operation not supported"); 4.2 asks only UNIX and netlink sockets.
#
# Order of preference:
#   1. a criu already on PATH (or in /usr/local/sbin) whose version is new enough: nothing to do;
#   2. the distribution's package, when its candidate version is new enough;
#   3. a build of Debian's source package (forky carries 4.2.1) with build dependencies from the
#      distribution, installed into /usr/local/sbin; about 30 s on 2 cores.
# Debian 12's criu 3.17.1 fails on recent kernels ("kerndat_vdso_fill_symtable failed"), hence 3.
#
# CRIU_UPSTREAM_CUDA_PLUGIN=1 also wants CRIU's own cuda plugin (plugins/cuda of the same source, driving
# NVIDIA's cuda-checkpoint) in $PREFIX/lib/criu/cuda_plugin.so: the benchmarks' baseline (bench/), never
# used by stasis itself. Without it at hand, CRIU is built from source (3.).
set -euo pipefail

WANT_VERSION=${CRIU_WANT_VERSION:-4.2}
PREFIX=${CRIU_PREFIX:-/usr/local}
WORK=${CRIU_BUILD_DIR:-/var/tmp/stasis-criu-build}
SRC_SUITE=${CRIU_SRC_SUITE:-forky}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CUDA_PLUGIN=$PREFIX/lib/criu/cuda_plugin.so
want_plugin() { [[ ${CRIU_UPSTREAM_CUDA_PLUGIN:-0} == 1 && ! -f $CUDA_PLUGIN ]]; }

log() { printf 'install-criu: %s\n' "$*" >&2; }

# True when version $1 (X.Y[.Z...]) is at least $WANT_VERSION.
version_ok() {
    [[ -n "$1" ]] && [[ "$(printf '%s\n%s\n' "$WANT_VERSION" "$1" | sort -V | head -n1)" == "$WANT_VERSION" ]]
}

is_new_enough() {
    version_ok "$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n1)"
}

for candidate in "$(command -v criu 2>/dev/null || true)" "$PREFIX/sbin/criu"; do
    if [[ -n "$candidate" && -x "$candidate" ]] && is_new_enough "$candidate" && ! want_plugin; then
        log "found $("$candidate" --version | head -n1) at $candidate"
        exit 0
    fi
done

if [[ $(id -u) -ne 0 ]]; then
    log "CRIU >= $WANT_VERSION is missing and installing it needs root; rerun as root"
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    log "CRIU >= $WANT_VERSION is missing and this is not a Debian-like system; install it from your distribution or from criu.org"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then apt-get update -qq; apt_updated=1; fi
}

# 2. The distribution's own package, when new enough.
apt_update_once
candidate_version=$(apt-cache policy criu 2>/dev/null | sed -n 's/^ *Candidate: *\([0-9.]*\).*/\1/p')
if version_ok "$candidate_version" && ! want_plugin; then
    log "installing the distribution's criu package"
    apt-get install -y -qq criu
    exit 0
fi

# 3. Build Debian's source package. We take the upstream tarball that Debian ships (criu_X.orig.tar.xz)
# and check it against the SHA-256 in the suite's signed Sources index; Debian's own patches only touch
# packaging, so the tarball alone builds the binary we need.
log "building CRIU from Debian's $SRC_SUITE source package into $PREFIX"
apt-get install -y -qq --no-install-recommends build-essential pkg-config curl xz-utils ca-certificates \
    libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev \
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev \
    python3-protobuf iproute2 >/dev/null

rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK"
curl -fsS "$MIRROR/dists/$SRC_SUITE/main/source/Sources.xz" | xz -dc >Sources
# The criu stanza's Checksums-Sha256 line for the orig tarball: "<sha256> <size> criu_X.orig.tar.xz".
read -r sha size tarball < <(awk '
    /^Package: /           { in_criu = ($2 == "criu") }
    in_criu && /^Checksums-Sha256:/ { in_sums = 1; next }
    in_sums && /^ /        { if ($3 ~ /\.orig\.tar\./) { print $1, $2, $3; exit } ; next }
    { in_sums = 0 }' Sources)
[[ -n "${tarball:-}" ]] || { log "no criu source package in $SRC_SUITE"; exit 1; }
curl -fsS -o "$tarball" "$MIRROR/pool/main/c/criu/$tarball"
echo "$sha  $tarball" | sha256sum -c --quiet - || { log "checksum mismatch for $tarball"; exit 1; }
mkdir src && tar -xf "$tarball" -C src --strip-components=1
cd src
make -j"$(nproc)" criu >build.log 2>&1 || { tail -n 30 build.log >&2; log "CRIU build failed (log: $WORK/src/build.log)"; exit 1; }
install -D -m 0755 criu/criu "$PREFIX/sbin/criu"
# The plugin header is public ABI; the stasis plugin carries its own declarations, this copy is for reference.
install -D -m 0644 criu/include/criu-plugin.h "$PREFIX/include/criu/criu-plugin.h"
if [[ ${CRIU_UPSTREAM_CUDA_PLUGIN:-0} == 1 ]]; then
    make cuda_plugin >>build.log 2>&1 || { tail -n 30 build.log >&2; log "CRIU's cuda plugin did not build (log: $WORK/src/build.log)"; exit 1; }
    install -D -m 0755 plugins/cuda/cuda_plugin.so "$CUDA_PLUGIN"
    log "installed CRIU's own cuda plugin at $CUDA_PLUGIN"
fi
log "installed $("$PREFIX/sbin/criu" --version | head -n1) at $PREFIX/sbin/criu"
