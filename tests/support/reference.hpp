// SPDX-License-Identifier: MIT
// The test oracle: attention by scalar two-pass loops in long double, with masks given as
// plain booleans and an optional additive bias. It shares no code with the library.
#pragma once

#include <attend/types.hpp>

#include <cmath>
#include <limits>
#include <optional>

namespace attend::test {

using Real = long double;
using RealMatrix = Matrix<Real>;
using RealVector = Vector<Real>;

static_assert(std::numeric_limits<Real>::digits > 53,
              "the reference needs long double wider than double (x86-64 GCC/Clang)");

struct Reference {
  RealMatrix output;   // (Lq, Dv)
  RealVector lse;      // (Lq), -inf for a query that sees no key
  RealMatrix weights;  // (Lq, Lk)
};

/// out_i = sum_j p_ij v_j with p_ij = exp(s_ij - m_i) / sum_j' exp(s_ij' - m_i) over the visible
/// keys, s_ij = scale <q_i, k_j> + bias_ij. A query that sees no key gets zeros.
template <class Q, class K, class V>
Reference reference_attention(const Q& q, const K& k, const V& v, Real scale, const BoolMatrix& visible,
                              const std::optional<RealMatrix>& bias = std::nullopt) {
  const Index lq = q.rows(), lk = k.rows(), dk = q.cols(), dv = v.cols();
  Reference ref{RealMatrix::Zero(lq, dv), RealVector::Constant(lq, -std::numeric_limits<Real>::infinity()),
                RealMatrix::Zero(lq, lk)};
  for (Index i = 0; i < lq; ++i) {
    Real row_max = -std::numeric_limits<Real>::infinity();
    bool any = false;
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      Real dot = 0;
      for (Index c = 0; c < dk; ++c) dot += Real(q(i, c)) * Real(k(j, c));
      Real s = scale * dot;
      if (bias) s += (*bias)(i, j);
      ref.weights(i, j) = s;
      if (std::isnan(s) || std::isnan(row_max)) {
        row_max = std::numeric_limits<Real>::quiet_NaN();
      } else if (s > row_max) {
        row_max = s;
      }
      any = true;
    }
    if (!any || row_max == -std::numeric_limits<Real>::infinity()) {  // sees nothing: zeros
      ref.weights.row(i).setZero();
      continue;
    }
    Real sum = 0;
    for (Index j = 0; j < lk; ++j) {
      const Real p = visible(i, j) ? std::exp(ref.weights(i, j) - row_max) : Real(0);
      ref.weights(i, j) = p;
      sum += p;
    }
    ref.weights.row(i) /= sum;
    ref.lse(i) = row_max + std::log(sum);
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      for (Index c = 0; c < dv; ++c) ref.output(i, c) += ref.weights(i, j) * Real(v(j, c));
    }
  }
  return ref;
}

}  // namespace attend::test
