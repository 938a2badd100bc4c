// SPDX-License-Identifier: MIT
/// \file attention/multi_head.hpp
/// \brief Multi-head self and cross attention with PyTorch-layout projections, grouped-query
/// (GQA) and multi-query (MQA) heads, and a batch API over sequences of different lengths.
///
/// Heads are zero-copy column views: head h of a projected (L, H*d) matrix is
/// `x.middleCols(h * d, d)`. Query head h reads key/value head h / (H / H_kv), so H_kv = H is
/// ordinary multi-head attention, 1 < H_kv < H grouped-query and H_kv = 1 multi-query.
///
/// ### Correspondence with `torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`
/// One sequence is one (L, E) matrix; a batch is a `std::vector` of them (lengths may differ).
/// | PyTorch                                   | attend                                                        |
/// |-------------------------------------------|---------------------------------------------------------------|
/// | `in_proj_weight` (3E, E) = [W_q; W_k; W_v] | `MultiHeadAttention::from_packed(H, in_proj_weight, ...)`, or rows [0,E), [E,2E), [2E,3E) as `q/k/v_proj_weight` |
/// | `q/k/v_proj_weight` (kdim, vdim != E)      | `MultiHeadWeights::q/k/v_proj_weight`, shapes (H d, E_q), (H_kv d, E_k), (H_kv d_v, E_v) |
/// | `in_proj_bias` (3E)                        | `q/k/v_proj_bias` = its three thirds (empty = no bias)        |
/// | `out_proj.weight`, `out_proj.bias`         | `out_proj_weight` (E_out, H d_v), `out_proj_bias` (E_out)      |
/// | `forward(query, key, value)`               | `forward(query, key, value)`; `forward(x)` = self, `forward(x, memory)` = cross |
/// | `key_padding_mask` (N, S), True = *ignore* | `KeyPadding(valid_length)` (trailing padding), per sequence in `forward_batch`; or `BooleanMask` with true = *attend* (the negation) |
/// | `attn_mask` bool, True = *not allowed*     | `BooleanMask(!attn_mask)`: attend's booleans mean "may attend" |
/// | `attn_mask` float (added)                  | `AdditiveMask(attn_mask)`                                     |
/// | `is_causal=True`                           | `Causal()` (top-left)                                         |
/// | `need_weights=True, average_attn_weights=True`  | `options.need_weights = NeedWeights::Averaged`: one (Lq, Lk) |
/// | `need_weights=True, average_attn_weights=False` | `NeedWeights::PerHead`: H matrices (Lq, Lk)              |
/// | (default `need_weights=True`)              | default `NeedWeights::None` (the fast path returns no weights) |
/// | scale 1/sqrt(E/H)                           | the same default; `options.scale` overrides                   |
/// Not supported: `add_bias_kv`, `add_zero_attn`, dropout (inference only). PyTorch's module has
/// no GQA; with H_kv = H the results match it. A query that sees no key gives a zero row here
/// (PyTorch's module gives NaN there).
#pragma once

