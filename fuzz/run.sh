#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Builds attention_fuzzer with clang and fuzzes for a while, starting from the committed corpus.
#   fuzz/run.sh [build-dir] [seconds]      (defaults: build/fuzz, 60)
# ATTEND_FUZZ_SEED=N fixes libFuzzer's seed (CI does, so a run explores the same inputs each
# time on the same machine); the default 0 draws a new one.
# The build is the one users get: -march=native (AVX-512 on the CI machines) and OpenMP, with
# each input choosing 1-4 OpenMP and 1-2 Eigen threads. ATTEND_FUZZ_NATIVE=OFF fuzzes the
# portable SSE2 paths instead (use another build directory).
# The corpus is copied first, so a run never modifies the repository; new inputs stay in
# <build-dir>/corpus, crashes in <build-dir>/artifacts. Exits non-zero on any crash or failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=${1:-build/fuzz}
seconds=${2:-60}

CC=${CC:-clang} CXX=${CXX:-clang++} cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Debug \
  -DATTEND_BUILD_FUZZERS=ON -DATTEND_BUILD_TESTS=OFF -DATTEND_BUILD_BENCHMARKS=OFF \
  -DATTEND_BUILD_EXAMPLES=OFF -DATTEND_INSTALL=OFF -DATTEND_USE_OPENMP=ON \
  -DATTEND_NATIVE_ARCH="${ATTEND_FUZZ_NATIVE:-ON}" >/dev/null
cmake --build "$build_dir" --target attention_fuzzer -j "${JOBS:-2}"

corpus="$build_dir/corpus"
artifacts="$build_dir/artifacts"
mkdir -p "$corpus" "$artifacts"
cp fuzz/corpus/* "$corpus/"
log="$build_dir/fuzz.log"

status=0
# Idle OpenMP threads sleep at once instead of spinning (inputs alternate thread counts).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive} KMP_BLOCKTIME=${KMP_BLOCKTIME:-0}
ATTEND_FUZZ_STATS=1 "$build_dir/fuzz/attention_fuzzer" "$corpus" \
  -max_total_time="$seconds" -seed="${ATTEND_FUZZ_SEED:-0}" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 \
  -artifact_prefix="$artifacts/" >"$log" 2>&1 || status=$?

grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|attention_fuzzer:)' "$log" || true
grep -E '^#[0-9]+[[:space:]]+DONE' "$log" || true  # coverage (cov:) and features (ft:) reached
if [ "$status" -ne 0 ]; then
  tail -n 60 "$log"
  echo "attention_fuzzer failed (exit $status); reproducer(s) in $artifacts:" >&2
  ls "$artifacts" >&2
  exit "$status"
fi
echo "attention_fuzzer: no failure in ${seconds} s (log: $log)"
