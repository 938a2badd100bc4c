// SPDX-License-Identifier: MIT
/// \file attention/sinks.hpp
/// \brief Learned attention sinks (gpt-oss): one extra logit per head in the softmax's
/// denominator that carries no value.
///
/// With a sink logit s_h for head h, query i of head h gets
///   p_ij = e^(x_ij) / (e^(s_h) + sum_j' e^(x_ij')),   o_i = sum_j p_ij v_j,
///   lse_i = log(e^(s_h) + sum_j e^(x_ij)),
/// where x_ij are its scores (masked keys excluded): the weights sum to 1 - e^(s_h - lse_i), the
/// rest going to the sink. This is the log-sum-exp merge (split_kv.hpp) of the attention's result
/// (o, lse) with one more partial, output 0 and log-sum-exp s_h:
///   lse' = log(e^lse + e^(s_h)),   o' = e^(lse - lse') o,
/// so every path adds it after its own softmax, in one pass over the output (detail::
/// merge_sink_into, detail/sinks.hpp), and a split-KV decode merges it once after its splits. A
/// row that sees no key keeps a zero output and gets lse = s_h; a sink of -inf changes nothing.
/// Weights that a call returns (need_weights, scaled_dot_product_attention_with_weights) are
/// e^(x_ij - lse_i) with the sink in lse_i: each row sums to 1 - e^(s_h - lse_i) < 1.
///
/// Every entry point takes sinks (H logits, in q's scalar, or empty: none) right after its
/// options: scaled_dot_product_attention(_with_lse, _with_weights) (one logit),
/// multi_head_attention, batched_attention(_into), MultiHeadAttention::forward and forward_batch,
/// decode_step(_into), decode_attention_into, paged_attention_into (then its lse) and
/// paged_decode_step(_into); scaled_dot_product_attention_into and multi_head_attention_into
/// (with or without SequenceRows) take them after their log-sum-exp output. Below:
/// add_attention_sinks_into, for a result computed elsewhere, and the older spelling
/// multi_head_attention_with_sinks_into, which is multi_head_attention_into with sinks and a
/// log-sum-exp.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/sinks.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "multi_head.hpp"
#include "scaled_dot_product.hpp"

#include <string>

namespace attend {

/// Adds learned sinks to the result of any attention path (see the file comment): each head h
/// of `out` and its column of `lse` are merged with the partial (0, sinks(h)).
///
/// \param out   (L, H d_v) outputs of H heads side by side (one head: (L, d_v)), updated in place
/// \param lse   (L, H) each row's log-sum-exp per head, updated in place
/// \param sinks (H) one logit per head
/// \throws attend::invalid_argument on mismatched shapes or when `lse` shares memory with `out`.
template <class T>
void add_attention_sinks_into(MatrixRef<T> out, MatrixRef<T> lse, const Eigen::Ref<const Vector<T>>& sinks) {
  static_assert(detail::supported_scalars<T>);
  const Index heads = sinks.size();
  ATTEND_CHECK(heads >= 1 && lse.rows() == out.rows() && lse.cols() == heads && out.cols() % heads == 0,
               "sinks of size " + std::to_string(heads) + " need lse (L x " + std::to_string(heads) +
                   ") and out (L x H d_v) with L = " + std::to_string(out.rows()) + ", got lse " +
                   detail::shape_of(lse) + " and out " + detail::shape_of(out));
  detail::check_no_alias(lse, "log-sum-exp", out, "output");
  const Index dv = out.cols() / heads;
  Vector<T> column(out.rows());
  for (Index h = 0; h < heads; ++h) {
    column = lse.col(h);
    detail::merge_sink_into<T>(out.middleCols(h * dv, dv), column, sinks(h));
    lse.col(h) = column;
  }
}

/// Multi-head attention with a learned sink per head (gpt-oss's prefill): head h of q (Lq, H d)
/// attends over kv head g = h / (H / H_kv) of k (Lk, H_kv d) and v (Lk, H_kv d_v) with `mask`
/// (bound per head as HeadIndex{0, h, 1, H}) through the path `options` selects, materialized or
/// blocked, and its result is merged with the sink (0, sinks(h)). Heads run in parallel.
/// The same as multi_head_attention_into(q, k, v, num_heads, out, mask, options, lse, sinks).
///
/// \param out   (Lq, H d_v), not sharing memory with q, k, v or lse
/// \param sinks (H) one logit per head; empty: none
/// \param lse   (Lq, H) each row's log-sum-exp per head, the sink included, or empty
/// \throws attend::invalid_argument on mismatched shapes, H not divisible by H_kv, a mask that does
///         not fit, or aliasing outputs.
template <class DQ, class DK, class DV, class Mask>
void multi_head_attention_with_sinks_into(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    MatrixRef<typename DQ::Scalar> out, const MaskBase<Mask>& mask,
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks, const AttentionOptions& options = {},
    MatrixRef<typename DQ::Scalar> lse = detail::no_matrix<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  if constexpr (std::is_same_v<S, T>) {
    multi_head_attention_into(q, k, v, num_heads, out, mask, options, lse, sinks);
  } else {  // the log-sum-exp is computed in float, and stored as asked
    Matrix<T> lse_full(lse.rows(), lse.cols());
    multi_head_attention_into(q, k, v, num_heads, out, mask, options,
                              lse.size() != 0 ? MatrixRef<T>(lse_full) : detail::no_matrix<T>(), sinks);
    lse = lse_full.template cast<S>();
  }
}

}  // namespace attend