#include "../detail/checks.hpp"
#include "../detail/linear.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../positional/rotary.hpp"
#include "../sequences.hpp"
#include "../detail/sinks.hpp"
#include "materialized.hpp"
#include "scaled_dot_product.hpp"

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace attend {

/// Which attention weights a multi-head call returns.
enum class NeedWeights {
  None,      ///< no weights (blocked path allowed)
  PerHead,   ///< H matrices (Lq, Lk), PyTorch `average_attn_weights=False`
  Averaged   ///< one (Lq, Lk), the mean over heads, PyTorch `average_attn_weights=True`
};

/// Options of a multi-head call: those of one head plus the weights wanted.
struct MultiHeadOptions : AttentionOptions {
  NeedWeights need_weights = NeedWeights::None;
};

/// Output of a multi-head call (T: the layer's scalar; the weights are float for bf16 and half).
template <class T>
struct MultiHeadResult {
  Matrix<T> output;                                ///< (Lq, E_out)
  std::vector<Matrix<accumulator_t<T>>> weights;  ///< empty, H per-head (Lq, Lk), or one head-averaged (Lq, Lk)
};

/// Output of a multi-head call over a batch read in place (forward_batch with SequenceRows).
template <class T>
struct MultiHeadBatchResult {
  Matrix<T> output;  ///< (rows, E_out): sequence b in its rows, zeros elsewhere
  std::vector<std::vector<Matrix<accumulator_t<T>>>> weights;  ///< per sequence, as MultiHeadResult::weights
};

namespace detail {

/// Head counts and per-head widths of a multi-head problem.
struct HeadLayout {
  Index heads;      // H query heads
  Index kv_heads;   // H_kv key/value heads, H % H_kv == 0
  Index key_dim;    // d, per-head width of Q and K
  Index value_dim;  // d_v, per-head width of V and of the output

  /// Key/value head read by query head h.
  Index kv_head_of(Index h) const { return h / (heads / kv_heads); }
};

inline void check_head_counts(Index heads, Index kv_heads) {
  ATTEND_CHECK(heads >= 1 && kv_heads >= 1, "num_heads=" + std::to_string(heads) + " and num_kv_heads=" +
                                                std::to_string(kv_heads) + " must be at least 1");
  ATTEND_CHECK(heads % kv_heads == 0, "num_heads=" + std::to_string(heads) + " is not divisible by num_kv_heads=" +
                                          std::to_string(kv_heads));
}

/// The layout of q (Lq, H d), k (Lk, H_kv d), v (Lk, H_kv d_v): d from the query width and H,
/// H_kv from the key width. Throws naming the widths when they do not fit.
inline HeadLayout infer_head_layout(Index q_cols, Index k_cols, Index v_cols, Index heads) {
  ATTEND_CHECK(heads >= 1, "num_heads=" + std::to_string(heads) + " must be at least 1");
  ATTEND_CHECK(q_cols % heads == 0 && q_cols > 0, "query width " + std::to_string(q_cols) +
                                                      " is not a positive multiple of num_heads=" +
                                                      std::to_string(heads));
  const Index d = q_cols / heads;
  ATTEND_CHECK(k_cols % d == 0 && k_cols > 0, "key width " + std::to_string(k_cols) +
                                                  " is not a positive multiple of the head dimension " +
                                                  std::to_string(d) + " (query width " + std::to_string(q_cols) +
                                                  " / num_heads=" + std::to_string(heads) + ")");
  const Index kv_heads = k_cols / d;
  check_head_counts(heads, kv_heads);
  ATTEND_CHECK(v_cols % kv_heads == 0, "value width " + std::to_string(v_cols) +
                                           " is not divisible by num_kv_heads=" + std::to_string(kv_heads));
  return {heads, kv_heads, d, v_cols / kv_heads};
}

/// An empty matrix view: "this optional output is not wanted".
template <class T>
MatrixRef<T> no_matrix() {
  return MatrixRef<T>(Eigen::Map<Matrix<T>>(nullptr, 0, 0));
}

/// One sequence of a multi-head call: views of its projected inputs and its output, stored as S.
template <class S>
struct SequenceViews {
  ConstMatrixRef<S> q;                                       // (Lq, H d)
  ConstMatrixRef<S> k;                                       // (Lk, H_kv d)
  ConstMatrixRef<S> v;                                       // (Lk, H_kv d_v)
  MatrixRef<S> out;                                          // (Lq, H d_v), head h in columns [h d_v, (h+1) d_v)
  std::vector<Matrix<accumulator_t<S>>>* weights = nullptr;  // when set: H per-head (Lq, Lk) weights
  MatrixRef<accumulator_t<S>> lse = no_matrix<accumulator_t<S>>();  // (Lq, H) head h's log-sum-exp in
                                                                     // column h, or no columns: not wanted
};

/// A thread's scratch for the heads it computes: contiguous copies of one head's K and V, and
/// the head's log-sum-exp before it goes to its (strided) column.
template <class S>
struct HeadCopies {
  /// Whether the blocked path should read a head of `k` from copies: its rows are strided and
  /// enough query rows (more than one query tile) share the copy.
  bool worth_it(const ConstMatrixRef<S>& k, Index num_queries, const AttentionOptions& options) const {
    return k.outerStride() != k.cols() && num_queries > resolve_tiles(options).queries &&
           use_blocked(options, num_queries, k.rows());
  }

  Matrix<S> keys;                  // (Lk, d)
  Matrix<S> values;                // (Lk, d_v)
  Vector<accumulator_t<S>> lse;    // (Lq) when the log-sum-exp is wanted
};

/// Attention of every (sequence, head) pair; mask_of(s) is the mask policy of sequence s, bound
/// for head h of sequence s as HeadIndex{s, h, S, H}. A sequence whose `lse` view has H columns
/// also gets each head's log-sum-exp (-inf for a query that sees no key): the forward of a
/// training step, whose outputs are bitwise those without it. Everything that can throw is checked
/// before the parallel loop. The loop runs over
/// (sequence, head); each head runs the single-head engine, whose own query-tile loop is then a
/// nested OpenMP region and runs serially in its thread (OpenMP's default). A lone head keeps
/// that inner parallelism. Each head is computed the same way on any thread, so results do not
/// depend on the thread count. Inputs and outputs are stored as S, computed in T = accumulator_t<S>.
template <class S, class MaskOf>
void multi_head_attention_batch(const std::vector<SequenceViews<S>>& sequences, const HeadLayout& layout,
                                const MaskOf& mask_of, const AttentionOptions& options,
                                const Eigen::Ref<const Vector<S>>& sinks = Vector<S>()) {
  using T = accumulator_t<S>;
  const ThreadScope threads(options.num_threads);
  const T scale = resolve_scale<T>(options, layout.key_dim);
  resolve_tiles(options);
  check_sinks(sinks.size(), layout.heads);
  const bool sunk = sinks.size() != 0;
  const auto head_index = [&](Index s, Index h) { return HeadIndex{s, h, Index(sequences.size()), layout.heads}; };
  for (std::size_t s = 0; s < sequences.size(); ++s) {
    const SequenceViews<S>& seq = sequences[s];
    check_shape(seq.q, seq.q.rows(), layout.heads * layout.key_dim, "query");
    check_shape(seq.k, seq.k.rows(), layout.kv_heads * layout.key_dim, "key");
    check_shape(seq.v, seq.k.rows(), layout.kv_heads * layout.value_dim, "value");
    check_shape(seq.out, seq.q.rows(), layout.heads * layout.value_dim, "output");
    check_outputs_do_not_alias<S, S, T>(seq.q, seq.k, seq.v, seq.out, no_vector<T>());
    if (seq.lse.cols() != 0) {
      check_shape(seq.lse, seq.q.rows(), layout.heads, "log-sum-exp (Lq x H)");
      check_no_alias(seq.lse, "log-sum-exp", seq.q, "input q");
      check_no_alias(seq.lse, "log-sum-exp", seq.k, "input k");
      check_no_alias(seq.lse, "log-sum-exp", seq.v, "input v");
      check_no_alias(seq.lse, "log-sum-exp", seq.out, "output");
    }
    for (Index h = 0; h < layout.heads; ++h)
      bind_mask(mask_of(Index(s)).derived(), head_index(Index(s), h), seq.q.rows(), seq.k.rows());
    if (seq.weights) seq.weights->assign(std::size_t(layout.heads), Matrix<T>(seq.q.rows(), seq.k.rows()));
  }
  // A head's K and V rows in an (L, H_kv d) matrix lie H_kv d apart (a page for 8 heads of 128
  // floats), so every row of a key tile sits on its own page; the blocked path then reads them
  // from contiguous copies made once per head (2 Lk d values per thread, against 4 Lq Lk d
  // flops). Measured at L = 4096, d = 128, 8 heads, 2 threads: 72% of the FMA peak on the
  // strided views, 83% on contiguous heads.
  const auto head = [&](Index item, HeadCopies<S>& copies) {
    const SequenceViews<S>& seq = sequences[std::size_t(item / layout.heads)];
    if (seq.q.rows() == 0) return;  // nothing to write (and no block of an empty matrix at an offset)
    const Index h = item % layout.heads, g = layout.kv_head_of(h);
    MatrixRef<S> all_out = seq.out;                                                 // a writable copy of the view
    MatrixRef<S> out = all_out.middleCols(h * layout.value_dim, layout.value_dim);  // (Lq, d_v)
    MatrixRef<T> all_lse = seq.lse;  // (Lq, H) or empty
    const bool want_lse = all_lse.cols() != 0;
    const T sink = sunk ? T(sinks(h)) : -std::numeric_limits<T>::infinity();  // -inf: no sink
    if (seq.k.rows() == 0) {  // no key to see: the sink alone (zeros, lse = sink; NaN stays NaN)
      out.setZero();
      if (std::isnan(sink)) out.setConstant(S(sink));
      if (want_lse) all_lse.col(h).setConstant(sink);
      return;
    }
    if (want_lse || sunk) copies.lse.resize(seq.q.rows());  // (sinks merge with the log-sum-exp)
    const VectorRef<T> lse = want_lse || sunk ? VectorRef<T>(copies.lse) : no_vector<T>();
    const ConstMatrixRef<S> q = seq.q.middleCols(h * layout.key_dim, layout.key_dim);    // (Lq, d)
    const ConstMatrixRef<S> k = seq.k.middleCols(g * layout.key_dim, layout.key_dim);    // (Lk, d)
    const ConstMatrixRef<S> v = seq.v.middleCols(g * layout.value_dim, layout.value_dim);  // (Lk, d_v)
    const auto& mask = mask_of(item / layout.heads);
    const HeadIndex at = head_index(item / layout.heads, h);
    // The path's (out, lse), merged with the head's sink before out is rounded to S.
    const auto attend = [&](const ConstMatrixRef<S>& keys, const ConstMatrixRef<S>& values) {
      if (sunk)
        attention_with_sink_into<S>(q, keys, values, ScaledDot<T>{scale}, mask.derived(), options, out, lse, sink, at);
      else
        attention_into<S>(q, keys, values, ScaledDot<T>{scale}, mask.derived(), options, out, lse, at);
    };
    if (seq.weights) {  // a sink scales each row of weights as its output: they sum to < 1
      const auto bound = bind_mask(mask.derived(), at, q.rows(), k.rows());
      MatrixRef<T> weights = (*seq.weights)[std::size_t(h)];
      if constexpr (std::is_same_v<S, T>) {
        materialized_attention<T>(q, k, v, ScaledDot<T>{scale}, bound, out, lse, weights);
        if (sunk) merge_sink_into<T>(out, lse, sink, &weights);
      } else {  // on float copies of the head
        Matrix<T> out_full(q.rows(), v.cols());
        materialized_attention<T>(q.template cast<T>(), k.template cast<T>(), v.template cast<T>(), ScaledDot<T>{scale},
                                  bound, out_full, lse, weights);
        if (sunk) merge_sink_into<T>(out_full, lse, sink, &weights);
        out = out_full.template cast<S>();
      }
    } else if (copies.worth_it(k, q.rows(), options)) {
      copies.keys = k;
      copies.values = v;
      attend(copies.keys, copies.values);
    } else {
      attend(k, v);
    }
    if (want_lse) all_lse.col(h) = copies.lse;
  };
  const Index items = Index(sequences.size()) * layout.heads;
  if (items == 1) {
    HeadCopies<S> copies;
    head(0, copies);
  } else {
    parallel_for_with_scratch(
        items, [] { return HeadCopies<S>(); }, head);
  }
}

}  // namespace detail

/// Multi-head attention of a batch of sequences of different lengths read in place (FlashAttention's
/// varlen attention): sequence b attends from rows query_rows(b) of q over rows key_rows(b) of k
/// and v, and writes rows query_rows(b) of `out`; rows of `out` in no sequence are set to zero.
/// `mask` is bound for head h of sequence b with HeadIndex{b, h, B, H} and that sequence's
/// (Lq_b, Lk_b): per-sequence policies such as KeyPadding(lengths) take their entry b.
///
/// \param q   (rows, H d), k (rows_k, H_kv d), v (rows_k, H_kv d_v); projected inputs
/// \param query_rows, key_rows where the B sequences lie (packed or padded; sequences.hpp)
/// \param out (rows, H d_v), not sharing memory with q, k or v
/// \param lse (rows, H) or empty: when given, column h gets head h's log-sum-exp (float for
///            bf16 and half inputs; -inf for a query that sees no key and in rows of no
///            sequence), what multi_head_attention_backward_into needs; `out` is bitwise the same
/// \param sinks (H) learned sink logits, head h's for head h of every sequence (attention/sinks.hpp;
///            the log-sum-exp then includes them), or empty: none
/// \throws attend::invalid_argument when the layouts disagree on B or reach past the matrices,
///         and as multi_head_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
void multi_head_attention_into(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const SequenceRows& query_rows, const SequenceRows& key_rows, MatrixRef<typename DQ::Scalar> out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    MatrixRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_matrix<accumulator_t<typename DQ::Scalar>>(),
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  detail::check_shape(out, q.rows(), layout.heads * layout.value_dim, "output");
  ATTEND_CHECK(query_rows.size() == key_rows.size(), std::to_string(query_rows.size()) + " query sequences and " +
                                                         std::to_string(key_rows.size()) + " key sequences");
  ATTEND_CHECK(query_rows.rows_used() <= q.rows() && key_rows.rows_used() <= k.rows(),
               "the sequences use " + std::to_string(query_rows.rows_used()) + " query rows and " +
                   std::to_string(key_rows.rows_used()) + " key rows of q " + detail::shape_of(q) + " and k " +
                   detail::shape_of(k));
  detail::check_sinks(sinks.size(), layout.heads);
  const ConstMatrixRef<S> q_ref(q), k_ref(k), v_ref(v);
  detail::check_outputs_do_not_alias<S, S, T>(q_ref, k_ref, v_ref, out, detail::no_vector<T>());
  const bool want_lse = lse.size() != 0 || lse.cols() != 0;
  if (want_lse) {
    detail::check_shape(lse, q.rows(), layout.heads, "log-sum-exp (rows x H)");
    detail::check_no_alias(lse, "log-sum-exp", q_ref, "input q");
    detail::check_no_alias(lse, "log-sum-exp", k_ref, "input k");
    detail::check_no_alias(lse, "log-sum-exp", v_ref, "input v");
    detail::check_no_alias(lse, "log-sum-exp", out, "output");
  }
  std::vector<detail::SequenceViews<S>> sequences;
  for (Index b = 0; b < query_rows.size(); ++b) {
    const Index q0 = query_rows.begin(b), lq = query_rows.length(b), k0 = key_rows.begin(b), lk = key_rows.length(b);
    sequences.push_back({q_ref.middleRows(q0, lq), k_ref.middleRows(k0, lk), v_ref.middleRows(k0, lk),
                         out.middleRows(q0, lq), nullptr,
                         want_lse ? MatrixRef<T>(lse.middleRows(q0, lq)) : detail::no_matrix<T>()});
  }
  out.setZero();  // the rows of no sequence; the others are overwritten
  if (want_lse) lse.setConstant(-std::numeric_limits<T>::infinity());
  detail::multi_head_attention_batch<S>(
      sequences, layout, [&](Index) -> const Mask& { return mask.derived(); }, options, sinks);
}

/// Writes multi-head attention of already projected inputs into `out` (no projections):
///   out[:, h d_v : (h+1) d_v] = attention(q_h, k_g, v_g), g = h / (H / H_kv),
/// with q_h = q[:, h d : (h+1) d]. d = q.cols() / H and H_kv = k.cols() / d.
///
/// \param q   (Lq, H d)
/// \param k   (Lk, H_kv d)
/// \param v   (Lk, H_kv d_v)
/// \param num_heads H
/// \param out (Lq, H d_v), not sharing memory with q, k or v
/// \param mask any policy, bound for each head (HeadIndex{0, h, 1, H})
/// \param lse (Lq, H) or empty: each head's log-sum-exp in its column, for the backward
/// \param sinks (H) learned sink logits (attention/sinks.hpp), or empty: head h's softmax has one
///            more logit sinks(h) in its denominator, carrying no value (gpt-oss), on either path
/// \throws attend::invalid_argument when the widths do not split into heads (naming them), when
///         `out` or `lse` aliases an input, or when sinks are neither empty nor H.
template <class DQ, class DK, class DV, class Mask = NoMask>
void multi_head_attention_into(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    MatrixRef<typename DQ::Scalar> out, const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    MatrixRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_matrix<accumulator_t<typename DQ::Scalar>>(),
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  multi_head_attention_into(q, k, v, num_heads, SequenceRows::uniform(1, q.rows()), SequenceRows::uniform(1, k.rows()),
                            out, mask, options, lse, sinks);  // one sequence of every row
}

/// Returns multi-head attention of projected inputs, shape (Lq, H d_v), with learned sinks when
/// `sinks` holds H logits. See multi_head_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> multi_head_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  Matrix<typename DQ::Scalar> out(q.rows(), layout.heads * layout.value_dim);
  multi_head_attention_into(q, k, v, num_heads, out, mask, options,
                            detail::no_matrix<accumulator_t<typename DQ::Scalar>>(), sinks);
  return out;
}

