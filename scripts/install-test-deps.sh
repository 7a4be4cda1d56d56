#!/usr/bin/env bash
# What the test suite needs beside the build: runc (the container tests drive it), a static busybox (their
# containers' root filesystem), ip and nsenter (the migration tests' second host is a network namespace),
# podman and crun, and containerd (real engines at the other end of stasis's archives), and CNCF
# distribution (docker-registry), htpasswd, skopeo and openssl (the registry tests' registry, its users, a
# second reader of what stasis pushes, and its certificate). Installs
# Debian's packages with apt when they are missing; does nothing when they are there.
# --no-install-recommends: runc recommends Debian's CRIU 3.17, which does not work on this kernel
# (scripts/install-criu.sh installs CRIU 4.x in /usr/local, first on the PATH).
set -euo pipefail
missing=()
command -v runc >/dev/null || missing+=(runc)
[[ -x /bin/busybox || -x /usr/bin/busybox ]] || missing+=(busybox-static)
[[ -x /usr/sbin/ip || -x /sbin/ip ]] || missing+=(iproute2)
command -v nsenter >/dev/null || missing+=(util-linux)
command -v podman >/dev/null || missing+=(podman crun)
command -v containerd >/dev/null || missing+=(containerd)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v openssl >/dev/null || missing+=(openssl)
(( ${#missing[@]} == 0 )) && exit 0
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
