// SPDX-License-Identifier: MIT
// The accuracy rules of the reduced-precision and 8-bit KV caches (issue #12):
//  - stored(): the values a cache of format S holds for float rows (bf16/half rounded to nearest
//    even, q8_0 quantized per head in blocks of 32), on which the long-double reference is run;
//  - naive_attention<S>(): the plainest attention in precision S, FlashAttention's baseline, as a
//    framework's math path runs a bf16 (or half) model: q, k, v rounded to S, scores q k^T
//    accumulated in float and rounded to S, scaled and rounded to S, softmax in float with the
//    weights rounded to S, P V accumulated in float, the output rounded to S; its log-sum-exp is
//    that of the rounded scores, in float;
//  - within_rule<S>(): PASS iff max|O - O_ref| <= 2 err_naive + 8 eps_float max(1, max|O_ref|);
//  - q8_0_bound(): the a priori bound of a q8_0 cache's error from its quantization steps.
// It shares no code with the library except the q8_0 block rounding it documents
// (quantized.hpp), which defines what the cache stores.
#pragma once

#include <attend/quantized.hpp>

#include "reference.hpp"
#include "tolerance.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace attend::test {

/// The float values a cache of format S stores for the float rows x (kv_heads heads side by side).
template <class S>
Matrix<float> stored(const Matrix<float>& x, Index kv_heads) {
  if constexpr (std::is_same_v<S, Q8_0>) {
    const Index d = x.cols() / kv_heads, nb = detail::q8_blocks(d);
    Matrix<float> out(x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i)
      for (Index g = 0; g < kv_heads; ++g)
        for (Index b = 0; b < nb; ++b) {
          const Index c0 = g * d + b * detail::kQ8Block, n = std::min(detail::kQ8Block, d - b * detail::kQ8Block);
          BlockQ8_0 block;
          const Vector<float> values = x.row(i).segment(c0, n).transpose();
          detail::quantize_q8_0(values.data(), n, block);
          for (Index c = 0; c < n; ++c) out(i, c0 + c) = detail::dequantize_q8_0(block, c);
        }
    return out;
  } else {
    return x.template cast<S>().template cast<float>();
  }
}

/// The quantization step bound |x^ - x| <= step(x) of each value of x in a q8_0 cache:
/// s / 2 (1 + 2^-13), s = max|x| / 127 of its block (quantized.hpp).
inline Matrix<Real> q8_0_steps(const Matrix<float>& x, Index kv_heads) {
  const Index d = x.cols() / kv_heads;
  Matrix<Real> steps(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index g = 0; g < kv_heads; ++g)
      for (Index c0 = 0; c0 < d; c0 += detail::kQ8Block) {
        const Index n = std::min(detail::kQ8Block, d - c0);
        const Real amax = Real(x.row(i).segment(g * d + c0, n).cwiseAbs().maxCoeff());
        steps.row(i).segment(g * d + c0, n).setConstant(amax / 127 / 2 * (1 + std::ldexp(Real(1), -13)));
      }
  return steps;
}

struct NaiveResult {
  Matrix<float> output;  // (Lq, Dv), values of S
  Vector<float> lse;     // (Lq)
};

/// The naive attention in precision S (see the file comment) of one head.
template <class S>
NaiveResult naive_attention(const Matrix<float>& q, const Matrix<float>& k, const Matrix<float>& v, float scale,
                            const BoolMatrix& visible) {
  const auto round = [](float x) { return float(S(x)); };
  const Matrix<float> qs = q.unaryExpr(round), ks = k.unaryExpr(round), vs = v.unaryExpr(round);
  Matrix<float> s = (qs * ks.transpose()).unaryExpr(round);
  s = (scale * s).unaryExpr(round);
  NaiveResult r{Matrix<float>::Zero(q.rows(), v.cols()), Vector<float>(q.rows())};
  for (Index i = 0; i < s.rows(); ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (Index j = 0; j < s.cols(); ++j)
      if (visible(i, j)) m = std::max(m, s(i, j));
    if (m == -std::numeric_limits<float>::infinity()) {
      r.lse(i) = m;
      continue;
    }
    float sum = 0;
    Vector<float> p = Vector<float>::Zero(s.cols());
    for (Index j = 0; j < s.cols(); ++j)
      if (visible(i, j)) {
        p(j) = std::exp(s(i, j) - m);
        sum += p(j);
      }
    r.lse(i) = m + std::log(sum);
    p = (p / sum).unaryExpr(round);
    r.output.row(i) = (p.transpose() * vs).unaryExpr(round);
  }
  return r;
}

