// SPDX-License-Identifier: MIT
// The plainest same-precision attention (Eigen GEMM, two-pass softmax, boolean masks), whose
// error against the reference measures how well-conditioned an input is (the "err_base" of
// the tolerance rule). It shares no code with the library.
#pragma once

#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace attend::test {

template <class T>
struct Baseline {
  Matrix<T> output;   // (Lq, Dv)
  Vector<T> lse;      // (Lq)
  Matrix<T> weights;  // (Lq, Lk)
};

template <class T, class Q, class K, class V>
Baseline<T> baseline_attention(const Q& q, const K& k, const V& v, T scale, const BoolMatrix& visible,
                               const std::optional<RealMatrix>& bias = std::nullopt) {
  Matrix<T> s = scale * (q * k.transpose());
  if (bias) s += bias->template cast<T>();
  Vector<T> lse(q.rows());
  for (Index i = 0; i < s.rows(); ++i) {
    T m = -std::numeric_limits<T>::infinity();
    for (Index j = 0; j < s.cols(); ++j)
      if (visible(i, j)) m = std::isnan(s(i, j)) || std::isnan(m) ? std::numeric_limits<T>::quiet_NaN() : std::max(m, s(i, j));
    T sum = 0;
    for (Index j = 0; j < s.cols(); ++j) {
      s(i, j) = (visible(i, j) && m != -std::numeric_limits<T>::infinity()) ? std::exp(s(i, j) - m) : T(0);
      sum += s(i, j);
    }
    if (sum > 0) s.row(i) /= sum;
    lse(i) = sum > 0 ? m + std::log(sum) : -std::numeric_limits<T>::infinity();
  }
  Matrix<T> out = s * v;
  return {out, lse, s};
}

}  // namespace attend::test
