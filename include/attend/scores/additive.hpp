// SPDX-License-Identifier: MIT
/// \file scores/additive.hpp
/// \brief Additive (Bahdanau) score policy on projected rows: s_ij = v^T tanh(qp_i + kp_j).
#pragma once

#include "../types.hpp"

namespace attend::detail {

/// Additive score of rows that are already projected: `q` holds qp_i = W_q q_i + b and `k`
/// holds kp_j = W_k k_j, both with h columns, and
///   s_ij = sum_c v_c tanh(qp_ic + kp_jc).
/// Each score is one vectorized pass over the h columns, so a tile of scores needs no
/// (rows, cols, h) scratch: the whole call holds O(tile) memory beyond the projections.
template <class T>
struct AdditiveScore {
  Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>> v;  // (1, h)

  template <class Q, class K, class S>
  void operator()(const Q& q, const K& k, S&& s) const {  // q (Bq, h), k (Bk, h), s (Bq, Bk)
    for (Index i = 0; i < q.rows(); ++i) {
      const auto q_row = q.row(i);
      for (Index j = 0; j < k.rows(); ++j) s(i, j) = (q_row + k.row(j)).array().tanh().matrix().dot(v);
    }
  }
};

}  // namespace attend::detail