/// Projection weights in PyTorch's nn.Linear layout (out_features, in_features). An empty bias
/// vector means no bias.
template <class T>
struct MultiHeadWeights {
  Matrix<T> q_proj_weight;    ///< (H d, E_q)
  Matrix<T> k_proj_weight;    ///< (H_kv d, E_k)   PyTorch kdim = E_k
  Matrix<T> v_proj_weight;    ///< (H_kv d_v, E_v) PyTorch vdim = E_v
  Matrix<T> out_proj_weight;  ///< (E_out, H d_v)
  Vector<T> q_proj_bias;      ///< (H d) or empty
  Vector<T> k_proj_bias;      ///< (H_kv d) or empty
  Vector<T> v_proj_bias;      ///< (H_kv d_v) or empty
  Vector<T> out_proj_bias;    ///< (E_out) or empty
};

/// Multi-head attention with input and output projections:
///   Q = query W_q^T + b_q,  K = key W_k^T + b_k,  V = value W_v^T + b_v,
///   O_h = softmax(scale Q_h K_g^T + mask) V_g  (g = h / (H / H_kv)),
///   out = [O_0 ... O_{H-1}] W_o^T + b_o.
/// With a rotary embedding (set_rotary), every head of Q and K is rotated after its projection:
/// query row i at position i, key row j at position j (Llama, GPT-NeoX). Incremental decoding
/// of the same layer over a KVCache is `decode_step(attention, cache, x)` (kv_cache.hpp).
/// See the file comment for the correspondence with torch.nn.MultiheadAttention.
///
/// T is the scalar of the weights, inputs and outputs: float, double, Eigen::bfloat16 or
/// Eigen::half. A bf16 or half layer runs as PyTorch runs a bf16 module, with one rounding to T
/// per stage and float accumulation inside each: every projection widens its T inputs, weights
/// and bias exactly to float, accumulates the products in float and rounds y = x W^T + b to T
/// once; rotary turns the rounded Q and K in float and rounds them once more; attention runs on
/// the T projections with float scores, softmax and P V (scaled_dot_product.hpp) and rounds each
/// head's output to T once; the output projection is one more projection. Weights returned by
/// need_weights are float (accumulator_t<T>). Gradients (multi_head_training.hpp) are float and
/// double only.
template <class T>
class MultiHeadAttention {
 public:
  static_assert(detail::supported_scalars<T>);

