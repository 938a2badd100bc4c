// SPDX-License-Identifier: MIT
// The tolerance rule of reference/reliability.md §4.2, as a GoogleTest predicate:
//   PASS iff max|O - O_ref| <= 2 err_base + 8 eps max(1, max|O_ref|),
// where err_base = max|O_base - O_ref| is the error of the plainest same-precision computation
// (baseline.hpp), plus a hard cap for unit-variance inputs (float 1e-5, double 1e-12).
// Non-finite values must sit at the same positions with the same value class first.
#pragma once

#include "baseline.hpp"
#include "reference.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>

namespace attend::test {

/// Largest |a - b| over finite entries; writes the position of the worst one.
template <class A, class B>
Real max_abs_error(const A& a, const B& b, Index* worst_row = nullptr, Index* worst_col = nullptr) {
  Real worst = 0;
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j) {
      const Real x = Real(a(i, j)), y = Real(b(i, j));
      if (!std::isfinite(x) || !std::isfinite(y)) continue;
      const Real e = std::fabs(x - y);
      if (e > worst) {
        worst = e;
        if (worst_row) *worst_row = i;
        if (worst_col) *worst_col = j;
      }
    }
  return worst;
}

/// Hard cap on the error for unit-variance inputs, independent of the baseline.
template <class T>
constexpr Real hard_cap() {
  return std::is_same_v<T, float> ? Real(1e-5) : Real(1e-12);
}

/// Checks `actual` (in T) against the long-double `expected` with the rule above.
/// \param baseline   the same quantity from the plain same-precision baseline
/// \param unit_scale true when inputs have unit variance, enabling the hard cap
template <class T, class A, class B, class C>
::testing::AssertionResult within_tolerance(const A& actual, const B& expected, const C& baseline,
                                            bool unit_scale = true) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape (" << actual.rows() << " x " << actual.cols()
                                         << ") != expected (" << expected.rows() << " x " << expected.cols() << ")";
  for (Index i = 0; i < actual.rows(); ++i)
    for (Index j = 0; j < actual.cols(); ++j) {
      const Real x = Real(actual(i, j)), y = Real(expected(i, j));
      if (std::isnan(x) != std::isnan(y) || ((std::isinf(x) || std::isinf(y)) && x != y))
        return ::testing::AssertionFailure() << "non-finite mismatch at (" << i << ", " << j << "): " << x
                                             << " vs expected " << y;
    }
  const Real eps = std::numeric_limits<T>::epsilon();
  Real ref_max = 1;
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j)
      if (std::isfinite(Real(expected(i, j)))) ref_max = std::max(ref_max, std::fabs(Real(expected(i, j))));
  const Real err_base = max_abs_error(baseline, expected);
  Real bound = 2 * err_base + 8 * eps * ref_max;
  if (unit_scale) bound = std::min(bound, hard_cap<T>() * ref_max);
  Index wi = 0, wj = 0;
  const Real err = max_abs_error(actual, expected, &wi, &wj);
  if (err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << err << " at (" << wi << ", " << wj << ") = "
                                       << Real(actual(wi, wj)) << " vs " << Real(expected(wi, wj))
                                       << " exceeds bound " << bound << " (baseline error " << err_base << ")";
}

/// Bitwise equality of two same-shaped matrices (NaN equals NaN of the same bits); reports the
/// first differing element instead of printing both matrices.
template <class A, class B>
::testing::AssertionResult identical(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols())
    return ::testing::AssertionFailure() << "shape (" << a.rows() << " x " << a.cols() << ") != (" << b.rows()
                                         << " x " << b.cols() << ")";
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j) {
      const auto x = a(i, j), y = b(i, j);
      static_assert(sizeof(x) == sizeof(y), "identical() compares matrices of one scalar type");
      if (std::memcmp(&x, &y, sizeof(x)) != 0)
        return ::testing::AssertionFailure() << "differ at (" << i << ", " << j << "): " << x << " vs " << y;
    }
  return ::testing::AssertionSuccess();
}

/// Checks an attention output (Lq, Dv) and its log-sum-exp (Lq, or empty to skip) against the
/// reference: rows that see no key must be exactly zero with lse exactly -inf, then the tolerance
/// rule applies to the output and to the lse.
template <class T, class Out, class Lse>
void expect_matches_reference(const Out& out, const Lse& lse, const Reference& ref, const Baseline<T>& base,
                              bool unit_scale = true) {
  ASSERT_EQ(out.rows(), ref.output.rows());
  ASSERT_EQ(out.cols(), ref.output.cols());
  for (Index i = 0; i < ref.lse.size(); ++i) {
    if (ref.lse(i) != -std::numeric_limits<Real>::infinity()) continue;
    for (Index j = 0; j < out.cols(); ++j)
      ASSERT_EQ(out(i, j), T(0)) << "row " << i << " sees no key, so its output must be exactly 0";
    if (lse.size() != 0) {
      ASSERT_EQ(lse(i), -std::numeric_limits<T>::infinity()) << "lse of empty row " << i;
    }
  }
  EXPECT_TRUE(within_tolerance<T>(out, ref.output, base.output, unit_scale)) << "output";
  if (lse.size() != 0) {
    ASSERT_EQ(lse.size(), ref.lse.size());
    EXPECT_TRUE(within_tolerance<T>(lse, ref.lse, base.lse, unit_scale)) << "log-sum-exp";
  }
}

}  // namespace attend::test
