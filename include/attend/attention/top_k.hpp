// SPDX-License-Identifier: MIT
/// \file attention/top_k.hpp
/// \brief Top-k and hard attention: each query keeps only its k highest-scoring visible keys.
///
/// Query i softmaxes over K_i, the k visible keys with the highest scores (all of them when
/// fewer are visible); ties go to the lower key index and a NaN score ranks first, so NaN
/// propagates to its row. k = 1 is hard attention: out_i = v_j for the best key j.
///
/// Two passes over the same engine, for any score policy and mask:
///  1. a blocked selection pass computes tiles of masked scores and keeps each row's k best
///     (score, key) pairs across tiles: O(Bq (k + Bk)) scratch per thread, O(Lq k) indices;
///  2. the engine runs with `mask & SelectedKeys`, a mask policy that leaves only the selected
///     keys visible. Selecting by index makes pass 2 independent of how it rounds its scores.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "blocked.hpp"
#include "scaled_dot_product.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace attend {
namespace detail {

/// The keys each query keeps: row i holds counts(i) key indices in ascending order.
struct KeySelection {
  Matrix<Index> keys;     // (Lq, min(k, Lk)), the first counts(i) entries of row i are used
  Vector<Index> counts;   // (Lq)
};

/// Bound mask policy: only the selected keys of each query are visible.
struct SelectedKeysPolicy {
  const KeySelection* selection;

  const Index* row_begin(Index i) const { return selection->keys.data() + i * selection->keys.cols(); }
  const Index* row_end(Index i) const { return row_begin(i) + selection->counts(i); }

  KeyRange keys(Index q0, Index q1) const {
    Index begin = std::numeric_limits<Index>::max(), end = 0;
    for (Index i = q0; i < q1; ++i)
      if (selection->counts(i) > 0) {
        begin = std::min(begin, *row_begin(i));
        end = std::max(end, *(row_end(i) - 1) + 1);
      }
    return begin < end ? KeyRange{begin, end} : KeyRange{0, 0};
  }

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    const KeyRange r = keys(q0, q1);
    return r.end <= k0 || r.begin >= k1 ? TileKind::Empty : TileKind::Partial;
  }

  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}

  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r) {
      const Index* end = row_end(q0 + r);
      const Index* next = std::lower_bound(row_begin(q0 + r), end, k0);
      for (Index c = 0; c < s.cols(); ++c) {
        if (next != end && *next == k0 + c)
          ++next;
        else
          s(r, c) = -std::numeric_limits<T>::infinity();
      }
    }
  }
};

/// Mask whose visible keys are a precomputed selection (a view: the selection must outlive it).
struct SelectedKeys : MaskBase<SelectedKeys> {
  const KeySelection* selection;

  explicit SelectedKeys(const KeySelection& s) : selection(&s) {}

  SelectedKeysPolicy bind(Index /*num_queries*/, Index /*num_keys*/) const { return {selection}; }
};

/// A candidate key of one query.
template <class T>
struct ScoredKey {
  T score;
  Index key;
};

/// Strict ranking: NaN first, then higher score, then lower key index.
template <class T>
bool ranks_before(const ScoredKey<T>& a, const ScoredKey<T>& b) {
  const bool a_nan = std::isnan(a.score), b_nan = std::isnan(b.score);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.score != b.score) return a.score > b.score;
  return a.key < b.key;
}

/// Per-thread scratch of the selection pass.
template <class T>
struct SelectionScratch {
  SelectionScratch(TileShape tiles, Index keep)
      : scores(tiles.queries, tiles.keys),
        best(static_cast<std::size_t>(tiles.queries * keep)),
        counts(static_cast<std::size_t>(tiles.queries)),
        merged(static_cast<std::size_t>(keep + tiles.keys)) {}

  Matrix<T> scores;                  // (Bq, Bk)
  std::vector<ScoredKey<T>> best;    // (Bq, keep): each row's best keys so far
  std::vector<Index> counts;         // (Bq)
  std::vector<ScoredKey<T>> merged;  // keep + Bk: one row's best keys with a tile's candidates
};

