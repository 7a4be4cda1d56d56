#!/usr/bin/env bash
# Regenerates Sources/StasisCRIU/Generated/*.pb.swift from CRIU's .proto files in Sources/StasisCRIU/Proto/
# (rpc.proto for `criu swrk`, stats.proto for its statistics), with protoc and the protoc-gen-swift of the
# swift-protobuf version Package.resolved pins. Run it after changing a .proto or that version, and commit the
# result: builds never run it (a build with swift-protobuf's plugin takes minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null
fi
swift build -c release --product protoc-gen-swift >/dev/null
plugin=$(swift build -c release --show-bin-path)/protoc-gen-swift
protoc --plugin=protoc-gen-swift="$plugin" --swift_opt=Visibility=Public \
    --proto_path=Sources/StasisCRIU/Proto --swift_out=Sources/StasisCRIU/Generated \
    Sources/StasisCRIU/Proto/rpc.proto Sources/StasisCRIU/Proto/stats.proto
echo "regenerated: $(ls Sources/StasisCRIU/Generated)"
