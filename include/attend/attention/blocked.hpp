// SPDX-License-Identifier: MIT
/// \file attention/blocked.hpp
/// \brief The blocked execution path: tiles of Q against tiles of K/V with an online softmax.
///
/// For each tile of Bq query rows, the key tiles the mask can see are visited in order; each
/// (Bq, Bk) tile of scores is masked if partial, folded into a running max m, sum l and
/// unnormalized output acc (rescaled by exp(m_old - m_new) when m grows), and the output is
/// normalized once at the end: out = acc / l, lse = m + log l (Milakov & Gimelshein 2018;
/// Dao et al., FlashAttention). The arithmetic lives in detail/tile_kernels.hpp.
#pragma once

#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../detail/packet.hpp"
#include "../detail/packing.hpp"
#include "../detail/parallel.hpp"
#include "../detail/tile_kernels.hpp"

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

namespace attend::detail {

/// Rows of Q and of K/V per tile.
struct TileShape {
  Index queries;
  Index keys;
};

/// 64 query rows fill the score kernel's register block with AVX-512 floats (4 packets of 16);
/// 256 keys amortize the per-tile softmax bookkeeping and keep a tile of S^T in L2.
inline constexpr TileShape kDefaultTiles{64, 256};

/// The tile shape of the options, defaulting to kDefaultTiles; a negative size throws.
inline TileShape resolve_tiles(const AttentionOptions& options) {
  ATTEND_CHECK(options.block_q >= 0 && options.block_k >= 0,
               "block sizes (block_q=" + std::to_string(options.block_q) + ", block_k=" +
                   std::to_string(options.block_k) + ") must be positive, or 0 for the default");
  return {options.block_q > 0 ? options.block_q : kDefaultTiles.queries,
          options.block_k > 0 ? options.block_k : kDefaultTiles.keys};
}

/// The tile shape of the options for an (Lq, Lk) problem: each side at most the problem's (and
/// at least 1). A tile larger than the problem is the whole problem: tiles are cut at the
/// problem's edge anyway, so the results are the same, while the scratch and every size derived
/// from a tile (Lq + Bq - 1, rows rounded up to packets) stay within the problem's and never
/// overflow, whatever the options hold (block_q = INT64_MAX included).
inline TileShape resolve_tiles(const AttentionOptions& options, Index num_queries, Index num_keys) {
  const TileShape requested = resolve_tiles(options);
  return {std::min(requested.queries, std::max(num_queries, Index(1))),
          std::min(requested.keys, std::max(num_keys, Index(1)))};
}

/// Score policies with s_ij = scale <q_i, k_j> take the fast path: `scale` is folded into the
/// packed query tile and the register-blocked kernels form the scores, reading K in place. Any
/// other policy is called as score(q_rows, k_rows, S) on the tile (S a transposed view of the
/// scratch). A dot-family policy that transforms only Q can specialize this after folding its
/// transform into the packing; one that transforms K needs K packed per head first.
template <class Score>
struct is_dot_product_score : std::false_type {};

template <class T>
struct is_dot_product_score<ScaledDot<T>> : std::true_type {};

/// Per-thread scratch of the blocked path, allocated once and reused for every tile. With
/// lanes = Bq rounded up to whole packets:
///   qt     (Dk, lanes)  scaled queries of the tile, transposed (fast path only)
///   scores (Bk, lanes)  S^T of one tile, then P^T
///   acc    (Bq, Dv)     unnormalized output
///   state  (3, lanes)   running max m, running sum l, rescale factor alpha
template <class T>
struct BlockedScratch {
  BlockedScratch(TileShape tiles, Index key_dim, Index value_dim)
      : qt(key_dim, round_up_to_lanes<T>(tiles.queries)),
        // Zero, so that padding lanes stay finite under policies that write only valid lanes.
        scores(Matrix<T>::Zero(tiles.keys, round_up_to_lanes<T>(tiles.queries))),
        acc(tiles.queries, value_dim),
        state(3, round_up_to_lanes<T>(tiles.queries)) {}

  /// Bytes held, for benchmarks' memory reports.
  static Index bytes(TileShape tiles, Index key_dim, Index value_dim) {
    const Index lanes = round_up_to_lanes<T>(tiles.queries);
    return Index(sizeof(T)) * ((key_dim + tiles.keys + 3) * lanes + tiles.queries * value_dim);
  }

  T* max() { return state.row(0).data(); }
  T* sum() { return state.row(1).data(); }
  T* alpha() { return state.row(2).data(); }

