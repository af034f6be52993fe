#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, the "fuzz" preset: clang with
# -fsanitize=fuzzer,address,undefined) and runs each for SECONDS (default 30) from its checked-in
# seed corpus. Fails on the first crash, leak, sanitizer report, timeout or out-of-memory; the
# input that did it is left in build/fuzz/artifacts/.
#   scripts/fuzz.sh [SECONDS] [TARGET...]     e.g. scripts/fuzz.sh 600 fuzz_build_request
# New inputs the fuzzer finds go to build/fuzz/corpus/ (kept between runs, not checked in); copy
# the interesting ones into fuzz/corpus/<target>/ by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
shift || true
cmake --preset fuzz >/dev/null
cmake --build --preset fuzz -j"$(nproc)"

bin_dir=build/fuzz/fuzz
if (($# > 0)); then
  targets=("$@")
else
  targets=()
  for src in fuzz/fuzz_*.cpp; do targets+=("$(basename "$src" .cpp)"); done
fi
mkdir -p build/fuzz/artifacts
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
failed=()
for t in "${targets[@]}"; do
  work="build/fuzz/corpus/$t"
  mkdir -p "$work"
  echo "fuzz: $t for ${seconds}s"
  # The first directory receives new inputs; the checked-in seeds are only read.
  if ! "$bin_dir/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
      -print_final_stats=1 -artifact_prefix="build/fuzz/artifacts/$t-" \
      "$work" "fuzz/corpus/$t" >"build/fuzz/$t.log" 2>&1; then
    tail -n 60 "build/fuzz/$t.log"
    failed+=("$t")
    continue
  fi
  grep -E '^stat::number_of_executed_units|^stat::new_units_added' "build/fuzz/$t.log" |
    tr '\n' ' ' | sed "s/^/fuzz: $t: /"
  echo
done
if ((${#failed[@]} > 0)); then
  echo "fuzz: FAILED: ${failed[*]} (inputs in build/fuzz/artifacts/, logs in build/fuzz/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds}s each: no crash, no leak"