/// Pass 1: each query's `keep` best visible keys under `mask`, tile by tile.
template <class T, class Score, class BoundMask>
KeySelection select_top_keys(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const Score& score,
                             const BoundMask& mask, Index keep, TileShape tiles) {
  const Index num_queries = q.rows();
  KeySelection selection{Matrix<Index>(num_queries, keep), Vector<Index>::Zero(num_queries)};
  if (keep == 0) return selection;
  const Index num_tiles = (num_queries + tiles.queries - 1) / tiles.queries;
  parallel_for_with_scratch(
      num_tiles, [&] { return SelectionScratch<T>(tiles, keep); },
      [&](Index tile, SelectionScratch<T>& scratch) {
        const Index q0 = tile * tiles.queries, rows = std::min(tiles.queries, num_queries - q0), q1 = q0 + rows;
        std::fill(scratch.counts.begin(), scratch.counts.end(), Index(0));
        const KeyRange visible = mask.keys(q0, q1);
        for (Index k0 = visible.begin; k0 < visible.end; k0 += tiles.keys) {
          const Index cols = std::min(tiles.keys, visible.end - k0), k1 = k0 + cols;
          const TileKind kind = mask.classify(q0, q1, k0, k1);
          if (kind == TileKind::Empty) continue;
          auto s = scratch.scores.topLeftCorner(rows, cols);  // (rows, cols)
          score(q.middleRows(q0, rows), k.middleRows(k0, cols), s);
          if (kind == TileKind::Partial) apply_mask(mask, s, q0, k0);
          for (Index r = 0; r < rows; ++r) {
            ScoredKey<T>* best = scratch.best.data() + r * keep;
            Index& count = scratch.counts[std::size_t(r)];
            // Merge the row's best keys with this tile's visible keys that could displace them.
            auto merged_end = std::copy(best, best + count, scratch.merged.begin());
            for (Index c = 0; c < cols; ++c) {
              const ScoredKey<T> candidate{s(r, c), k0 + c};
              if (candidate.score == -std::numeric_limits<T>::infinity()) continue;
              if (count == keep && !ranks_before(candidate, best[keep - 1])) continue;
              *merged_end++ = candidate;
            }
            const Index merged_count = merged_end - scratch.merged.begin();
            if (merged_count >= keep)  // the k best first, the k-th best at position keep - 1
              std::nth_element(scratch.merged.begin(), scratch.merged.begin() + (keep - 1), merged_end,
                               ranks_before<T>);
            count = std::min(merged_count, keep);
            std::copy(scratch.merged.begin(), scratch.merged.begin() + count, best);
          }
        }
        for (Index r = 0; r < rows; ++r) {
          const Index count = scratch.counts[std::size_t(r)];
          const ScoredKey<T>* best = scratch.best.data() + r * keep;
          for (Index c = 0; c < count; ++c) selection.keys(q0 + r, c) = best[c].key;
          std::sort(selection.keys.row(q0 + r).data(), selection.keys.row(q0 + r).data() + count);
          selection.counts(q0 + r) = count;
        }
      });
  return selection;
}

/// Top-k attention of any score policy: selection pass, then the engine on the selected keys.
template <class T, class Score, class Mask>
void top_k_attention_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                          const Score& score, const Mask& mask, Index top_k, const AttentionOptions& options,
                          MatrixRef<T> out, VectorRef<T> lse) {
  const ThreadScope threads(options.num_threads);
  ATTEND_CHECK(top_k >= 1, "top-k attention needs k >= 1, got k=" + std::to_string(top_k));
  const TileShape tiles = resolve_tiles(options, q.rows(), k.rows());
  const KeySelection selection = select_top_keys<T>(q, k, score, bind_mask(mask.derived(), HeadIndex{}, q.rows(), k.rows()),
                                                    std::min(top_k, k.rows()), tiles);
  attention_into<T>(q, k, v, score, mask.derived() & SelectedKeys(selection), options, out, lse);
}

}  // namespace detail

/// Writes top-k scaled dot-product attention into `out` (Lq, Dv): each query softmaxes
/// scale <q_i, k_j> (+ mask) over only its `top_k` best visible keys (ties to the lower key
/// index), with its log-sum-exp over those keys in `lse` when non-empty. Shapes and options as
/// scaled_dot_product_attention_into; top_k >= Lk is ordinary attention. bf16 and half inputs
/// are computed on float copies (the selection compares float scores), the output rounded once.
/// \throws attend::invalid_argument when top_k <= 0, and as scaled_dot_product_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
void top_k_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                          const Eigen::MatrixBase<DV>& v, Index top_k, MatrixRef<typename DQ::Scalar> out,
                          const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                          VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  detail::check_qkv(q, k, v);
  if constexpr (detail::is_reduced_precision<S>) {
    Matrix<T> out_full(out.rows(), out.cols());
    top_k_attention_into(q.template cast<T>(), k.template cast<T>(), v.template cast<T>(), top_k, out_full, mask,
                         options, lse);
    out = out_full.template cast<S>();
  } else {
    const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v);
    detail::top_k_attention_into<T>(q_ref, k_ref, v_ref,
                                    detail::ScaledDot<T>{detail::resolve_scale<T>(options, q.cols())}, mask, top_k,
                                    options, out, lse);
  }
}

/// Returns top-k attention, (Lq, Dv). See top_k_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> top_k_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                            const Eigen::MatrixBase<DV>& v, Index top_k,
                                            const MaskBase<Mask>& mask = NoMask{},
                                            const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  top_k_attention_into(q, k, v, top_k, out, mask, options);
  return out;
}

/// Hard attention: out_i = v_j for the best visible key j of query i (the lowest index among
/// ties), zeros when none is visible. Top-k attention with k = 1.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> hard_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                           const Eigen::MatrixBase<DV>& v, const MaskBase<Mask>& mask = NoMask{},
                                           const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  return top_k_attention(q, k, v, 1, mask, options);
}

}  // namespace attend
