// SPDX-License-Identifier: MIT
/// \file attention/materialized.hpp
/// \brief The materialized execution path: S whole, softmax, then P V.
#pragma once

#include "../masks.hpp"
#include "../softmax.hpp"
#include "../types.hpp"
#include "../detail/parallel.hpp"

#include <algorithm>
#include <limits>

namespace attend::detail {

/// Query rows per task of the materialized path (fixed: results do not depend on the thread count).
inline constexpr Index kMaterializedRows = 64;

/// out = softmax(score(Q, K) masked) V, forming the whole (Lq, Lk) score matrix in `weights`,
/// which holds the softmax weights afterwards. Blocks of kMaterializedRows query rows run in
/// parallel, each with serial products (see detail/parallel.hpp).
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
  if (num_queries == 0) return;  // (and no block of an empty matrix at an offset)
  // Only the keys some query may see are read (key padding is never touched); the others get
  // weight 0.
  const KeyRange keys = mask.keys(0, num_queries);
  const Index count = keys.end - keys.begin;
  weights.leftCols(keys.begin).setZero();
  weights.rightCols(num_keys - keys.end).setZero();
  const auto k_seen = k.middleRows(keys.begin, count), v_seen = v.middleRows(keys.begin, count);
  parallel_for((num_queries + kMaterializedRows - 1) / kMaterializedRows, [&](Index block) {
    const Index q0 = block * kMaterializedRows, rows = std::min(kMaterializedRows, num_queries - q0);
    auto s = weights.block(q0, keys.begin, rows, count);  // (rows, count)
    score(q.middleRows(q0, rows), k_seen, s);
    switch (mask.classify(q0, q0 + rows, keys.begin, keys.end)) {
      case TileKind::Empty: s.setConstant(-std::numeric_limits<T>::infinity()); break;
      case TileKind::Partial: apply_mask(mask, s, q0, keys.begin); break;
      case TileKind::Full: break;
    }
    softmax_rows_inplace<T>(s, lse.size() != 0 ? VectorRef<T>(lse.segment(q0, rows)) : lse);
    serial_product(out.middleRows(q0, rows), s, v_seen);
  });
}

}  // namespace attend::detail
