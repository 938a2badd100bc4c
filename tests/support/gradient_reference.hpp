// SPDX-License-Identifier: MIT
// The oracle of the backward: analytic gradients of attention by scalar loops in long double,
// from the definitions (the forward recomputed in long double, softmax's Jacobian written out),
// and the naive same-precision baseline whose error sets the tolerance of the gradients. Shares
// no code with the library.
//
// Forward, for the visible keys j of query i:
//   z_ij = scale <q_i, k_j>,  s_ij = cap tanh(z_ij / cap) (or z_ij without a cap) + bias_ij,
//   p_ij = softmax_j(s_ij),   o_i = sum_j p_ij v_j.
// Backward at dO:
//   dv_j = sum_i p_ij do_i,   dp_ij = <do_i, v_j>,   ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'),
//   dz_ij = ds_ij (1 - tanh^2(z_ij / cap)),  dq_i = scale sum_j dz_ij k_j,  dk_j = scale sum_i dz_ij q_i.
// Hidden keys have p = ds = 0; a query that sees no key has zero gradients.
//
// Tolerance of a gradient (FlashAttention's rule for its backward), gradient_within_tolerance,
// the one helper of every backward test (additive_gradient_reference.hpp's included): the error
// against the reference may be at most 3 times the error of the naive same-precision
// implementation (here: whole matrices, Eigen products, the two-pass softmax of baseline.hpp),
// plus the rounding of the saved log-sum-exp that weights recomputed from it carry.
#pragma once

#include "baseline.hpp"
#include "reference.hpp"
#include "tolerance.hpp"

#include <attend/types.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>

namespace attend::test {

template <class S>
struct Gradients {
  Matrix<S> dq, dk, dv;
  Matrix<S> ds;  // (Lq, Lk) dL/ds, the gradient of an additive bias
};

/// The long-double gradients, with the size of what they are summed from: for each entry the
/// sum of the magnitudes of its terms, p_ij (|dp_ij| + |D_i|) |k_jx| for dq (and so on), and
/// the largest |lse_i|. The error of a gradient built on P = exp(S - lse) grows with both.
struct RealGradients : Gradients<Real> {
  RealMatrix dq_terms, dk_terms, dv_terms;
  Real max_abs_lse = 0;
};

/// The score options of the reference: scale, optional soft cap and bias.
struct GradientCase {
  Real scale = 1;
  std::optional<Real> cap;
  std::optional<RealMatrix> bias;
};

/// The long-double gradients of attention(q, k, v) at d_out.
template <class Q, class K, class V, class DO>
RealGradients reference_gradients(const Q& q, const K& k, const V& v, const DO& d_out, const BoolMatrix& visible,
                                  const GradientCase& c) {
  const Index lq = q.rows(), lk = k.rows(), dk = q.cols(), dv = v.cols();
  RealGradients g;
  g.dq = g.dq_terms = RealMatrix::Zero(lq, dk);
  g.dk = g.dk_terms = RealMatrix::Zero(lk, dk);
  g.dv = g.dv_terms = RealMatrix::Zero(lk, dv);
  g.ds = RealMatrix::Zero(lq, lk);
  RealMatrix slope = RealMatrix::Ones(lq, lk), s = RealMatrix::Zero(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    Real row_max = -std::numeric_limits<Real>::infinity();
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      Real z = 0;
      for (Index x = 0; x < dk; ++x) z += Real(q(i, x)) * Real(k(j, x));
      z *= c.scale;
      if (c.cap) {
        const Real t = std::tanh(z / *c.cap);
        slope(i, j) = 1 - t * t;
        z = *c.cap * t;
      }
      s(i, j) = z + (c.bias ? (*c.bias)(i, j) : Real(0));
      row_max = std::isnan(s(i, j)) || std::isnan(row_max) ? std::numeric_limits<Real>::quiet_NaN()
                                                           : std::max(row_max, s(i, j));
    }
    if (row_max == -std::numeric_limits<Real>::infinity()) continue;  // sees nothing
    RealVector p = RealVector::Zero(lk);
    Real sum = 0;
    for (Index j = 0; j < lk; ++j)
      if (visible(i, j)) sum += p(j) = std::exp(s(i, j) - row_max);
    p /= sum;
    if (std::isfinite(row_max + std::log(sum)))
      g.max_abs_lse = std::max(g.max_abs_lse, std::fabs(row_max + std::log(sum)));
    RealVector dp = RealVector::Zero(lk);
    Real d = 0;
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      for (Index x = 0; x < dv; ++x) dp(j) += Real(d_out(i, x)) * Real(v(j, x));
      d += p(j) * dp(j);
    }
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      g.ds(i, j) = p(j) * (dp(j) - d);
      const Real dz = g.ds(i, j) * slope(i, j), dz_terms = p(j) * (std::fabs(dp(j)) + std::fabs(d)) * slope(i, j);
      for (Index x = 0; x < dv; ++x) {
        g.dv(j, x) += p(j) * Real(d_out(i, x));
        g.dv_terms(j, x) += p(j) * std::fabs(Real(d_out(i, x)));
      }
      for (Index x = 0; x < dk; ++x) {
        g.dq(i, x) += c.scale * dz * Real(k(j, x));
        g.dk(j, x) += c.scale * dz * Real(q(i, x));
        g.dq_terms(i, x) += c.scale * dz_terms * std::fabs(Real(k(j, x)));
        g.dk_terms(j, x) += c.scale * dz_terms * std::fabs(Real(q(i, x)));
      }
    }
  }
  return g;
}