/// The rule of the file comment: actual against the long-double reference, with the naive
/// implementation's error as the baseline.
template <class A, class B, class C>
::testing::AssertionResult within_rule(const A& actual, const B& expected, const C& naive) {
  Real ref_max = 1;
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j)
      if (std::isfinite(Real(expected(i, j)))) ref_max = std::max(ref_max, std::fabs(Real(expected(i, j))));
  const Real err_naive = max_abs_error(naive, expected);
  const Real bound = 2 * err_naive + 8 * Real(std::numeric_limits<float>::epsilon()) * ref_max;
  Index wi = 0, wj = 0;
  const Real err = max_abs_error(actual, expected, &wi, &wj);
  if (err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << err << " at (" << wi << ", " << wj
                                       << ") exceeds 2 x the naive error " << err_naive << " + slack: " << bound;
}

/// Log-sum-exps within 1e-5 relative of the reference (and the same non-finite values).
template <class A, class B>
::testing::AssertionResult lse_within(const A& actual, const B& expected, Real relative = 1e-5) {
  for (Index i = 0; i < expected.size(); ++i) {
    const Real x = Real(actual(i)), y = Real(expected(i));
    if (!std::isfinite(y) ? x != y : std::fabs(x - y) > relative * std::max(Real(1), std::fabs(y)))
      return ::testing::AssertionFailure() << "lse " << x << " vs reference " << y << " at " << i;
  }
  return ::testing::AssertionSuccess();
}

/// The a priori bound of a q8_0 cache's error for one query row of one head, against the exact
/// attention of the unquantized rows: with score errors |s^_j - s_j| <= delta_j = scale
/// sum_c (|q_c| step(k_jc) + query_step (|k_jc| + step(k_jc))) <= delta (query_step: how far
/// the query, rounded to 8 bits, may move, in q's units; 0 for a float query), each weight
/// moves by a factor within e^(+-2 delta), so
///   |o^ - o| <= max_j step(v_jc) + (e^(2 delta) - 1) max_j |v_jc|   per column c,
///   |lse^ - lse| <= delta,
/// plus float rounding (8 eps max(1, |o|), and 1e-5 relative of the log-sum-exp).
struct Q8Bound {
  RealVector output;  // (Dv) per column
  Real lse;
};
inline Q8Bound q8_0_bound(const Matrix<float>& q_row, const Matrix<float>& k, const Matrix<float>& v,
                          const Matrix<Real>& k_steps, const Matrix<Real>& v_steps, Real scale,
                          const RealVector& ref_out, Real query_step = 0) {
  Real delta = 0;
  for (Index j = 0; j < k.rows(); ++j) {
    Real dj = 0;
    for (Index c = 0; c < k.cols(); ++c)
      dj += std::fabs(Real(q_row(0, c))) * k_steps(j, c) + query_step * (std::fabs(Real(k(j, c))) + k_steps(j, c));
    delta = std::max(delta, scale * dj);
  }
  Q8Bound b{RealVector(v.cols()), delta};
  for (Index c = 0; c < v.cols(); ++c) {
    const Real vmax = Real(v.col(c).cwiseAbs().maxCoeff()), step = v_steps.col(c).maxCoeff();
    b.output(c) = step + std::expm1(2 * delta) * vmax +
                  8 * Real(std::numeric_limits<float>::epsilon()) * std::max(Real(1), std::fabs(ref_out(c)));
  }
  return b;
}

}  // namespace attend::test
