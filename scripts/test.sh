#!/usr/bin/env bash
# The README's test command: installs what is missing, builds a preset in a fresh build directory
# and runs every test with ctest; on the default preset it then runs every libFuzzer target for
# FUZZ_SECONDS (default 30; 0 skips) with scripts/fuzz.sh.
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
if [[ "$PRESET" == debug && "${FUZZ_SECONDS:-30}" != 0 ]]; then
  scripts/fuzz.sh "${FUZZ_SECONDS:-30}"
fi
