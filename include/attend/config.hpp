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

// GCC 12.1 and 12.2 report `__Y` as (maybe) used uninitialized inside their own AVX-512
// intrinsics (the self-initialized _mm512_undefined_ps() and friends; GCC bug 105593, fixed in
// 12.3 and 13) wherever Eigen's packet code inlines them: hundreds of warnings in a
// -march=native build. Eigen and the intrinsic headers it pulls in are read with those two
// warnings off, so translation units that include attend before Eigen never see them; the
// region ends here and a real uninitialized read in the user's or attend's code still warns.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12 && __GNUC_MINOR__ < 3
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <Eigen/Core>
#pragma GCC diagnostic pop
#else
#include <Eigen/Core>
#endif

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// A 32-bit index (EIGEN_DEFAULT_DENSE_INDEX_TYPE=int) would overflow in L * L, in tile offsets
// and in positions past 2^31 with no error; attend refuses it instead of breaking long sequences.
static_assert(std::is_signed_v<Index> && sizeof(Index) >= 8,
              "attend: Eigen::Index must be a signed 64-bit integer; do not define EIGEN_DEFAULT_DENSE_INDEX_TYPE "
              "as int (or any narrower type) in translation units that include attend");

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
