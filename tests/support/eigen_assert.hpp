// SPDX-License-Identifier: MIT
// Turns Eigen's own assertions (and attend's ATTEND_ASSERT, which is eigen_assert) into C++
// exceptions, so that a violated internal invariant fails the running test with its condition,
// file and line instead of being compiled out (NDEBUG) or aborting the whole executable.
// Force-included before anything else into every test when ATTEND_TEST_EIGEN_ASSERTS is ON
// (tests/CMakeLists.txt), as Eigen's own test suite does in test/main.h; it must come before
// the first Eigen header, which only defines eigen_assert when it is not defined yet.
#pragma once

#include <stdexcept>
#include <string>

namespace attend::test {

/// Thrown by eigen_assert; GoogleTest reports it as a failure of the running test.
struct eigen_assertion_failure : std::logic_error {
  eigen_assertion_failure(const char* condition, const char* file, int line)
      : std::logic_error(std::string("Eigen assertion failed: ") + condition + " at " + file + ":" +
                         std::to_string(line)) {}
};

}  // namespace attend::test

#define ATTEND_TEST_EIGEN_ASSERTS_THROW 1
#define eigen_assert(condition)                                                      \
  do {                                                                               \
    if (!(condition)) throw ::attend::test::eigen_assertion_failure(#condition, __FILE__, __LINE__); \
  } while (false)
