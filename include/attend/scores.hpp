// SPDX-License-Identifier: MIT
/// \file scores.hpp
/// \brief Score policies: how a tile of scores S = score(Q rows, K rows) is computed.
///
/// A score policy is a small value with
///   `void operator()(q_rows, k_rows, S) const`   // S (rows of Q, rows of K) = score
/// Masks and the softmax then act on S the same way for every policy, so a new kind of score
/// is a new policy, not a new kernel.
#pragma once

#include "detail/parallel.hpp"
#include "types.hpp"

namespace attend::detail {

/// Scaled dot product: s_ij = scale * <q_i, k_j>.
template <class T>
struct ScaledDot {
  T scale;

  template <class Q, class K, class S>
  void operator()(const Q& q, const K& k, S&& s) const {  // q (Bq, Dk), k (Bk, Dk), s (Bq, Bk)
    serial_product(s, q, k.transpose());
    s *= scale;
  }
};

}  // namespace attend::detail