/// The naive same-precision gradients: the baseline forward's weights, whole-matrix Eigen
/// products, D from its own output.
template <class T, class Q, class K, class V, class DO>
Gradients<T> baseline_gradients(const Q& q, const K& k, const V& v, const DO& d_out, const BoolMatrix& visible,
                                const GradientCase& c) {
  const Matrix<T> qt = q, kt = k, vt = v, dot = d_out;
  const T scale = T(c.scale);
  Matrix<T> z = scale * (qt * kt.transpose()), slope = Matrix<T>::Ones(q.rows(), k.rows());
  if (c.cap) {
    const T cap = T(*c.cap);
    const Matrix<T> t = (z.array() / cap).tanh().matrix();
    slope = (T(1) - t.array().square()).matrix();
    z = cap * t;
  }
  if (c.bias) z += c.bias->template cast<T>();
  // Softmax of z over the visible keys, two passes (baseline.hpp with unit scale and no bias).
  Matrix<T> p = z;
  for (Index i = 0; i < p.rows(); ++i) {
    T m = -std::numeric_limits<T>::infinity();
    for (Index j = 0; j < p.cols(); ++j)
      if (visible(i, j))
        m = std::isnan(p(i, j)) || std::isnan(m) ? std::numeric_limits<T>::quiet_NaN() : std::max(m, p(i, j));
    T sum = 0;
    for (Index j = 0; j < p.cols(); ++j) {
      p(i, j) = (visible(i, j) && m != -std::numeric_limits<T>::infinity()) ? std::exp(p(i, j) - m) : T(0);
      sum += p(i, j);
    }
    if (sum > 0) p.row(i) /= sum;
  }
  const Matrix<T> out = p * vt;
  Gradients<T> g;
  g.dv = p.transpose() * dot;
  const Matrix<T> dp = dot * vt.transpose();
  const Vector<T> d = (dot.array() * out.array()).rowwise().sum();
  g.ds = (p.array() * (dp.colwise() - d).array()).matrix();
  for (Index i = 0; i < p.rows(); ++i)
    for (Index j = 0; j < p.cols(); ++j)
      if (p(i, j) == T(0)) g.ds(i, j) = 0;
  const Matrix<T> dz = (g.ds.array() * slope.array()).matrix();
  g.dq = scale * (dz * kt);
  g.dk = scale * (dz.transpose() * qt);
  return g;
}

/// FlashAttention's rule for a gradient, the one tolerance of every backward test: after the
/// non-finite entries agree (same positions, same class),
///   max error <= 3 err_base + 4 eps (1 + max|lse|) size,
/// err_base the error of the naive same-precision baseline against the long-double `expected`.
/// `size_or_terms` gives `size`: a number (at least 1), or a matrix of the sizes of what each
/// entry sums (RealGradients' terms), whose largest finite entry (at least 1) is taken. The
/// second part is the rounding of the saved log-sum-exp, eps |lse| relative in every recomputed
/// weight, which the baseline (weights normalized by their own sum) does not have; it matters
/// where a gradient is a cancelling sum (dS sums to zero over each row), and it keeps a baseline
/// that happens to be exact (P = 1 for a row that sees one key) from demanding an exact result.
template <class T, class A, class B, class C, class M>
::testing::AssertionResult gradient_within_tolerance(const A& actual, const B& expected, const C& baseline,
                                                     const M& size_or_terms, Real max_abs_lse) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape (" << actual.rows() << " x " << actual.cols() << ") != expected ("
                                         << expected.rows() << " x " << expected.cols() << ")";
  Real size = 1;
  if constexpr (std::is_arithmetic_v<M>) size = std::max(Real(1), Real(size_or_terms));
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j) {
      const Real x = Real(actual(i, j)), y = Real(expected(i, j));
      if (std::isnan(x) != std::isnan(y) || ((std::isinf(x) || std::isinf(y)) && x != y))
        return ::testing::AssertionFailure()
               << "non-finite mismatch at (" << i << ", " << j << "): " << x << " vs expected " << y;
      if constexpr (!std::is_arithmetic_v<M>)
        if (std::isfinite(Real(size_or_terms(i, j)))) size = std::max(size, Real(size_or_terms(i, j)));
    }
  const Real eps = std::numeric_limits<T>::epsilon();
  const Real err_base = max_abs_error(baseline, expected);
  const Real bound = 3 * err_base + 4 * eps * (1 + max_abs_lse) * size;
  Index wi = 0, wj = 0;
  const Real err = max_abs_error(actual, expected, &wi, &wj);
  if (err <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max error " << err << " at (" << wi << ", " << wj
                                       << ") = " << Real(actual(wi, wj)) << " vs " << Real(expected(wi, wj))
                                       << " exceeds bound " << bound << " (baseline error " << err_base << ", size "
                                       << size << ", max |lse| " << max_abs_lse << ")";
}

/// dq, dk and dv against the reference with gradient_within_tolerance.
template <class T, class G>
void expect_gradients_match(const G& g, const RealGradients& ref, const Gradients<T>& base) {
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dq, ref.dq, base.dq, ref.dq_terms, ref.max_abs_lse)) << "dq";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dk, ref.dk, base.dk, ref.dk_terms, ref.max_abs_lse)) << "dk";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dv, ref.dv, base.dv, ref.dv_terms, ref.max_abs_lse)) << "dv";
}

}  // namespace attend::test
