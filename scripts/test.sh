#!/usr/bin/env bash
# The README's test command: installs what is missing, builds a preset in a fresh build directory
# and runs every test with ctest.
#   scripts/test.sh [PRESET]     PRESET: debug (default), release, asan, tsan
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-debug}"
scripts/install-deps.sh
BUILD_DIR="build/${PRESET}"
rm -rf "$BUILD_DIR"
cmake --preset "$PRESET"
cmake --build --preset "$PRESET" -j"$(nproc)"
ctest --preset "$PRESET" -j"${CTEST_JOBS:-2}" --timeout 600
