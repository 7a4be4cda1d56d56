#!/usr/bin/env bash
# The C libraries stasis links besides Swift's: libzstd and liblz4 (the chunk store's codecs) and OpenSSL's
# libssl (TLS for migrations). Installs their
# development packages with apt when the headers are missing; does nothing when they are there.
set -euo pipefail
missing=()
[[ -e /usr/include/zstd.h ]] || missing+=(libzstd-dev)
[[ -e /usr/include/lz4.h ]] || missing+=(liblz4-dev)
[[ -e /usr/include/openssl/ssl.h ]] || missing+=(libssl-dev)
(( ${#missing[@]} == 0 )) && exit 0
echo "install-build-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
