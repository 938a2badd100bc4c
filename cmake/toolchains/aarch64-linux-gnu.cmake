# SPDX-License-Identifier: MIT
# Cross-compiles for 64-bit ARM (aarch64, NEON) with Debian's GNU toolchain and runs what it
# builds under QEMU's user-mode emulator: the CMake preset "aarch64" uses it.
#   Debian:  bash cmake/install-dependencies.sh --aarch64
#            (g++-aarch64-linux-gnu and qemu-user; Eigen is header-only, the host's serves)
#   by hand: cmake -S . -B build-arm --toolchain cmake/toolchains/aarch64-linux-gnu.cmake, and
#            for the tests -DCMAKE_PROJECT_TOP_LEVEL_INCLUDES=cmake/toolchains/googletest-from-source.cmake
# ATTEND_NATIVE_ARCH adds no -march=native when cross-compiling; name the target's CPU in
# CMAKE_CXX_FLAGS (-mcpu=...) for a build tuned to it.
# CMAKE_CROSSCOMPILING_EMULATOR makes add_test, gtest_discover_tests and CTest run the target's
# executables through qemu-aarch64, with the target's loader and libraries (libstdc++, libgomp)
# from the cross toolchain's sysroot.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(ATTEND_AARCH64_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${ATTEND_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${ATTEND_AARCH64_TRIPLE}-g++)

# The target's headers and libraries come from the sysroot only; packages may also come from the
# host, for the header-only, architecture-independent ones (Eigen's CMake package).
set(ATTEND_AARCH64_SYSROOT /usr/${ATTEND_AARCH64_TRIPLE})
set(CMAKE_FIND_ROOT_PATH ${ATTEND_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

find_program(ATTEND_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(ATTEND_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${ATTEND_QEMU_AARCH64} -L ${ATTEND_AARCH64_SYSROOT})
endif()
