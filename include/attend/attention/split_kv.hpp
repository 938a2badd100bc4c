// SPDX-License-Identifier: MIT
/// \file attention/split_kv.hpp
/// \brief Split-KV attention: partial results over chunks of keys, their log-sum-exp merge, and a
/// one-token decode step that splits the keys across threads.
///
/// Attention over a chunk C of the keys, with its log-sum-exp per query row,
///   o_C = sum_{j in C} e^{s_j - lse_C} v_j,   lse_C = log sum_{j in C} e^{s_j},
/// is `scaled_dot_product_attention_with_lse(q, k_C, v_C, mask)` (the mask sees the chunk's own
/// coordinates: for a dense mask over all keys pass the chunk's column block). Two partials over
/// disjoint chunks A and B merge exactly into the partial over A u B:
///   lse = log(e^{lse_A} + e^{lse_B}),   o = e^{lse_A - lse} o_A + e^{lse_B - lse} o_B.
/// The merge is associative and commutative (up to rounding), so chunks may be processed in any
/// order and grouping; an empty partial (lse = -inf, zero output) is its identity.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "materialized.hpp"
#include "multi_head.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace attend {

/// Merges the partial (other_out, other_lse) into (out, lse), row by row (see the file comment).
/// Rows where both log-sum-exps are -inf (no key seen) stay zero with lse -inf; a NaN
/// log-sum-exp makes its row NaN.
///
/// \param out       (L, Dv) partial output, overwritten with the merged output
/// \param lse       (L) its log-sum-exp, overwritten with the merged one
/// \param other_out (L, Dv)
/// \param other_lse (L)
template <class T>
void merge_partial_into(MatrixRef<T> out, VectorRef<T> lse, const ConstMatrixRef<T>& other_out,
                        const Eigen::Ref<const Vector<T>>& other_lse) {
  detail::check_shape(other_out, out.rows(), out.cols(), "partial output");
  ATTEND_CHECK(lse.size() == out.rows() && other_lse.size() == out.rows(),
               "log-sum-exps of sizes " + std::to_string(lse.size()) + " and " + std::to_string(other_lse.size()) +
                   " must both match the " + std::to_string(out.rows()) + " rows of the partial outputs");
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < out.rows(); ++i) {
    const T a = lse(i), b = other_lse(i);
    const T m = std::isnan(b) ? b : std::max(a, b);
    if (m == kNegInf) {  // neither partial saw a key
      out.row(i).setZero();
      continue;
    }
    const T wa = std::exp(a - m), wb = std::exp(b - m), sum = wa + wb;
    out.row(i) = (wa / sum) * out.row(i) + (wb / sum) * other_out.row(i);
    lse(i) = m + std::log(sum);
  }
}

/// Returns the merge of two partials (output and lse; weights are not merged).
template <class T>
AttentionResult<T> merge_partials(const AttentionResult<T>& a, const AttentionResult<T>& b) {
  AttentionResult<T> merged{a.output, a.lse, {}};
  merge_partial_into<T>(merged.output, merged.lse, b.output, b.lse);
  return merged;
}

/// Returns the merge of partials, folded left to right. At least one partial is required.
template <class T>
AttentionResult<T> merge_partials(const std::vector<AttentionResult<T>>& partials) {
  ATTEND_CHECK(!partials.empty(), "merge_partials needs at least one partial");
  AttentionResult<T> merged{partials[0].output, partials[0].lse, {}};
  for (std::size_t p = 1; p < partials.size(); ++p)
    merge_partial_into<T>(merged.output, merged.lse, partials[p].output, partials[p].lse);
  return merged;
}

namespace detail {

/// Key rows per split of a decode step. Fixed, so that the splits and the order of their merge,
/// and hence the result's bits, never depend on the thread count.
inline constexpr Index kDecodeSplitKeys = 512;

}  // namespace detail

