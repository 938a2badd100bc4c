// SPDX-License-Identifier: MIT
// Central finite differences of a scalar loss in double: the check of every analytic gradient of
// the backward tests against the forward it differentiates.
#pragma once

#include <attend/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

namespace attend::test {

/// Compares the analytic gradient `g` of loss() with respect to every finite entry of `x` with
/// central differences of loss(), h = 1e-6 max(scale, |x|): truncation (h^2) and rounding
/// (eps |loss| / h) stay below 1e-8 for O(1) problems (pass the inputs' scale when it is not 1).
template <class Loss, class X, class G>
void expect_matches_finite_differences(const Loss& loss, X&& x, const G& g, const char* what, double scale = 1) {
  ASSERT_EQ(x.rows(), g.rows()) << what;
  ASSERT_EQ(x.cols(), g.cols()) << what;
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) {
      if (!std::isfinite(x(i, j))) continue;
      const double x0 = x(i, j), h = 1e-6 * std::max(scale, std::fabs(x0));
      x(i, j) = x0 + h;
      const double up = loss();
      x(i, j) = x0 - h;
      const double down = loss();
      x(i, j) = x0;
      const double numeric = (up - down) / (2 * h);
      ASSERT_NEAR(g(i, j), numeric, 1e-6 * std::max(1.0, std::fabs(numeric))) << what << "(" << i << ", " << j << ")";
    }
}

/// <d_out, out>: the loss whose gradient at `out` is d_out.
template <class A, class B>
double inner(const A& d_out, const B& out) {
  return (d_out.array() * out.array()).sum();
}

}  // namespace attend::test