  /// \param num_heads    H
  /// \param weights      projections; their shapes fix d, d_v, E_q, E_k, E_v and E_out
  /// \param num_kv_heads H_kv (0 = H); W_k and W_v then have H_kv d and H_kv d_v rows
  /// \throws attend::invalid_argument naming the shapes when they do not fit together.
  MultiHeadAttention(Index num_heads, MultiHeadWeights<T> weights, Index num_kv_heads = 0)
      : w_(std::move(weights)) {
    const Index kv_heads = num_kv_heads == 0 ? num_heads : num_kv_heads;
    detail::check_head_counts(num_heads, kv_heads);
    const Index q_rows = w_.q_proj_weight.rows();
    ATTEND_CHECK(q_rows % num_heads == 0 && q_rows > 0,
                 "q_proj_weight " + detail::shape_of(w_.q_proj_weight) + ": its " + std::to_string(q_rows) +
                     " rows (the projected width) are not a positive multiple of num_heads=" +
                     std::to_string(num_heads));
    const Index d = q_rows / num_heads;
    ATTEND_CHECK(w_.k_proj_weight.rows() == kv_heads * d,
                 "k_proj_weight " + detail::shape_of(w_.k_proj_weight) + " must have num_kv_heads * head_dim = " +
                     std::to_string(kv_heads) + " * " + std::to_string(d) + " rows");
    const Index v_rows = w_.v_proj_weight.rows();
    ATTEND_CHECK(v_rows % kv_heads == 0 && v_rows > 0,
                 "v_proj_weight " + detail::shape_of(w_.v_proj_weight) +
                     " rows are not a positive multiple of num_kv_heads=" + std::to_string(kv_heads));
    layout_ = {num_heads, kv_heads, d, v_rows / kv_heads};
    ATTEND_CHECK(w_.out_proj_weight.cols() == num_heads * layout_.value_dim,
                 "out_proj_weight " + detail::shape_of(w_.out_proj_weight) + " must have num_heads * value_head_dim = " +
                     std::to_string(num_heads) + " * " + std::to_string(layout_.value_dim) + " columns");
    check_bias(w_.q_proj_bias, q_rows, "q_proj_bias");
    check_bias(w_.k_proj_bias, w_.k_proj_weight.rows(), "k_proj_bias");
    check_bias(w_.v_proj_bias, v_rows, "v_proj_bias");
    check_bias(w_.out_proj_bias, w_.out_proj_weight.rows(), "out_proj_bias");
  }

