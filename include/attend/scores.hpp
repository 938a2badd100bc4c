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

/// Scaled dot product: s_ij = <scale q_i, k_j>. The scale multiplies the queries before the dot
/// products, as the blocked path's packing (detail/packing.hpp) and the decode step do, so every
/// path forms the same products: a score that is finite stays finite when <q_i, k_j> alone is
/// not (q = k = [2e19] with scale 1e-10 in float: 4e28, where scaling afterwards gave inf * 1e-10).
/// The scaled rows are one copy of the query rows per call, 1/Bk of the product's work.
template <class T>
struct ScaledDot {
  T scale;

  template <class Q, class K, class S>
  void operator()(const Q& q, const K& k, S&& s) const {  // q (Bq, Dk), k (Bk, Dk), s (Bq, Bk)
    // Evaluated first: a product of `scale * q` would take the factor out and apply it last.
    const Matrix<T> scaled_q = scale * q;  // (Bq, Dk)
    serial_product(s, scaled_q, k.transpose());
  }
};

}  // namespace attend::detail
