// SPDX-License-Identifier: MIT
/// \file config.hpp
/// \brief Error handling and build configuration shared by every header.
///
/// - `ATTEND_CHECK(cond, message)` validates public preconditions. It is always on: the check
///   is O(1) next to O(Lq Lk d) work. On failure it throws `attend::invalid_argument` whose
///   `what()` is `message` (a `std::string` expression, evaluated only on failure). Without
///   exceptions (`-fno-exceptions` or `ATTEND_NO_EXCEPTIONS`) it prints the message to stderr
///   and calls `std::abort()`. Define `ATTEND_CHECK` yourself before including attend to
///   replace both.
/// - `ATTEND_ASSERT(cond)` guards internal invariants; it is `eigen_assert`, so `NDEBUG` and
///   `EIGEN_NO_DEBUG` compile it out as Eigen users expect.
#pragma once

#include <Eigen/Core>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__
// Masked scores are -infinity and fully masked rows are detected by comparing with it;
// -ffast-math (-ffinite-math-only) lets the compiler assume neither can happen.
#error "attend: -ffast-math / -ffinite-math-only is not supported: masking relies on IEEE infinities. \
Compile attend's translation units with -fno-finite-math-only."
#endif

#if !defined(ATTEND_NO_EXCEPTIONS) && !defined(__cpp_exceptions)
#define ATTEND_NO_EXCEPTIONS
#endif

namespace attend {

/// Size and index type of every dimension (`std::ptrdiff_t`): 64-bit, so L * L never overflows.
using Index = Eigen::Index;

/// Thrown for an invalid configuration: mismatched shapes, a bad window, a bad block size.
/// The message names the offending shapes.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Reports a failed public precondition: throws, or prints and aborts without exceptions.
[[noreturn]] inline void fail_check(const std::string& message) {
#ifdef ATTEND_NO_EXCEPTIONS
  std::fprintf(stderr, "attend: %s\n", message.c_str());
  std::abort();
#else
  throw invalid_argument("attend: " + message);
#endif
}

}  // namespace detail
}  // namespace attend

#ifndef ATTEND_CHECK
#define ATTEND_CHECK(cond, message)              \
  do {                                           \
    if (!(cond)) ::attend::detail::fail_check(message); \
  } while (false)
#endif

#ifndef ATTEND_ASSERT
#define ATTEND_ASSERT(cond) eigen_assert(cond)
#endif
