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
/// so every path adds it after its own softmax, in one pass over the output, and a split-KV
/// decode merges it once after its splits. A row that sees no key keeps a zero output and gets
/// lse = s_h; a sink of -inf changes nothing.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "multi_head.hpp"
#include "scaled_dot_product.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace attend {
namespace detail {

/// An empty matrix view: "this optional output is not wanted".
template <class T>
MatrixRef<T> no_matrix() {
  return MatrixRef<T>(Eigen::Map<Matrix<T>>(nullptr, 0, 0));
}

/// Merges the partial of a sink, output 0 and log-sum-exp `sink`, into (out, lse), row by row
/// (see the file comment), as merge_partial_into would with a zero partial. Rows where both are
/// -inf stay zero with lse -inf; a NaN sink makes the row NaN.
/// \param out (L, d_v), lse (L)
template <class T>
void merge_sink_into(MatrixRef<T> out, VectorRef<T> lse, T sink) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < out.rows(); ++i) {
    const T a = lse(i);
    const T m = std::isnan(sink) ? sink : std::max(a, sink);
    if (m == kNegInf) {  // neither the keys nor the sink
      out.row(i).setZero();
      continue;
    }
    const T wa = std::exp(a - m), wb = std::exp(sink - m), sum = wa + wb;
    out.row(i) *= wa / sum;
    lse(i) = m + std::log(sum);
  }
}

/// Checks a sink vector against H heads: empty (no sinks) or H logits.
inline void check_sinks(Index sinks, Index heads) {
  ATTEND_CHECK(sinks == 0 || sinks == heads, "sinks of size " + std::to_string(sinks) +
                                                 " must be empty or have num_heads = " + std::to_string(heads) +
                                                 " entries");
}

}  // namespace detail

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
  using T = typename DQ::Scalar;
  const detail::ThreadScope threads(options.num_threads);
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  const Index heads = layout.heads, d = layout.key_dim, dv = layout.value_dim;
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  detail::check_shape(out, q.rows(), heads * dv, "output");
  detail::check_sinks(sinks.size(), heads);
  ATTEND_CHECK(lse.size() == 0 || (lse.rows() == q.rows() && lse.cols() == heads),
               "log-sum-exp " + detail::shape_of(lse) + " must be empty or (" + std::to_string(q.rows()) + " x " +
                   std::to_string(heads) + ")");
  const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v);
  detail::check_outputs_do_not_alias<T>(q_ref, k_ref, v_ref, out, detail::no_vector<T>());
  detail::check_no_alias(lse, "log-sum-exp", q_ref, "input q");
  detail::check_no_alias(lse, "log-sum-exp", k_ref, "input k");
  detail::check_no_alias(lse, "log-sum-exp", v_ref, "input v");
  detail::check_no_alias(lse, "log-sum-exp", out, "output");
  for (Index h = 0; h < heads; ++h)  // every head's mask fits, before anything is written
    detail::bind_mask(mask.derived(), HeadIndex{0, h, 1, heads}, q.rows(), k.rows());
  const detail::ScaledDot<T> score{detail::resolve_scale<T>(options, d)};
  detail::parallel_for_with_scratch(
      heads, [&] { return Vector<T>(q.rows()); },
      [&](Index h, Vector<T>& head_lse) {
        const Index g = layout.kv_head_of(h);
        MatrixRef<T> all_out = out;
        MatrixRef<T> head_out = all_out.middleCols(h * dv, dv);  // (Lq, d_v)
        detail::attention_into<T>(q_ref.middleCols(h * d, d), k_ref.middleCols(g * d, d),
                                  v_ref.middleCols(g * dv, dv), score, mask.derived(), options, head_out, head_lse,
                                  HeadIndex{0, h, 1, heads});
        if (sinks.size() != 0) detail::merge_sink_into<T>(head_out, head_lse, sinks(h));
        if (lse.size() != 0) {
          MatrixRef<T> all_lse = lse;
          all_lse.col(h) = head_lse;
        }
      });
}

}  // namespace attend
