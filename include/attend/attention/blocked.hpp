// SPDX-License-Identifier: MIT
/// \file attention/blocked.hpp
/// \brief The blocked execution path: tiles of Q against tiles of K/V with an online softmax.
///
/// For each tile of Bq query rows, the key tiles the mask can see are visited in order; each
/// (Bq, Bk) tile of scores is masked if partial, folded into a running max m, sum l and
/// unnormalized output acc (rescaled by exp(m_old - m_new) when m grows), and the output is
/// normalized once at the end: out = acc / l, lse = m + log l (Milakov & Gimelshein 2018;
/// Dao et al., FlashAttention). The arithmetic lives in detail/tile_kernels.hpp; for bf16 Q, K
/// and V on a target with AVX512-BF16, the scores and P V run on its dot-product instruction
/// (detail/bf16_kernels.hpp; see uses_bf16_dot_kernels).
#pragma once

#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../detail/bf16_kernels.hpp"
#include "../detail/packet.hpp"
#include "../detail/packing.hpp"
#include "../detail/parallel.hpp"
#include "../detail/tile_kernels.hpp"

#include <algorithm>
#include <cstdint>
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

/// The kernels of the fast path, chosen at compile time: bf16 Q, K and V with a scaled dot
/// product, on a target with AVX512-BF16 (and 16 float lanes), run the bf16 dot-product kernels
/// of bf16_kernels.hpp, whose one rounding point is P, rounded to bf16 before P V (the error
/// this adds is bounded there: at most 2^-8 of the largest |v| averaged). They need V in a
/// pair layout packed once per call, with key tiles starting on even keys: a call whose key
/// tile is odd (block_k) runs the portable kernels (tile_kernels.hpp), as every other
/// storage type, score and target does: K and V widened to float on load.
template <class S, class Score>
inline constexpr bool uses_bf16_dot_kernels = ATTEND_HAS_BF16_DOT_KERNELS && std::is_same_v<S, Eigen::bfloat16> &&
                                              is_dot_product_score<Score>::value && kLanes<float> == 16;

/// Whether a call of the blocked path with these tiles runs the bf16 dot-product kernels: it
/// then packs V with pack_value_pairs once and passes each head's pairs to blocked_query_tile.
template <class S, class Score>
bool runs_bf16_dot_kernels(TileShape tiles) {
  return uses_bf16_dot_kernels<S, Score> && tiles.keys % 2 == 0;
}

/// Per-thread scratch of the blocked path, allocated once and reused for every tile. With
/// lanes = Bq rounded up to whole packets:
///   qt     (Dk, lanes)         scaled queries of the tile, transposed (portable fast path only)
///   scores (Bk, lanes)         S^T of one tile, then P^T
///   acc    (Bq, Dv)            unnormalized output
///   state  (4, lanes)          running max m, running sum l, rescale factor alpha, the tile's max
/// and, with `pairs` (the bf16 dot-product kernels), in words of two bf16:
///   qt2    (ceil(Dk/2), lanes) the tile's queries in feature pairs
///   pt2    (ceil(Bk/2), lanes) P^T rounded to bf16, in key pairs
template <class T>
struct BlockedScratch {
  BlockedScratch(TileShape tiles, Index key_dim, Index value_dim, bool pairs = false)
      : qt(pairs ? 0 : key_dim, round_up_to_lanes<T>(tiles.queries)),
        // Zero, so that padding lanes stay finite under policies that write only valid lanes.
        scores(Matrix<T>::Zero(tiles.keys, round_up_to_lanes<T>(tiles.queries))),
        acc(tiles.queries, value_dim),
        state(4, round_up_to_lanes<T>(tiles.queries)),
        qt2(pairs ? (key_dim + 1) / 2 : 0, round_up_to_lanes<T>(tiles.queries)),
        pt2(pairs ? (tiles.keys + 1) / 2 : 0, round_up_to_lanes<T>(tiles.queries)) {}

  /// Bytes held, for benchmarks' memory reports.
  static Index bytes(TileShape tiles, Index key_dim, Index value_dim, bool pairs = false) {
    const Index lanes = round_up_to_lanes<T>(tiles.queries);
    const Index packed = pairs ? Index(sizeof(std::uint32_t)) * ((key_dim + 1) / 2 + (tiles.keys + 1) / 2) * lanes
                               : Index(sizeof(T)) * key_dim * lanes;
    return packed + Index(sizeof(T)) * ((tiles.keys + 4) * lanes + tiles.queries * value_dim);
  }

  T* max() { return state.row(0).data(); }
  T* sum() { return state.row(1).data(); }
  T* alpha() { return state.row(2).data(); }
  T* tile_max() { return state.row(3).data(); }

  Matrix<T> qt;
  Matrix<T> scores;
  Matrix<T> acc;
  Matrix<T> state;
  Matrix<std::uint32_t> qt2;
  Matrix<std::uint32_t> pt2;
};