  /// From PyTorch's packed parameters (embed_dim E = kdim = vdim): in_proj_weight (3E, E) =
  /// [W_q; W_k; W_v], in_proj_bias (3E) or empty, out_proj.weight (E, E), out_proj.bias (E) or empty.
  static MultiHeadAttention from_packed(Index num_heads, const Matrix<T>& in_proj_weight,
                                        const Vector<T>& in_proj_bias, const Matrix<T>& out_proj_weight,
                                        const Vector<T>& out_proj_bias) {
    const Index e = in_proj_weight.cols();
    ATTEND_CHECK(in_proj_weight.rows() == 3 * e, "in_proj_weight " + detail::shape_of(in_proj_weight) +
                                                     " must be (3 E x E) = [W_q; W_k; W_v]");
    ATTEND_CHECK(in_proj_bias.size() == 0 || in_proj_bias.size() == 3 * e,
                 "in_proj_bias of size " + std::to_string(in_proj_bias.size()) + " must be empty or 3 E = " +
                     std::to_string(3 * e));
    const auto third = [&](Index i) {
      return in_proj_bias.size() == 0 ? Vector<T>() : Vector<T>(in_proj_bias.segment(i * e, e));
    };
    return MultiHeadAttention(num_heads,
                              {in_proj_weight.topRows(e), in_proj_weight.middleRows(e, e),
                               in_proj_weight.bottomRows(e), out_proj_weight, third(0), third(1), third(2),
                               out_proj_bias});
  }

