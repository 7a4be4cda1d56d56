#!/usr/bin/env bash
# Generates stasis's man pages from its argument parser (swift-argument-parser's generate-manual plugin):
# stasis.1 and one page for each subcommand (stasis.dump.1, ...), written into OUTPUT_DIR.
#   scripts/gen-man.sh [OUTPUT_DIR]     (default: .build/man)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/man}
mkdir -p "$out"
# The plugin builds the tool and asks it for its help as data; its pages land in the plugin's work folder.
swift package plugin --allow-writing-to-directory "$out" generate-manual --multi-page --authors "the stasis developers" \
    --output-directory "$out" >&2
ls "$out"/*.1