/// One tile of query rows [q0, q0 + rows): visits only the key tiles the mask can see, skips
/// empty ones, masks only partial ones, and writes the normalized rows of `out` and `lse`.
/// Q, K and V are stored as S and computed in T = accumulator_t<S> (see tile_kernels.hpp); a
/// score policy other than a scaled dot product takes T matrices (S = T). `value_pairs` is V in
/// the pair layout (pack_value_pairs) where runs_bf16_dot_kernels holds, and the bf16
/// dot-product kernels then run (with scratch allocated for pairs); null otherwise.
template <class T, class S = T, class O = T, class Score, class BoundMask>
void blocked_query_tile(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                        const ConstMatrixRef<identity_t<S>>& v, const Score& score, const BoundMask& mask,
                        TileShape tiles, Index q0, Index rows, MatrixRef<identity_t<O>> out, VectorRef<T> lse,
                        BlockedScratch<T>& scratch, const ConstMatrixRef<std::uint32_t>* value_pairs = nullptr) {
  static_assert(std::is_same_v<T, accumulator_t<S>>);
  static_assert(is_dot_product_score<Score>::value || std::is_same_v<S, T>,
                "attend: score policies other than the scaled dot product compute on float or double matrices");
  const Index q1 = q0 + rows, lanes = round_up_to_lanes<T>(rows), stride = scratch.scores.outerStride();
  auto acc = scratch.acc.topRows(rows);  // (rows, Dv)
  acc.setZero();
  scratch.state.row(0).setConstant(-std::numeric_limits<T>::infinity());
  scratch.state.row(1).setZero();
  const bool pairs = uses_bf16_dot_kernels<S, Score> && value_pairs != nullptr;
  ATTEND_ASSERT(!pairs || (tiles.keys % 2 == 0 && scratch.qt2.rows() == (q.cols() + 1) / 2));
#if ATTEND_HAS_BF16_DOT_KERNELS
  if constexpr (uses_bf16_dot_kernels<S, Score>)
    if (pairs) pack_query_pairs(q.middleRows(q0, rows), lanes, scratch.qt2);
#endif
  if constexpr (is_dot_product_score<Score>::value)
    if (!pairs) pack_scaled_queries<T, S>(q.middleRows(q0, rows), score.scale, scratch.qt);

  const KeyRange visible = mask.keys(q0, q1);
  // The pair layout of V needs key tiles that start on even keys: from an odd first visible key
  // (a window, an offset diagonal), the first tile starts one key earlier, which the mask hides.
  const Index first_key = pairs ? visible.begin / 2 * 2 : visible.begin;
  for (Index k0 = first_key; k0 < visible.end; k0 += tiles.keys) {
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
    // A full tile's max per lane comes from the score kernels' registers (no mask follows).
    T* tile_max = kind == TileKind::Full && is_dot_product_score<Score>::value ? scratch.tile_max() : nullptr;
    if (tile_max != nullptr) std::fill_n(tile_max, lanes, -std::numeric_limits<T>::infinity());
#if ATTEND_HAS_BF16_DOT_KERNELS
    if constexpr (uses_bf16_dot_kernels<S, Score>) {
      if (pairs) {
        score_tile_bf16(k.middleRows(k0, cols), scratch.qt2.data(), scratch.qt2.outerStride(), lanes, score.scale,
                        st.data(), stride, seen_by, tile_max);
        if (kind == TileKind::Partial) apply_mask(mask, st.transpose(), q0, k0);
        online_softmax_step<T>(st.data(), stride, cols, lanes, scratch.max(), scratch.sum(), scratch.alpha(), tile_max);
        pack_weight_pairs(st.data(), stride, cols, lanes, scratch.pt2.data(), scratch.pt2.outerStride());
        value_tile_bf16(scratch.pt2.data(), scratch.pt2.outerStride(), value_pairs->middleRows(k0 / 2, (cols + 1) / 2),
                        scratch.alpha(), acc, seen_by);
        continue;
      }
    }
#endif
    if constexpr (is_dot_product_score<Score>::value)
      score_tile<T, S>(k.middleRows(k0, cols), scratch.qt.data(), scratch.qt.outerStride(), lanes, st.data(), stride,
                    seen_by, tile_max);
    else if constexpr (std::is_same_v<S, T>)
      score(q.middleRows(q0, rows), k.middleRows(k0, cols), st.transpose());
    if (kind == TileKind::Partial) apply_mask(mask, st.transpose(), q0, k0);
    online_softmax_step<T>(st.data(), stride, cols, lanes, scratch.max(), scratch.sum(), scratch.alpha(), tile_max);
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
  const bool pairs = runs_bf16_dot_kernels<S, Score>(tiles);
  Matrix<std::uint32_t> value_pairs;  // V in key pairs, shared by every query tile
#if ATTEND_HAS_BF16_DOT_KERNELS
  if constexpr (uses_bf16_dot_kernels<S, Score>)
    if (pairs) {
      value_pairs.resize((v.rows() + 1) / 2, v.cols());
      pack_value_pairs(v, value_pairs);
    }
#endif
  const ConstMatrixRef<std::uint32_t> value_pairs_ref(value_pairs);
  parallel_for_with_scratch(
      num_tiles, [&] { return BlockedScratch<T>(tiles, q.cols(), v.cols(), pairs); },
      [&](Index tile, BlockedScratch<T>& scratch) {
        const Index q0 = tile * tiles.queries;
        blocked_query_tile<T, S, O>(q, k, v, score, mask, tiles, q0, std::min(tiles.queries, q.rows() - q0), out,
                                    lse, scratch, pairs ? &value_pairs_ref : nullptr);
      });
}

}  // namespace attend::detail