/// One decode step: a single query token with H heads attends over all Lk keys of H_kv
/// key/value heads (bottom-right causal with Lq = 1 sees every key; pass `k.bottomRows(w)` for a
/// window of w keys). The work is split into (kv head, chunk of `block_k` keys) items run in
/// parallel; each item computes the G = H / H_kv query heads that share the kv head together,
/// so every K and V row is read from memory once. The partials of each head are then merged in
/// chunk order, so results are bitwise identical for any thread count.
///
/// \param q   (1, H d) the new token's queries, heads side by side
/// \param k   (Lk, H_kv d) keys, e.g. `KVCache::keys()`
/// \param v   (Lk, H_kv d_v) values
/// \param num_heads H; H_kv = k.cols() / d, d = q.cols() / H
/// \param out (1, H d_v)
/// \param options scale (default 1/sqrt(d)); block_k = keys per split (0: detail::kDecodeSplitKeys)
/// \param lse (H) log-sum-exp of each head, or empty
template <class DQ, class DK, class DV>
void decode_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                           const Eigen::MatrixBase<DV>& v, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                           const AttentionOptions& options = {},
                           VectorRef<typename DQ::Scalar> lse = detail::no_vector<typename DQ::Scalar>()) {
  using T = typename DQ::Scalar;
  static_assert(std::is_same_v<T, typename DK::Scalar> && std::is_same_v<T, typename DV::Scalar>,
                "attend: q, k and v must have the same scalar type");
  ATTEND_CHECK(q.rows() == 1, "a decode step takes one query row, got q " + detail::shape_of(q));
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  ATTEND_CHECK(options.block_k >= 0, "block_k=" + std::to_string(options.block_k) + " must be positive, or 0");
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  const Index d = layout.key_dim, dv = layout.value_dim, group = layout.heads / layout.kv_heads;
  detail::check_shape(out, 1, layout.heads * dv, "output");
  ATTEND_CHECK(lse.size() == 0 || lse.size() == layout.heads,
               "log-sum-exp of size " + std::to_string(lse.size()) + " must have num_heads = " +
                   std::to_string(layout.heads) + " entries");
  const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v);
  const T scale = detail::resolve_scale<T>(options, d);
  const Index split = options.block_k > 0 ? options.block_k : detail::kDecodeSplitKeys;
  const Index splits = (k.rows() + split - 1) / split;
  if (splits == 0) {  // no keys: zero output, lse -inf
    out.setZero();
    if (lse.size() != 0) lse.setConstant(-std::numeric_limits<T>::infinity());
    return;
  }
  // Partial of (kv head g, chunk c) for the G heads of group g: rows [(g splits + c) G, +G).
  Matrix<T> part_out(layout.kv_heads * splits * group, dv);
  Vector<T> part_lse(part_out.rows());
  detail::parallel_for_with_scratch(
      layout.kv_heads * splits, [&] { return Matrix<T>(group, split); },
      [&](Index item, Matrix<T>& scores) {
        const Index g = item / splits, k0 = (item % splits) * split, n = std::min(split, k.rows() - k0);
        const Eigen::Map<const Matrix<T>> q_group(q_ref.data() + g * group * d, group, d);  // (G, d)
        detail::materialized_attention<T>(q_group, k_ref.block(k0, g * d, n, d), v_ref.block(k0, g * dv, n, dv),
                                          detail::ScaledDot<T>{scale}, detail::AllVisible{n},
                                          part_out.middleRows(item * group, group),
                                          part_lse.segment(item * group, group), scores.leftCols(n));
      });
  for (Index g = 0; g < layout.kv_heads; ++g) {
    const Index first = g * splits * group;
    for (Index c = 1; c < splits; ++c)
      merge_partial_into<T>(part_out.middleRows(first, group), part_lse.segment(first, group),
                            part_out.middleRows(first + c * group, group), part_lse.segment(first + c * group, group));
    for (Index i = 0; i < group; ++i) out.row(0).segment((g * group + i) * dv, dv) = part_out.row(first + i);
    if (lse.size() != 0) lse.segment(g * group, group) = part_lse.segment(first, group);
  }
}

}  // namespace attend
