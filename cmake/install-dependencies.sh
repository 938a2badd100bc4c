#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Checks that the tools and libraries attend's tests, benchmarks and examples need are present,
# and installs what is missing with apt-get (Debian, Ubuntu):
#   as root                 apt-get update && apt-get install -y <missing>
#   with password-less sudo  the same through `sudo -n`
#   otherwise               stops and prints the exact command to run.
# The library itself only needs Eigen; OpenMP (libgomp, shipped with g++) is optional.
# With --bench (what `make bench` passes) it also installs gnuplot for the report's plot; that
# one is optional: when it cannot be installed the script says so and still succeeds.
# With --clang (what .ci/run passes) it also installs clang with LLVM's OpenMP (libomp-dev, which
# carries the Archer tool ThreadSanitizer needs) and the sanitizer and libFuzzer runtimes, and
# ccache, which .ci/run puts in front of the compilers (CMAKE_CXX_COMPILER_LAUNCHER).
# With --aarch64 (the preset "aarch64") it also installs the aarch64 cross compiler, QEMU's
# user-mode emulator that runs its executables, and GoogleTest's sources (built for the target).
# With --mpi (what .ci/run passes) it also installs Open MPI (libopenmpi-dev, openmpi-bin), so that
# CMake builds the optional attend::distributed component and `make test` runs its tests.
set -euo pipefail

readonly min_cmake=3.21
missing=()
optional=()
bench=false
clang=false
aarch64=false
mpi=false
for arg in "$@"; do
  case $arg in
    --bench) bench=true ;;
    --clang) clang=true ;;
    --aarch64) aarch64=true ;;
    --mpi) mpi=true ;;
    *) echo "usage: bash cmake/install-dependencies.sh [--bench] [--clang] [--aarch64] [--mpi]" >&2; exit 2 ;;
  esac
done

have_command() { command -v "$1" >/dev/null 2>&1; }

# A package counts as present when dpkg says it is installed.
have_package() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

if have_command cmake; then
  cmake_version=$(cmake --version | sed -n 's/^cmake version \([0-9.]*\).*/\1/p')
  if ! version_at_least "$cmake_version" "$min_cmake"; then
    echo "attend: CMake $cmake_version is too old; $min_cmake or newer is needed (https://cmake.org/download/)." >&2
    exit 1
  fi
else
  missing+=(cmake)
fi
if [ -n "${CXX:-}" ]; then
  have_command "$CXX" || { echo "attend: the compiler CXX=$CXX is not installed." >&2; exit 1; }
else
  have_command g++ || missing+=(g++)
fi
have_command make || missing+=(make)

if have_command dpkg-query; then
  packages=(libeigen3-dev libgtest-dev libgmock-dev libbenchmark-dev)
  $clang && packages+=(clang libomp-dev libclang-rt-dev ccache)
  $aarch64 && packages+=(g++-aarch64-linux-gnu qemu-user googletest)
  $mpi && packages+=(libopenmpi-dev openmpi-bin)
  for package in "${packages[@]}"; do
    have_package "$package" || missing+=("$package")
  done
else
  echo "attend: not a Debian-based system; CMake will report any missing library" \
    "(Eigen 3.4, GoogleTest, Google Benchmark)." >&2
fi

if $bench && ! have_command gnuplot; then
  optional+=(gnuplot-nox)
fi

# OpenMP is optional: without it the kernels run on one thread.
check_openmp() {
  local cxx=${CXX:-g++}
  have_command "$cxx" || return 0
  printf '#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n' |
    "$cxx" -fopenmp -x c++ - -o /dev/null 2>/dev/null ||
    echo "attend: note: $cxx has no OpenMP (libgomp); the kernels will run on one thread." >&2
}

if [ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
  check_openmp
  exit 0
fi

# Without a way to install, a missing optional package is only a note.
skip_optional() {
  echo "attend: note: gnuplot is missing, so the benchmark report will have no plot;" \
    "to get one: sudo apt-get install gnuplot-nox" >&2
  [ ${#missing[@]} -eq 0 ] || exit 1
  check_openmp
  exit 0
}
if ! have_command apt-get; then
  [ ${#missing[@]} -eq 0 ] || echo "attend: missing ${missing[*]}; please install them with your package manager." >&2
  [ ${#optional[@]} -eq 0 ] && exit 1
  skip_optional
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif have_command sudo && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  if [ ${#missing[@]} -ne 0 ]; then
    echo "attend: missing ${missing[*]}. Please run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]} ${optional[*]}" >&2
    exit 1
  fi
  skip_optional
fi
export DEBIAN_FRONTEND=noninteractive
to_install=("${missing[@]}" "${optional[@]}")
echo "attend: installing ${to_install[*]} with apt-get" >&2
if [ ${#missing[@]} -ne 0 ]; then
  "${as_root[@]}" apt-get update
  "${as_root[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
elif ! "${as_root[@]}" apt-get update; then
  skip_optional
fi
if [ ${#optional[@]} -ne 0 ]; then
  "${as_root[@]}" apt-get install -y --no-install-recommends "${optional[@]}" || skip_optional
fi
check_openmp
