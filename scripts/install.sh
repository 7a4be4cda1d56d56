#!/usr/bin/env bash
# Builds stasis for release and installs it where it is found:
#   $PREFIX/bin/stasis                          the tool, the Swift runtime linked in (--static-swift-stdlib):
#                                               it runs on a machine without Swift (a GPU host)
#   $PREFIX/lib/stasis/libstasis-agent.so       the agent `stasis run` preloads (found from the binary)
#   CRIU's plugin directory (`criu --help`)     libstasis_cuda_plugin.so, for runc/podman under plain CRIU
#   $PREFIX/share/{bash-completion,zsh,fish}    shell completions, generated from the argument parser
#   $PREFIX/share/man/man1/stasis*.1            man pages, generated from the argument parser
# Installs CRIU (>= 4.2) and the C libraries first if they are missing.
#
#   scripts/install.sh [PREFIX]          (default: /usr/local; run as root)
#   DESTDIR=DIR scripts/install.sh       stage into DIR instead (scripts/package-deb.sh does), CRIU untouched
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${1:-/usr/local}
DESTDIR=${DESTDIR:-}
export PATH="/usr/local/sbin:$PATH"
log() { echo "install: $*" >&2; }

if [[ -z $DESTDIR ]]; then
    ./scripts/install-criu.sh
fi
./scripts/install-build-deps.sh

log "building stasis for release (the Swift runtime linked in; a few minutes)"
swift build -c release --static-swift-stdlib --product stasis 2>&1 | awk '/error:|warning: unre/ || /Compiling|Linking/ && ++n % 50 == 0' >&2
BIN=$(swift build -c release --static-swift-stdlib --show-bin-path)
[[ -x $BIN/stasis ]] || { log "the release build did not produce $BIN/stasis"; exit 1; }
if ldd "$BIN/stasis" | grep -q 'libswift\|libFoundation'; then
    log "$BIN/stasis still links the Swift runtime dynamically:"; ldd "$BIN/stasis" | grep 'swift\|Foundation' >&2; exit 1
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
./scripts/build-agent.sh "$build" >/dev/null
./scripts/build-criu-plugin.sh "$build" >/dev/null

# Where CRIU looks for plugins: what `criu --help` names as the default of --libdir, else CRIU's own default.
plugins=$(criu --help 2>/dev/null | sed -n 's/.*--libdir.*(by default \([^)]*\)).*/\1/p' | head -n 1)
plugins=${plugins:-/usr/lib/criu/}

root="$DESTDIR"
install -D -m 0755 "$BIN/stasis" "$root$PREFIX/bin/stasis"
install -D -m 0755 "$build/libstasis-agent.so" "$root$PREFIX/lib/stasis/libstasis-agent.so"
install -D -m 0644 "$build/libstasis_cuda_plugin.so" "$root${plugins%/}/libstasis_cuda_plugin.so"

"$BIN/stasis" --generate-completion-script bash >"$build/stasis.bash"
"$BIN/stasis" --generate-completion-script zsh >"$build/_stasis"
"$BIN/stasis" --generate-completion-script fish >"$build/stasis.fish"
install -D -m 0644 "$build/stasis.bash" "$root$PREFIX/share/bash-completion/completions/stasis"
install -D -m 0644 "$build/_stasis" "$root$PREFIX/share/zsh/site-functions/_stasis"
install -D -m 0644 "$build/stasis.fish" "$root$PREFIX/share/fish/vendor_completions.d/stasis.fish"

./scripts/gen-man.sh "$build/man" >/dev/null
for page in "$build"/man/*.1; do install -D -m 0644 "$page" "$root$PREFIX/share/man/man1/$(basename "$page")"; done

log "installed $root$PREFIX/bin/stasis ($("$BIN/stasis" --version)), its agent in $root$PREFIX/lib/stasis,"
log "the CRIU plugin in $root${plugins%/}, completions and $(ls "$build"/man/*.1 | wc -l) man pages under $root$PREFIX/share"
[[ -n $DESTDIR ]] || log "next: stasis check"