  Index num_heads() const { return layout_.heads; }
  Index num_kv_heads() const { return layout_.kv_heads; }
  Index head_dim() const { return layout_.key_dim; }
  Index value_head_dim() const { return layout_.value_dim; }
  Index query_width() const { return w_.q_proj_weight.cols(); }  ///< E_q (PyTorch embed_dim)
  Index key_width() const { return w_.k_proj_weight.cols(); }    ///< E_k (PyTorch kdim)
  Index value_width() const { return w_.v_proj_weight.cols(); }  ///< E_v (PyTorch vdim)
  Index output_width() const { return w_.out_proj_weight.rows(); }
  const MultiHeadWeights<T>& weights() const { return w_; }

  /// Rotates the heads of Q and K with `rope` from now on (its head_dim must be head_dim()).
  /// A YaRN embedding also scales the rotated features by its attention factor m (cos and sin
  /// times m, as HF transformers and ggml), in forward, forward_batch and decode_step alike:
  /// keep the default attention scale. A bf16 or half layer takes a float embedding: it rotates
  /// the rounded projections in float and rounds them to T once (RotaryEmbedding::apply).
  /// \throws attend::invalid_argument naming both head widths when they differ.
  MultiHeadAttention& set_rotary(RotaryEmbedding<accumulator_t<T>> rope) {
    ATTEND_CHECK(rope.head_dim() == layout_.key_dim, "rotary embedding of head_dim=" + std::to_string(rope.head_dim()) +
                                                         " for attention heads of head_dim=" +
                                                         std::to_string(layout_.key_dim));
    rope_ = std::move(rope);
    return *this;
  }
  /// The rotary embedding of Q and K, or null.
  const RotaryEmbedding<accumulator_t<T>>* rotary() const { return rope_ ? &*rope_ : nullptr; }

  /// Q = query W_q^T + b_q (Lq, H d), rotated at positions first_position.. when rotary is set.
  template <class D>
  Matrix<T> project_query(const Eigen::MatrixBase<D>& query, Index first_position = 0) const {
    return rotated(detail::linear<T>(query, w_.q_proj_weight, w_.q_proj_bias, "q_proj"), first_position);
  }
  /// K = key W_k^T + b_k (Lk, H_kv d), rotated at positions first_position.. when rotary is set.
  template <class D>
  Matrix<T> project_key(const Eigen::MatrixBase<D>& key, Index first_position = 0) const {
    return rotated(detail::linear<T>(key, w_.k_proj_weight, w_.k_proj_bias, "k_proj"), first_position);
  }
  /// V = value W_v^T + b_v (Lk, H_kv d_v).
  template <class D>
  Matrix<T> project_value(const Eigen::MatrixBase<D>& value) const {
    return detail::linear<T>(value, w_.v_proj_weight, w_.v_proj_bias, "v_proj");
  }
  /// out = heads W_o^T + b_o (L, E_out) of the concatenated heads (L, H d_v).
  template <class D>
  Matrix<T> project_output(const Eigen::MatrixBase<D>& heads) const {
    return detail::linear<T>(heads, w_.out_proj_weight, w_.out_proj_bias, "out_proj");
  }

