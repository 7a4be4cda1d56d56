#!/usr/bin/env bash
# Installs the Debian package (scripts/package-deb.sh) into a clean root and uses it there: a copy-on-write
# view of this machine's root (overlayfs, the upper layer in memory) from which Swift (/opt/swift, the
# toolchain and its runtime) and any installed stasis are removed; dpkg installs the package in it; then
# `stasis check`, and a shell counting in a file is checkpointed and restored from it and goes on counting.
# Nothing outside the overlay changes. Needs root. Prints PASS or FAIL.
#   scripts/test-package.sh [PACKAGE]     (default: builds one)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/sbin:$PATH"
package=${1:-$(./scripts/package-deb.sh)}
package=$(realpath "$package")
work=$(mktemp -d /tmp/stasis-package.XXXXXX)
cleanup() {
    [[ -n ${counter:-} ]] && kill -9 "$counter" 2>/dev/null
    for mount in "$work/root/proc" "$work/root/dev" "$work/root/sys" "$work/root/tmp" "$work/root" "$work/layers"; do
        umount -l "$mount" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "test-package: FAIL: $*" >&2; exit 1; }

mkdir -p "$work/layers" "$work/root"
mount -t tmpfs -o size=2g,mode=0700 tmpfs "$work/layers"
mkdir -p "$work/layers/upper" "$work/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/layers/upper,workdir=$work/layers/work" "$work/root"
root="$work/root"
for mount in proc dev sys; do mount --rbind "/$mount" "$root/$mount"; done
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
rm -rf "$root/opt/swift" "$root/usr/local/bin/stasis" "$root/usr/local/lib/stasis" "$root/var/lib/stasis"
in_root() { chroot "$root" /usr/bin/env PATH=/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
in_root sh -c 'command -v swift swiftc' >/dev/null 2>&1 && fail "Swift is still visible in the clean root"

cp "$package" "$root/tmp/stasis.deb"
in_root dpkg -i /tmp/stasis.deb >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg -i"; }
[[ $(in_root sh -c 'command -v stasis') == /usr/bin/stasis ]] || fail "stasis is not /usr/bin/stasis"
in_root ldd /usr/bin/stasis | grep -q swift && fail "the installed stasis links a Swift library"
in_root stasis --version
in_root stasis check || fail "stasis check"
[[ -f $root/usr/lib/stasis/libstasis-agent.so && -f $root/usr/share/man/man1/stasis.dump.1.gz && -f $root/usr/share/bash-completion/completions/stasis ]] \
    || fail "the agent, a man page or the completions are missing"

# A shell counting in a file, in a session of its own, checkpointed and restored by the installed stasis.
counter=$(in_root setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done' </dev/null >/dev/null 2>&1 & echo $!)
sleep 1
counter=$(pgrep -f -n 'while :; do i=' || fail "the counter did not start")
in_root stasis dump "$counter" -D /tmp/checkpoint || fail "dump"
for _ in $(seq 100); do [[ -e /proc/$counter ]] || break; sleep 0.05; done
before=$(cat "$root/tmp/count")
in_root stasis restore /tmp/checkpoint || fail "restore"
sleep 1
after=$(cat "$root/tmp/count")
(( after > before )) || fail "the restored counter does not count ($before, then $after)"
echo "test-package: PASS: $(basename "$package") installed into a root without Swift; check, dump and restore worked (count $before, then $after)"