  Matrix<T> qt;
  Matrix<T> scores;
  Matrix<T> acc;
  Matrix<T> state;
};

/// One tile of query rows [q0, q0 + rows): visits only the key tiles the mask can see, skips
/// empty ones, masks only partial ones, and writes the normalized rows of `out` and `lse`.
/// Q, K and V are stored as S and computed in T = accumulator_t<S> (see tile_kernels.hpp); a
/// score policy other than a scaled dot product takes T matrices (S = T).
template <class T, class S = T, class O = T, class Score, class BoundMask>
void blocked_query_tile(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                        const ConstMatrixRef<identity_t<S>>& v, const Score& score, const BoundMask& mask,
                        TileShape tiles, Index q0, Index rows, MatrixRef<identity_t<O>> out, VectorRef<T> lse, BlockedScratch<T>& scratch) {
  static_assert(std::is_same_v<T, accumulator_t<S>>);
  static_assert(is_dot_product_score<Score>::value || std::is_same_v<S, T>,
                "attend: score policies other than the scaled dot product compute on float or double matrices");
  const Index q1 = q0 + rows, lanes = round_up_to_lanes<T>(rows), stride = scratch.scores.outerStride();
  auto acc = scratch.acc.topRows(rows);  // (rows, Dv)
  acc.setZero();
  scratch.state.row(0).setConstant(-std::numeric_limits<T>::infinity());
  scratch.state.row(1).setZero();
  if constexpr (is_dot_product_score<Score>::value)
    pack_scaled_queries<T, S>(q.middleRows(q0, rows), score.scale, scratch.qt);

  const KeyRange visible = mask.keys(q0, q1);
  for (Index k0 = visible.begin; k0 < visible.end; k0 += tiles.keys) {
    const Index cols = std::min(tiles.keys, visible.end - k0), k1 = k0 + cols;
    const TileKind kind = mask.classify(q0, q1, k0, k1);
    if (kind == TileKind::Empty) continue;
    // Keys of this tile, relative to k0, that query lanes [i0, i1) of the tile may see: the
    // kernels skip the rest of a partial tile (a causal diagonal, the edges of a window).
    const auto seen_by = [&](Index i0, Index i1) {
      if (kind == TileKind::Full) return KeyRange{0, cols};
      if (std::min(i1, rows) <= i0) return KeyRange{0, 0};
      const KeyRange seen = mask.keys(q0 + i0, q0 + std::min(i1, rows));
      return KeyRange{std::clamp(seen.begin - k0, Index(0), cols), std::clamp(seen.end - k0, Index(0), cols)};
    };
    auto st = scratch.scores.topLeftCorner(cols, rows);  // (cols, rows) = S^T
    if constexpr (is_dot_product_score<Score>::value)
      score_tile<T, S>(k.middleRows(k0, cols), scratch.qt.data(), scratch.qt.outerStride(), lanes, st.data(), stride,
                    seen_by);
    else if constexpr (std::is_same_v<S, T>)
      score(q.middleRows(q0, rows), k.middleRows(k0, cols), st.transpose());
    if (kind == TileKind::Partial) apply_mask(mask, st.transpose(), q0, k0);
    online_softmax_step<T>(st.data(), stride, cols, lanes, scratch.max(), scratch.sum(), scratch.alpha());
    value_tile<T, S>(st.data(), stride, v.middleRows(k0, cols), scratch.alpha(), acc, seen_by);
  }
  VectorRef<T> tile_lse = lse.size() != 0 ? VectorRef<T>(lse.segment(q0, rows)) : lse;
  finalize_rows<T, O>(acc, scratch.max(), scratch.sum(), out.middleRows(q0, rows), tile_lse);
}

/// out = softmax(score(Q, K) masked) V without forming more than one (Bq, Bk) tile of S per
/// thread. Query tiles run in parallel; each is computed the same way whatever the thread
/// count, so results are bitwise independent of it.
///
/// \param q   (Lq, Dk) stored as S
/// \param k   (Lk, Dk) stored as S
/// \param v   (Lk, Dv) stored as S
/// \param out (Lq, Dv) stored as O (S, or T for a full-precision output of reduced inputs)
/// \param lse (Lq) log-sum-exp per row in T, or empty
template <class T, class S = T, class O = T, class Score, class BoundMask>
void blocked_attention(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                       const ConstMatrixRef<identity_t<S>>& v, const Score& score, const BoundMask& mask,
                       TileShape tiles, MatrixRef<identity_t<O>> out, VectorRef<T> lse) {
  const Index num_tiles = (q.rows() + tiles.queries - 1) / tiles.queries;
  parallel_for_with_scratch(
      num_tiles, [&] { return BlockedScratch<T>(tiles, q.cols(), v.cols()); },
      [&](Index tile, BlockedScratch<T>& scratch) {
        const Index q0 = tile * tiles.queries;
        blocked_query_tile<T, S, O>(q, k, v, score, mask, tiles, q0, std::min(tiles.queries, q.rows() - q0), out,
                                    lse, scratch);
      });
}

}  // namespace attend::detail