  /// Attention of `query` (Lq, E_q) over `key` (Lk, E_k) and `value` (Lk, E_v); output (Lq, E_out).
  /// `sinks` (H), when given, are learned sink logits (gpt-oss; attention/sinks.hpp): head h's
  /// softmax has one more logit sinks(h) in its denominator that carries no value, on either
  /// path; weights returned by need_weights then sum to less than 1 per row (the rest is the
  /// sink's). Every forward, forward_batch and decode step of a layer takes them last.
  template <class DQ, class DK, class DV, class Mask = NoMask>
  MultiHeadResult<T> forward(const Eigen::MatrixBase<DQ>& query, const Eigen::MatrixBase<DK>& key,
                             const Eigen::MatrixBase<DV>& value, const MaskBase<Mask>& mask = NoMask{},
                             const MultiHeadOptions& options = {},
                             const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    static_assert(detail::supported_scalars<T, DQ, DK, DV>);
    ATTEND_CHECK(key.rows() == value.rows(), "key " + detail::shape_of(key) + " and value " +
                                                 detail::shape_of(value) + " must have the same number of rows");
    const detail::ThreadScope threads(options.num_threads);  // for the projections too
    const Matrix<T> q = project_query(query), k = project_key(key), v = project_value(value);
    Matrix<T> heads(query.rows(), layout_.heads * layout_.value_dim);  // (Lq, H d_v), the concatenation
    MultiHeadResult<T> result;
    std::vector<Matrix<accumulator_t<T>>> per_head;
    const bool want = options.need_weights != NeedWeights::None;
    const std::vector<detail::SequenceViews<T>> sequences{{q, k, v, heads, want ? &per_head : nullptr}};
    detail::multi_head_attention_batch<T>(
        sequences, layout_, [&](Index) -> const Mask& { return mask.derived(); }, options, sinks);
    result.output = project_output(heads);
    if (want) result.weights = collect_weights(std::move(per_head), options);
    return result;
  }

  /// Self attention: forward(x, x, x).
  template <class DX, class Mask = NoMask>
  MultiHeadResult<T> forward(const Eigen::MatrixBase<DX>& x, const MaskBase<Mask>& mask = NoMask{},
                             const MultiHeadOptions& options = {},
                             const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    static_assert(detail::supported_scalars<T, DX>);
    return forward(x, x, x, mask, options, sinks);
  }

  /// Cross attention of x (Lq, E_q) over memory (Lk, E_k = E_v): forward(x, memory, memory).
  template <class DX, class DM, class Mask = NoMask>
  MultiHeadResult<T> forward(const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DM>& memory,
                             const MaskBase<Mask>& mask = NoMask{}, const MultiHeadOptions& options = {},
                             const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    static_assert(detail::supported_scalars<T, DX, DM>);
    return forward(x, memory, memory, mask, options, sinks);
  }

  /// A batch of sequences of different lengths, threaded over (sequence, head). Sequence s
  /// attends from queries[s] (Lq_s, E_q) over memories[s] (Lk_s, E_k = E_v), or over itself when
  /// `memories` is empty. `mask` is bound for each sequence s (HeadIndex::batch = s) and head;
  /// `key_valid_lengths` (any integer type), when given, adds KeyPadding(key_valid_lengths)
  /// (PyTorch key_padding_mask with trailing True entries). Returns the (Lq_s, E_out) outputs.
  /// `sinks` as in forward. The forward_batch overload with SequenceRows reads one padded or
  /// packed matrix in place.
  template <class Mask = NoMask, class Lengths = std::vector<Index>>
  std::vector<Matrix<T>> forward_batch(const std::vector<Matrix<T>>& queries, const std::vector<Matrix<T>>& memories,
                                       const MaskBase<Mask>& mask = NoMask{}, const Lengths& key_valid_lengths = {},
                                       const AttentionOptions& options = {},
                                       const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    const std::size_t n = queries.size();
    ATTEND_CHECK(memories.empty() || memories.size() == n,
                 std::to_string(memories.size()) + " memories for " + std::to_string(n) +
                     " query sequences (give one per sequence, or none for self attention)");
    std::vector<Index> valid = detail::index_vector(key_valid_lengths, "key_valid_lengths");
    ATTEND_CHECK(valid.empty() || valid.size() == n,
                 std::to_string(valid.size()) + " key valid lengths for " + std::to_string(n) + " sequences");
    const bool given = !valid.empty();
    const detail::ThreadScope threads(options.num_threads);  // for the projections too
    std::vector<Matrix<T>> q(n), k(n), v(n), heads(n);
    std::vector<detail::SequenceViews<T>> sequences;
    sequences.reserve(n);
    for (std::size_t s = 0; s < n; ++s) {
      const Matrix<T>& memory = memories.empty() ? queries[s] : memories[s];
      if (!given) valid.push_back(memory.rows());
      ATTEND_CHECK(valid[s] <= memory.rows(), "key_valid_lengths[" + std::to_string(s) + "] = " +
                                                  std::to_string(valid[s]) + " is outside [0, Lk=" +
                                                  std::to_string(memory.rows()) + "] of sequence " + std::to_string(s));
      q[s] = project_query(queries[s]);
      k[s] = project_key(memory);
      v[s] = project_value(memory);
      heads[s].resize(q[s].rows(), layout_.heads * layout_.value_dim);
      sequences.push_back({q[s], k[s], v[s], heads[s]});
    }
    const auto padded = mask.derived() & KeyPadding(valid);
    detail::multi_head_attention_batch<T>(
        sequences, layout_, [&](Index) -> const auto& { return padded; }, options, sinks);
    std::vector<Matrix<T>> outputs(n);
    for (std::size_t s = 0; s < n; ++s) outputs[s] = project_output(heads[s]);
    return outputs;
  }

