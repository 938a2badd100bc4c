// SPDX-License-Identifier: MIT
// FlashAttention's accuracy rule for bf16 and half: a kernel's error against the long-double
// reference (on the same rounded inputs) is at most twice the error of the naive attention in
// the same precision. The naive attention here is what a framework's eager bf16 code computes
// (PyTorch: q @ k.T, * scale, softmax, @ v, each a bf16 tensor): every operation rounds its
// result to S,
//   S~ = r(r(Q K^T) scale) (+ r(bias)),  P~ = r(softmax(S~)),  O~ = r(P~ V),
// with the products accumulated in float inside each operation, as a bf16 GEMM does, and the
// softmax computed in float from S~. It shares no code with the library.
#pragma once

#include "reference.hpp"
#include "tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <sstream>

namespace attend::test {

/// x rounded to S (round to nearest even) and widened back to float.
template <class S>
float round_to(float x) {
  return float(S(x));
}

/// The naive same-precision attention above, its values held in float (each one an S value).
template <class S, class Q, class K, class V>
Matrix<float> naive_low_precision_attention(const Q& q, const K& k, const V& v, float scale, const BoolMatrix& visible,
                                            const std::optional<RealMatrix>& bias = std::nullopt) {
  const Index lq = q.rows(), lk = k.rows(), dk = q.cols(), dv = v.cols();
  Matrix<float> p(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (Index j = 0; j < lk; ++j) {
      float dot = 0;
      for (Index c = 0; c < dk; ++c) dot += float(q(i, c)) * float(k(j, c));
      float s = round_to<S>(round_to<S>(dot) * scale);
      if (bias) s = round_to<S>(s + round_to<S>(float((*bias)(i, j))));
      p(i, j) = visible(i, j) ? s : -std::numeric_limits<float>::infinity();
      m = std::isnan(p(i, j)) || std::isnan(m) ? std::numeric_limits<float>::quiet_NaN() : std::max(m, p(i, j));
    }
    float sum = 0;
    for (Index j = 0; j < lk; ++j) {
      p(i, j) = p(i, j) == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(p(i, j) - m);
      sum += p(i, j);
    }
    for (Index j = 0; j < lk; ++j) p(i, j) = sum > 0 ? round_to<S>(p(i, j) / sum) : 0.0f;
  }
  Matrix<float> out(lq, dv);
  for (Index i = 0; i < lq; ++i)
    for (Index c = 0; c < dv; ++c) {
      float acc = 0;
      for (Index j = 0; j < lk; ++j) acc += p(i, j) * float(v(j, c));
      out(i, c) = round_to<S>(acc);
    }
  return out;
}

/// PASS iff max|O - O_ref| <= 2 max|O_naive - O_ref| + 4 eps_float max(1, max|O_ref|) and the
/// non-finite entries agree. The float-eps floor only matters where the naive error is 0 (an
/// output every path gets exactly, such as a constant V); it is 2^-14 of a bf16 step.
template <class A>
::testing::AssertionResult within_low_precision_rule(const A& actual, const RealMatrix& expected,
                                                     const Matrix<float>& naive) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape mismatch";
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j) {
      const Real x = Real(float(actual(i, j))), y = expected(i, j);
      if (std::isfinite(x) != std::isfinite(y) || (std::isnan(x) != std::isnan(y)))
        return ::testing::AssertionFailure() << "non-finite mismatch at (" << i << ", " << j << "): " << x << " vs "
                                             << y;
    }
  Index row = 0, col = 0;
  const Real err = max_abs_error(actual.template cast<float>(), expected, &row, &col);
  const Real err_naive = max_abs_error(naive, expected);
  Real largest = 1;
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j)
      if (std::isfinite(expected(i, j))) largest = std::max(largest, std::fabs(expected(i, j)));
  const Real bound = 2 * err_naive + 4 * Real(std::numeric_limits<float>::epsilon()) * largest;
  if (err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << double(err) << " at (" << row << ", " << col
                                       << ") exceeds 2 x naive error " << double(err_naive) << " + floor (bound "
                                       << double(bound) << ")";
}

}  // namespace attend::test
