#!/usr/bin/env bash
# Builds a Debian package of stasis that installs on a machine without Swift: the release binary with the
# Swift runtime linked in, the agent, the CRIU plugin (in CRIU's plugin directory), completions and man
# pages, as scripts/install.sh lays them out under /usr. CRIU itself (>= 4.0) is not a dependency Debian can
# meet (bookworm has 3.17): `stasis check` says when it is missing, and scripts/install-criu.sh builds it.
#   scripts/package-deb.sh [OUTPUT_DIR]     (default: .build/deb); prints the package's path
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/deb}
mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
DESTDIR="$stage" ./scripts/install.sh /usr >&2
strip --strip-unneeded "$stage/usr/bin/stasis" "$stage/usr/lib/stasis/libstasis-agent.so"
# Debian keeps zsh's completions for packages in vendor-completions, and man pages compressed.
mkdir -p "$stage/usr/share/zsh/vendor-completions"
mv "$stage/usr/share/zsh/site-functions/_stasis" "$stage/usr/share/zsh/vendor-completions/_stasis"
rmdir "$stage/usr/share/zsh/site-functions"
gzip -9n "$stage"/usr/share/man/man1/*.1

version=$(sed -n 's/.*static let current = "\(.*\)".*/\1/p' Sources/StasisEngine/Support.swift)
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
version="$version+git$(git log -1 --format=%cd --date=format:%Y%m%d 2>/dev/null || date +%Y%m%d).$revision"
mkdir -p "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<CONTROL
Package: stasis
Version: $version
Architecture: amd64
Maintainer: the stasis developers <stasis@localhost>
Depends: libc6 (>= 2.34), libstdc++6, libgcc-s1, libzstd1, liblz4-1, libssl3
Suggests: runc
Section: admin
Priority: optional
Installed-Size: $(du -sk "$stage/usr" | cut -f1)
Description: checkpoint and restore for GPU jobs on Linux
 stasis freezes a running process tree (a training job, an inference server,
 a CUDA program), saves its CPU side through CRIU (>= 4.0, installed apart)
 and its device memory through the NVIDIA driver or its own agent, and
 restores it later, on the same or another machine. Checkpoints are
 verified, deduplicated, compressed chunks in a store.
CONTROL
package="$out/stasis_${version}_amd64.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$package" >&2
echo "$package"
