#!/usr/bin/env bash
# The whole test suite: installs CRIU (and runc and busybox for the container tests) if needed, builds
# everything, runs unit and integration tests (real CRIU, real processes; needs root), then builds the Debian
# package and checks it in a root without Swift (scripts/test-package.sh). .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-criu.sh
./scripts/install-build-deps.sh
./scripts/install-test-deps.sh
export PATH="/usr/local/sbin:$PATH"
swift build --build-tests
./scripts/build-criu-plugin.sh >/dev/null
./scripts/build-agent.sh >/dev/null
swift test --skip-build
./scripts/test-package.sh
