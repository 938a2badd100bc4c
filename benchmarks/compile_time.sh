#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Compile time of attend's users, header-only and with attend::precompiled (README "Compile time"):
#   bash benchmarks/compile_time.sh
#   CXX=clang++ CXXFLAGS="-std=c++17 -O2 -fopenmp -march=native" RUNS=3 bash benchmarks/compile_time.sh
# compiles, with $CXX (default g++) and $CXXFLAGS (default "-std=c++17 -O2 -fopenmp"):
#   eigen_core    benchmarks/compile_time/eigen_core.cpp: Eigen/Core alone, the floor
#   one_call      benchmarks/compile_time/one_call.cpp: <attend/attend.hpp> and one
#                 scaled_dot_product_attention call on float matrices
#   small_model   benchmarks/compile_time/small_model.cpp: MultiHeadAttention with rotary, a causal
#                 forward and a decode loop over a KVCache
# each header-only and with -DATTEND_EXTERN_TEMPLATES (what linking attend::precompiled does),
# plus src/precompiled.cpp itself (the library, compiled once). It prints the user CPU time
# (seconds) and the peak memory (MB) of each compiler run, the least over RUNS runs (default 1),
# as /usr/bin/time -f '%U %M' reports them: CPU time, so that other work on the machine matters
# little. Then it links and runs both builds of one_call and small_model and checks that they
# print the same. Eigen's include directory comes from pkg-config, else /usr/include/eigen3, or
# $EIGEN_INCLUDE.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cxx=${CXX:-g++}
read -r -a flags <<<"${CXXFLAGS:--std=c++17 -O2 -fopenmp}"
runs=${RUNS:-1}
eigen=${EIGEN_INCLUDE:-$(pkg-config --cflags-only-I eigen3 2>/dev/null | sed 's/^-I//; s/ *$//' || true)}
eigen=${eigen:-/usr/include/eigen3}
if [ ! -x /usr/bin/time ]; then
  echo "compile_time.sh needs /usr/bin/time (Debian: apt-get install time)" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
includes=(-I "$root/include" -isystem "$eigen")

# compile NAME SOURCE [FLAGS...]: compiles SOURCE to $work/NAME.o RUNS times; prints the least
# user time and peak memory.
compile() {
  local name=$1 source=$2 best_time="" best_memory=""
  shift 2
  for ((run = 0; run < runs; ++run)); do
    /usr/bin/time -o "$work/$name.time" -f '%U %M' \
      "$cxx" "${flags[@]}" "${includes[@]}" "$@" -c "$source" -o "$work/$name.o"
    local time memory
    read -r time memory <"$work/$name.time"
    if [ -z "$best_time" ] || awk -v a="$time" -v b="$best_time" 'BEGIN { exit !(a < b) }'; then
      best_time=$time
      best_memory=$memory
    fi
  done
  printf '%-28s %8.2f s %8.0f MB\n' "$name" "$best_time" "$((best_memory / 1024))"
}

echo "$("$cxx" --version | head -1); flags: ${flags[*]}; least of $runs run(s)"
printf '%-28s %10s %11s\n' "translation unit" "user time" "peak memory"
compile eigen_core "$root/benchmarks/compile_time/eigen_core.cpp"
compile precompiled_library "$root/src/precompiled.cpp"
for tu in one_call small_model; do
  compile "$tu (header-only)" "$root/benchmarks/compile_time/$tu.cpp"
  mv "$work/$tu (header-only).o" "$work/$tu.header_only.o"
  compile "$tu (precompiled)" "$root/benchmarks/compile_time/$tu.cpp" -DATTEND_EXTERN_TEMPLATES
  mv "$work/$tu (precompiled).o" "$work/$tu.precompiled.o"
done

# The two builds agree (and the precompiled one links).
for tu in one_call small_model; do
  "$cxx" "${flags[@]}" "$work/$tu.header_only.o" -o "$work/$tu.header_only"
  "$cxx" "${flags[@]}" "$work/$tu.precompiled.o" "$work/precompiled_library.o" -o "$work/$tu.precompiled"
  if [ "$("$work/$tu.header_only")" != "$("$work/$tu.precompiled")" ]; then
    echo "$tu: the header-only and precompiled builds print different results" >&2
    exit 1
  fi
done
echo "both builds of one_call and small_model print the same results"
