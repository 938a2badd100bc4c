// SPDX-License-Identifier: MIT
/// \file attention/blocked.hpp
/// \brief The blocked execution path: tiles of Q against tiles of K/V with an online softmax.
#pragma once

#include "../masks.hpp"
#include "../online_softmax.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "../detail/parallel.hpp"

#include <algorithm>
#include <string>

namespace attend::detail {

/// Rows of Q and of K/V per tile.
struct TileShape {
  Index queries;
  Index keys;
};

inline constexpr TileShape kDefaultTiles{64, 256};

/// The tile shape of the options, defaulting to kDefaultTiles; a negative size throws.
inline TileShape resolve_tiles(const AttentionOptions& options) {
  ATTEND_CHECK(options.block_q >= 0 && options.block_k >= 0,
               "block sizes (block_q=" + std::to_string(options.block_q) + ", block_k=" +
                   std::to_string(options.block_k) + ") must be positive, or 0 for the default");
  return {options.block_q > 0 ? options.block_q : kDefaultTiles.queries,
          options.block_k > 0 ? options.block_k : kDefaultTiles.keys};
}

/// Per-thread scratch of the blocked path, allocated once and reused for every tile:
/// scores (Bq, Bk) | accumulator (Bq, Dv) | softmax state (Bq).
template <class T>
struct BlockedScratch {
  BlockedScratch(TileShape tiles, Index value_dim)
      : scores(tiles.queries, tiles.keys), acc(tiles.queries, value_dim), softmax(tiles.queries) {}

  /// Bytes held, for benchmarks' memory reports.
  static Index bytes(TileShape tiles, Index /*key_dim*/, Index value_dim) {
    return Index(sizeof(T)) * (tiles.queries * tiles.keys + tiles.queries * value_dim + 2 * tiles.queries);
  }

  Matrix<T> scores;
  Matrix<T> acc;
  OnlineSoftmax<T> softmax;
};

/// One tile of query rows [q0, q0 + rows): visits only the key tiles the mask can see, skips
/// empty ones, masks only partial ones, and writes the normalized rows of `out` and `lse`.
template <class T, class Score, class BoundMask>
void blocked_query_tile(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                        const Score& score, const BoundMask& mask, TileShape tiles, Index q0, Index rows,
                        MatrixRef<T> out, VectorRef<T> lse, BlockedScratch<T>& scratch) {
  const Index q1 = q0 + rows;
  auto acc = scratch.acc.topRows(rows);  // (rows, Dv)
  acc.setZero();
  scratch.softmax.reset(rows);
  const KeyRange visible = mask.keys(q0, q1);
  for (Index k0 = visible.begin; k0 < visible.end; k0 += tiles.keys) {
    const Index cols = std::min(tiles.keys, visible.end - k0), k1 = k0 + cols;
    const TileKind kind = mask.classify(q0, q1, k0, k1);
    if (kind == TileKind::Empty) continue;
    auto s = scratch.scores.topLeftCorner(rows, cols);  // (rows, cols)
    score(q.middleRows(q0, rows), k.middleRows(k0, cols), s);
    if (kind == TileKind::Partial) mask.apply(s, q0, k0);
    scratch.softmax.update(s, acc);
    acc.noalias() += s * v.middleRows(k0, cols);
  }
  VectorRef<T> tile_lse = lse.size() != 0 ? VectorRef<T>(lse.segment(q0, rows)) : lse;
  scratch.softmax.finalize(acc, out.middleRows(q0, rows), tile_lse);
}

/// out = softmax(score(Q, K) masked) V without forming more than one (Bq, Bk) tile of S per
/// thread. Query tiles run in parallel; each is computed the same way whatever the thread
/// count, so results are bitwise independent of it.
///
/// \param q   (Lq, Dk)
/// \param k   (Lk, Dk)
/// \param v   (Lk, Dv)
/// \param out (Lq, Dv)
/// \param lse (Lq) log-sum-exp per row, or empty
template <class T, class Score, class BoundMask>
void blocked_attention(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                       const Score& score, const BoundMask& mask, TileShape tiles, MatrixRef<T> out,
                       VectorRef<T> lse) {
  const Index num_tiles = (q.rows() + tiles.queries - 1) / tiles.queries;
  parallel_for_with_scratch(
      num_tiles, [&] { return BlockedScratch<T>(tiles, v.cols()); },
      [&](Index tile, BlockedScratch<T>& scratch) {
        const Index q0 = tile * tiles.queries;
        blocked_query_tile<T>(q, k, v, score, mask, tiles, q0, std::min(tiles.queries, q.rows() - q0), out, lse,
                              scratch);
      });
}

}  // namespace attend::detail
