// SPDX-License-Identifier: MIT
/// \file attention/materialized.hpp
/// \brief The materialized execution path: S whole, softmax, then P V.
#pragma once

#include "../masks.hpp"
#include "../softmax.hpp"
#include "../types.hpp"

#include <limits>

namespace attend::detail {

/// out = softmax(score(Q, K) masked) V, forming the whole (Lq, Lk) score matrix in `weights`,
/// which holds the softmax weights afterwards.
///
/// \param q       (Lq, Dk)
/// \param k       (Lk, Dk)
/// \param v       (Lk, Dv)
/// \param out     (Lq, Dv)
/// \param lse     (Lq) log-sum-exp per row, or empty
/// \param weights (Lq, Lk) scratch for S, then the weights
template <class T, class Score, class BoundMask>
void materialized_attention(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                            const Score& score, const BoundMask& mask, MatrixRef<T> out, VectorRef<T> lse,
                            MatrixRef<T> weights) {
  const Index num_queries = q.rows(), num_keys = k.rows();
  // Only the keys some query may see are read (key padding is never touched); the others get
  // weight 0.
  const KeyRange keys = mask.keys(0, num_queries);
  const Index count = keys.end - keys.begin;
  weights.leftCols(keys.begin).setZero();
  weights.rightCols(num_keys - keys.end).setZero();
  auto s = weights.middleCols(keys.begin, count);  // (Lq, count)
  score(q, k.middleRows(keys.begin, count), s);
  switch (mask.classify(0, num_queries, keys.begin, keys.end)) {
    case TileKind::Empty: s.setConstant(-std::numeric_limits<T>::infinity()); break;
    case TileKind::Partial: mask.apply(s, 0, keys.begin); break;
    case TileKind::Full: break;
  }
  softmax_rows_inplace<T>(s, lse);
  out.noalias() = s * v.middleRows(keys.begin, count);
}

}  // namespace attend::detail