  /// A batch read in place from one matrix per input, without copies: sequence b attends from
  /// rows query_rows(b) of `queries` (rows, E_q) over rows memory_rows(b) of `memories`
  /// (rows_m, E_k = E_v), a padded (B L, E) buffer with per-sequence lengths or packed sequences
  /// with offsets (sequences.hpp). Rotary positions start at 0 in every sequence. `mask` is
  /// bound for each (sequence, head) with that sequence's lengths, so per-sequence policies
  /// (KeyPadding(lengths), KeyPaddingMask, (B H Lq, Lk) stacked masks for equal lengths) apply.
  /// Returns output rows as the queries' (zero where no sequence is) and, when
  /// options.need_weights asks, each sequence's weights as forward returns them. `sinks` as in
  /// forward.
  template <class DX, class DM, class Mask = NoMask>
  MultiHeadBatchResult<T> forward_batch(const Eigen::MatrixBase<DX>& queries, const SequenceRows& query_rows,
                                        const Eigen::MatrixBase<DM>& memories, const SequenceRows& memory_rows,
                                        const MaskBase<Mask>& mask = NoMask{}, const MultiHeadOptions& options = {},
                                        const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    static_assert(detail::supported_scalars<T, DX, DM>);
    const Index batch = query_rows.size();
    ATTEND_CHECK(memory_rows.size() == batch, std::to_string(batch) + " query sequences and " +
                                                  std::to_string(memory_rows.size()) + " memory sequences");
    ATTEND_CHECK(query_rows.rows_used() <= queries.rows() && memory_rows.rows_used() <= memories.rows(),
                 "the sequences use " + std::to_string(query_rows.rows_used()) + " query rows and " +
                     std::to_string(memory_rows.rows_used()) + " memory rows of queries " + detail::shape_of(queries) +
                     " and memories " + detail::shape_of(memories));
    const detail::ThreadScope threads(options.num_threads);  // for the projections too
    Matrix<T> q = detail::linear<T>(queries, w_.q_proj_weight, w_.q_proj_bias, "q_proj");   // (rows, H d)
    Matrix<T> k = detail::linear<T>(memories, w_.k_proj_weight, w_.k_proj_bias, "k_proj");  // (rows_m, H_kv d)
    const Matrix<T> v = detail::linear<T>(memories, w_.v_proj_weight, w_.v_proj_bias, "v_proj");
    Matrix<T> heads = Matrix<T>::Zero(queries.rows(), layout_.heads * layout_.value_dim);  // (rows, H d_v)
    std::vector<std::vector<Matrix<accumulator_t<T>>>> per_head(static_cast<std::size_t>(batch));
    std::vector<detail::SequenceViews<T>> sequences;
    std::vector<bool> used(std::size_t(queries.rows()), false);
    const bool want = options.need_weights != NeedWeights::None;
    for (Index b = 0; b < batch; ++b) {
      const Index q0 = query_rows.begin(b), lq = query_rows.length(b);
      const Index k0 = memory_rows.begin(b), lk = memory_rows.length(b);
      if (rope_) {
        rope_->apply(q.middleRows(q0, lq), 0);
        rope_->apply(k.middleRows(k0, lk), 0);
      }
      std::fill(used.begin() + q0, used.begin() + q0 + lq, true);
      sequences.push_back({q.middleRows(q0, lq), k.middleRows(k0, lk), v.middleRows(k0, lk), heads.middleRows(q0, lq),
                           want ? &per_head[std::size_t(b)] : nullptr});
    }
    detail::multi_head_attention_batch<T>(
        sequences, layout_, [&](Index) -> const Mask& { return mask.derived(); }, options, sinks);
    MultiHeadBatchResult<T> result{project_output(heads), {}};
    for (Index r = 0; r < result.output.rows(); ++r)
      if (!used[std::size_t(r)]) result.output.row(r).setZero();
    if (want)
      for (auto& w : per_head) result.weights.push_back(collect_weights(std::move(w), options));
    return result;
  }

  /// Self attention of a batch read in place: forward_batch(x, rows, x, rows, mask, options, sinks).
  template <class DX, class Mask = NoMask>
  MultiHeadBatchResult<T> forward_batch(const Eigen::MatrixBase<DX>& x, const SequenceRows& rows,
                                        const MaskBase<Mask>& mask = NoMask{}, const MultiHeadOptions& options = {},
                                        const Eigen::Ref<const Vector<T>>& sinks = Vector<T>()) const {
    return forward_batch(x, rows, x, rows, mask, options, sinks);
  }

 private:
  /// The weights a call returns from the H per-head ones: all of them, or their mean.
  std::vector<Matrix<accumulator_t<T>>> collect_weights(std::vector<Matrix<accumulator_t<T>>> per_head,
                                                        const MultiHeadOptions& options) const {
    if (options.need_weights != NeedWeights::Averaged) return per_head;
    Matrix<accumulator_t<T>> mean = per_head[0];
    for (std::size_t h = 1; h < per_head.size(); ++h) mean += per_head[h];
    return {mean / accumulator_t<T>(layout_.heads)};
  }

  static void check_bias(const Vector<T>& bias, Index rows, const char* what) {
    ATTEND_CHECK(bias.size() == 0 || bias.size() == rows, std::string(what) + " of size " +
                                                              std::to_string(bias.size()) + " must be empty or " +
                                                              std::to_string(rows));
  }

  Matrix<T> rotated(Matrix<T> x, Index first_position) const {
    if (rope_) rope_->apply(x, first_position);
    return x;
  }

  MultiHeadWeights<T> w_;
  detail::HeadLayout layout_{};
  std::optional<RotaryEmbedding<accumulator_t<T>>> rope_;
};

}  // namespace attend
