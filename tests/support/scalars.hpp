// SPDX-License-Identifier: MIT
/// \file support/scalars.hpp
/// \brief The scalar types of the typed tests.
///
/// float and double; float alone where ATTEND_TEST_FLOAT_ONLY is defined (CMake option
/// ATTEND_TEST_FLOAT_ONLY, set by the sanitizer presets clang-asan-ubsan and tsan). Those legs
/// look for memory errors, undefined behaviour and races, which the float instantiations of the
/// same kernels and entry points show as well; building each typed test for one scalar instead of
/// two takes a large share off CI's compile time. The double paths run in every other leg (the
/// gcc and aarch64 legs, and the fuzzer, which runs double inputs under ASan and UBSan).
#pragma once

#include <gtest/gtest.h>

namespace attend::test {

#if defined(ATTEND_TEST_FLOAT_ONLY)
using TypedScalars = ::testing::Types<float>;
#else
using TypedScalars = ::testing::Types<float, double>;
#endif

}  // namespace attend::test
