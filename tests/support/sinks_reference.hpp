// SPDX-License-Identifier: MIT
// Learned attention sinks (gpt-oss) written from their formula in long double, for one head
//   p_ij = e^(x_ij) / (e^s + sum_j' e^(x_ij')),  o_i = sum_j p_ij v_j,  lse_i = log(e^s + sum_j e^(x_ij)),
// x_ij = scale <q_i, k_j> over the visible keys, and for a multi-head layer with projections
// (project, rotate, attend per head with its sink, concatenate, out-project); with the plain
// same-precision baseline merged with its sink in T, the baseline of the tolerance rule. Shares no
// code with the library.
#pragma once

#include "baseline.hpp"
#include "multi_head_reference.hpp"
#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace attend::test {

/// One head's expected result with a sink, and its baseline.
template <class T>
struct SinkExpected {
  RealMatrix output;   // (Lq, Dv)
  RealVector lse;      // (Lq)
  RealMatrix weights;  // (Lq, Lk): rows sum to 1 - e^(s - lse_i)
  Matrix<T> base_output;
  Vector<T> base_lse;
  Matrix<T> base_weights;
};

/// The formula above for q (Lq, d), k (Lk, d), v (Lk, dv) in long double (q, k, v) and the
/// baseline on (qt, kt, vt) in T. A row that sees no key gets zeros and lse = s.
template <class T>
SinkExpected<T> sink_attention(const RealMatrix& q, const RealMatrix& k, const RealMatrix& v, const Matrix<T>& qt,
                               const Matrix<T>& kt, const Matrix<T>& vt, Real scale, Real sink,
                               const BoolMatrix& visible) {
  const Index lq = q.rows(), lk = k.rows();
  SinkExpected<T> e{RealMatrix::Zero(lq, v.cols()), RealVector(lq), RealMatrix::Zero(lq, lk), {}, {}, {}};
  for (Index i = 0; i < lq; ++i) {
    Real m = sink;  // a shift for the exponentials (the result does not depend on it)
    RealVector x = RealVector::Constant(lk, -std::numeric_limits<Real>::infinity());
    for (Index j = 0; j < lk; ++j)
      if (visible(i, j)) {
        x(j) = scale * q.row(i).dot(k.row(j));
        m = std::max(m, x(j));
      }
    if (m == -std::numeric_limits<Real>::infinity()) {  // no key and no sink
      e.lse(i) = m;
      continue;
    }
    Real denominator = std::exp(sink - m);
    for (Index j = 0; j < lk; ++j) denominator += std::exp(x(j) - m);
    for (Index j = 0; j < lk; ++j) e.weights(i, j) = std::exp(x(j) - m) / denominator;
    e.output.row(i) = e.weights.row(i) * v;
    e.lse(i) = m + std::log(denominator);
  }
  const Baseline<T> base = baseline_attention<T>(qt, kt, vt, T(scale), visible);
  e.base_output = base.output;
  e.base_weights = base.weights;
  e.base_lse = base.lse;
  const T s = T(sink);
  for (Index i = 0; i < lq; ++i) {
    const T b = base.lse(i);
    if (b == -std::numeric_limits<T>::infinity()) {  // no key: zeros, and the sink's lse
      e.base_lse(i) = s;
      continue;
    }
    const T f = T(1) / (T(1) + std::exp(s - b));
    e.base_output.row(i) *= f;
    e.base_weights.row(i) *= f;
    e.base_lse(i) = std::max(b, s) + std::log1p(std::exp(-std::abs(b - s)));
  }
  return e;
}

/// One head of T matrices: sink_attention on their long-double copies and on themselves.
template <class T>
SinkExpected<T> sink_attention(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Real scale, Real sink,
                               const BoolMatrix& visible) {
  return sink_attention<T>(q.template cast<Real>(), k.template cast<Real>(), v.template cast<Real>(), q, k, v, scale,
                           sink, visible);
}

/// A multi-head layer of weights `w` with sinks (H) (and rotary positions `rotary`, when
/// given) on query (Lq, E_q) over key (Lk, E_k) and value (Lk, E_v) with the visibility
/// `visible`, as expected_mha computes it without sinks; weights per head.
template <class T>
Expected<T> expected_mha_with_sinks(const Shape& s, const MultiHeadWeights<T>& w, const Matrix<T>& query,
                                    const Matrix<T>& key, const Matrix<T>& value, const BoolMatrix& visible,
                                    const Vector<T>& sinks, const RotarySpec* rotary = nullptr) {
  const Real scale = 1 / std::sqrt(Real(s.d));
  return expected_mha_per_head<T>(s, w, query, key, value, rotary,
                                  [&](Index h, const RealMatrix& q, const RealMatrix& k, const RealMatrix& v,
                                      const Matrix<T>& qt, const Matrix<T>& kt, const Matrix<T>& vt) {
                                    return sink_attention<T>(q, k, v, qt, kt, vt, scale, Real(sinks(h)), visible);
                                  });
}

}  // namespace attend::test
