// SPDX-License-Identifier: MIT
/// \file attention/multi_head_training.hpp
/// \brief Training a MultiHeadAttention layer: a forward that saves a context, and the backward
/// of the whole layer from it (gradients of the inputs and of every projection).
///
/// The layer computes (multi_head.hpp)
///
///     Q = R(query W_q^T + b_q),  K = R(key W_k^T + b_k),  V = value W_v^T + b_v,
///     heads = [softmax(scale Q_h K_g^T + mask) V_g]_h,   out = heads W_o^T + b_o,
///
/// R the rotary embedding (identity without one), g = h / (H / H_kv). Its backward at
/// d_out = dLoss/dout, from the outside in:
///
///     d_heads = d_out W_o,   dW_o = d_out^T heads,   db_o = sum of d_out's rows,
///     dQ, dK, dV             from multi_head_attention_backward_into (GQA: dK, dV summed over
///                            each group), with the saved per-head log-sum-exp,
///     dQ_lin = R^T dQ,  dK_lin = R^T dK            (RotaryEmbedding::apply_transpose),
///     d_query = dQ_lin W_q,  dW_q = dQ_lin^T query,  db_q = sum of dQ_lin's rows (K, V alike).
///
/// A batch of sequences read in place from one padded or packed matrix (SequenceRows) trains
/// through multi_head_layer_forward_batch and the same backward: per-sequence rotary positions,
/// the varlen attention forward and backward, the projections over all rows at once.
///
/// What the forward saves (MultiHeadContext): the inputs (self attention's x once), Q and K
/// after rotary, V, the concatenated heads and the (Lq, H) log-sum-exp: O(L E) memory, no
/// (Lq, Lk) matrix; the attention weights are recomputed tile by tile in the backward. The
/// backward takes the forward's mask and options. A query that sees no key (fully masked,
/// Lk = 0) passes no gradient to Q, K, V or the input projections; its row of the output is
/// b_o, so d_out still reaches db_o.
///
/// Float and double layers only: a bf16 or half MultiHeadAttention runs forward and decode_step,
/// and its training entry points stop at attend's static_assert (train a float copy of it).
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "backward.hpp"
#include "multi_head.hpp"

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace attend {

/// What a MultiHeadAttention forward saves for its backward. An input that is another one (self
/// attention's x, cross attention's memory) is saved once.
template <class T>
struct MultiHeadContext {
  Matrix<T> query;            ///< (Lq, E_q) the query input
  Matrix<T> key;              ///< (Lk, E_k) the key input, unless key_is_query
  Matrix<T> value;            ///< (Lk, E_v) the value input, unless value_is_key
  bool key_is_query = false;  ///< self attention: the key input is `query`
  bool value_is_key = false;  ///< self and cross attention: the value input is the key input
  Matrix<T> q;                ///< (Lq, H d) projected queries, after rotary
  Matrix<T> k;                ///< (Lk, H_kv d) projected keys, after rotary
  Matrix<T> v;                ///< (Lk, H_kv d_v) projected values
  Matrix<T> heads;            ///< (Lq, H d_v) the concatenated attention outputs, before out_proj
  Matrix<T> lse;              ///< (Lq, H) each head's log-sum-exp
  /// Where the sequences of a batch lie in the query rows and in the key (and value) rows
  /// (multi_head_layer_forward_batch); empty: one sequence of every row.
  std::optional<SequenceRows> query_rows, key_rows;

  const Matrix<T>& key_input() const { return key_is_query ? query : key; }
  const Matrix<T>& value_input() const { return value_is_key ? key_input() : value; }
};

/// The layer's output and the context its backward needs.
template <class T>
struct MultiHeadTrainingForward {
  Matrix<T> output;             ///< (Lq, E_out), as MultiHeadAttention::forward
  MultiHeadContext<T> context;  ///< what multi_head_layer_backward reads
};

/// Gradients of a loss through a MultiHeadAttention layer.
template <class T>
struct MultiHeadLayerGradients {
  Matrix<T> d_query;            ///< (Lq, E_q)
  Matrix<T> d_key;              ///< (Lk, E_k)
  Matrix<T> d_value;            ///< (Lk, E_v)
  MultiHeadWeights<T> weights;  ///< of every weight and bias, in the layer's (PyTorch) layout;
                                ///< a bias the layer does not have has an empty gradient

  /// Self attention, forward(x) = forward(x, x, x): the gradient of x is the sum of the three.
  Matrix<T> d_input() const { return d_query + d_key + d_value; }
  /// Cross attention, forward(x, memory): the gradient of memory (key and value).
  Matrix<T> d_memory() const { return d_key + d_value; }
};

namespace detail {

/// The rows of a matrix of `rows` rows that belong to no sequence of `layout`, in order.
inline std::vector<Index> rows_of_no_sequence(const SequenceRows& layout, Index rows) {
  std::vector<bool> used(std::size_t(rows), false);
  for (Index b = 0; b < layout.size(); ++b)
    std::fill(used.begin() + layout.begin(b), used.begin() + layout.begin(b) + layout.length(b), true);
  std::vector<Index> none;
  for (Index r = 0; r < rows; ++r)
    if (!used[std::size_t(r)]) none.push_back(r);
  return none;
}

/// The forward of multi_head_layer_forward(_batch) on a context whose inputs (and, for a batch,
/// sequence rows) are already saved.
template <class T, class Mask>
MultiHeadTrainingForward<T> layer_forward_saving(const MultiHeadAttention<T>& layer, MultiHeadContext<T> c,
                                                 const MaskBase<Mask>& mask, const AttentionOptions& options) {
  ATTEND_CHECK(c.key_input().rows() == c.value_input().rows(),
               "key " + shape_of(c.key_input()) + " and value " + shape_of(c.value_input()) +
                   " must have the same number of rows");
  const ThreadScope threads(options.num_threads);  // for the projections too
  const MultiHeadWeights<T>& w = layer.weights();
  const SequenceRows q_rows = c.query_rows.value_or(SequenceRows::uniform(1, c.query.rows()));
  const SequenceRows k_rows = c.key_rows.value_or(SequenceRows::uniform(1, c.key_input().rows()));
  ATTEND_CHECK(k_rows.size() == q_rows.size(), std::to_string(q_rows.size()) + " query sequences and " +
                                                   std::to_string(k_rows.size()) + " memory sequences");
  ATTEND_CHECK(q_rows.rows_used() <= c.query.rows() && k_rows.rows_used() <= c.key_input().rows(),
               "the sequences use " + std::to_string(q_rows.rows_used()) + " query rows and " +
                   std::to_string(k_rows.rows_used()) + " memory rows of queries " + shape_of(c.query) +
                   " and memories " + shape_of(c.key_input()));
  // The projections of every row, then rotary at positions 0.. in each sequence (project_query
  // and project_key for one sequence).
  c.q = linear<T>(c.query, w.q_proj_weight, w.q_proj_bias, "q_proj");
  c.k = linear<T>(c.key_input(), w.k_proj_weight, w.k_proj_bias, "k_proj");
  c.v = layer.project_value(c.value_input());
  if (const auto* rope = layer.rotary())
    for (Index b = 0; b < q_rows.size(); ++b) {
      rope->apply(c.q.middleRows(q_rows.begin(b), q_rows.length(b)), 0);
      rope->apply(c.k.middleRows(k_rows.begin(b), k_rows.length(b)), 0);
    }
  MultiHeadLseResult<T> attention =
      multi_head_attention_with_lse(c.q, c.k, c.v, layer.num_heads(), q_rows, k_rows, mask, options);
  c.heads = std::move(attention.output);  // (zero in rows of no sequence)
  c.lse = std::move(attention.lse);
  MultiHeadTrainingForward<T> result;
  result.output = layer.project_output(c.heads);
  if (c.query_rows)  // rows of no sequence are zero, as MultiHeadAttention::forward_batch's
    for (const Index r : rows_of_no_sequence(q_rows, c.query.rows())) result.output.row(r).setZero();
  result.context = std::move(c);
  return result;
}

}  // namespace detail

/// MultiHeadAttention::forward(query, key, value, mask, options) that also returns the context
/// of its backward (multi_head_layer_backward). Rotary positions start at 0.
/// \throws attend::invalid_argument as the layer's forward does.
template <class T, class DQ, class DK, class DV, class Mask = NoMask>
MultiHeadTrainingForward<T> multi_head_layer_forward(const MultiHeadAttention<T>& layer,
                                                     const Eigen::MatrixBase<DQ>& query,
                                                     const Eigen::MatrixBase<DK>& key,
                                                     const Eigen::MatrixBase<DV>& value,
                                                     const MaskBase<Mask>& mask = NoMask{},
                                                     const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DQ, DK, DV>);
  MultiHeadContext<T> c;
  c.query = query;
  c.key = key;
  c.value = value;
  return detail::layer_forward_saving(layer, std::move(c), mask, options);
}

/// Self attention: multi_head_layer_forward(layer, x, x, x, mask, options), saving x once; the
/// gradient of x is MultiHeadLayerGradients::d_input().
template <class T, class DX, class Mask = NoMask>
MultiHeadTrainingForward<T> multi_head_layer_forward(const MultiHeadAttention<T>& layer,
                                                     const Eigen::MatrixBase<DX>& x,
                                                     const MaskBase<Mask>& mask = NoMask{},
                                                     const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DX>);
  MultiHeadContext<T> c;
  c.query = x;
  c.key_is_query = c.value_is_key = true;
  return detail::layer_forward_saving(layer, std::move(c), mask, options);
}

/// Cross attention of x over memory: multi_head_layer_forward(layer, x, memory, memory, ...),
/// saving memory once; the gradient of memory is MultiHeadLayerGradients::d_memory().
template <class T, class DX, class DM, class Mask = NoMask>
MultiHeadTrainingForward<T> multi_head_layer_forward(const MultiHeadAttention<T>& layer,
                                                     const Eigen::MatrixBase<DX>& x,
                                                     const Eigen::MatrixBase<DM>& memory,
                                                     const MaskBase<Mask>& mask = NoMask{},
                                                     const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DX, DM>);
  MultiHeadContext<T> c;
  c.query = x;
  c.key = memory;
  c.value_is_key = true;
  return detail::layer_forward_saving(layer, std::move(c), mask, options);
}

/// MultiHeadAttention::forward_batch(queries, query_rows, memories, memory_rows, mask, options)
/// that also returns the context of its backward: a batch of sequences read in place from a
/// padded or packed matrix (sequences.hpp), sequence b attending from rows query_rows(b) of
/// `queries` (rows, E_q) over rows memory_rows(b) of `memories` (rows_m, E_k = E_v, saved once).
/// Rotary positions start at 0 in every sequence; `mask` binds per (sequence, head) with
/// HeadIndex{b, h, B, H} and that sequence's lengths. The output is bitwise forward_batch's
/// (zero in rows of no sequence). multi_head_layer_backward on the context gives the gradients
/// of the whole batch: d_query (rows, E_q) and d_key + d_value (d_memory(), rows_m) zero in rows
/// of no sequence, the weights' summed over the sequences. The projections run over every row,
/// padding included: its gradient is zero there, so a weight's gradient adds 0 x (its input
/// row); keep padding finite (NaN or Inf padding would reach dW).
/// \throws attend::invalid_argument as forward_batch does.
template <class T, class DX, class DM, class Mask = NoMask>
MultiHeadTrainingForward<T> multi_head_layer_forward_batch(const MultiHeadAttention<T>& layer,
                                                           const Eigen::MatrixBase<DX>& queries,
                                                           const SequenceRows& query_rows,
                                                           const Eigen::MatrixBase<DM>& memories,
                                                           const SequenceRows& memory_rows,
                                                           const MaskBase<Mask>& mask = NoMask{},
                                                           const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DX, DM>);
  MultiHeadContext<T> c;
  c.query = queries;
  c.key = memories;
  c.value_is_key = true;
  c.query_rows = query_rows;
  c.key_rows = memory_rows;
  return detail::layer_forward_saving(layer, std::move(c), mask, options);
}

/// Self attention of a batch read in place: multi_head_layer_forward_batch(layer, x, rows, x,
/// rows, mask, options), saving x once; the gradient of x is MultiHeadLayerGradients::d_input().
template <class T, class DX, class Mask = NoMask>
MultiHeadTrainingForward<T> multi_head_layer_forward_batch(const MultiHeadAttention<T>& layer,
                                                           const Eigen::MatrixBase<DX>& x, const SequenceRows& rows,
                                                           const MaskBase<Mask>& mask = NoMask{},
                                                           const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DX>);
  MultiHeadContext<T> c;
  c.query = x;
  c.key_is_query = c.value_is_key = true;
  c.query_rows = c.key_rows = rows;
  return detail::layer_forward_saving(layer, std::move(c), mask, options);
}

namespace detail {

/// The gradients of y = x W^T + b (nn.Linear) at dy: writes dx = dy W, dW = dy^T x, and
/// db = the sum of dy's rows when the layer has a bias (db stays empty otherwise).
template <class T>
void linear_backward(const Matrix<T>& x, const Matrix<T>& weight, const Vector<T>& bias, const Matrix<T>& dy,
                     Matrix<T>& dx, Matrix<T>& dw, Vector<T>& db) {
  dx.resize(dy.rows(), weight.cols());
  dw.resize(weight.rows(), weight.cols());
  parallel_product(dx, dy, weight);            // (L, in)
  parallel_product(dw, dy.transpose(), x);     // (out, in)
  // (no column of an empty dy: clang's UBSan flags a block of a null matrix)
  if (bias.size() != 0) db = dy.rows() == 0 ? Vector<T>::Zero(dy.cols()) : Vector<T>(dy.colwise().sum().transpose());
}

}  // namespace detail

/// Gradients of a loss through `layer` at d_output = dLoss/doutput (Lq, E_out), from the
/// context of multi_head_layer_forward or multi_head_layer_forward_batch with the same layer,
/// mask and options (a batch's: rows of d_output in no sequence are ignored; the attention
/// backward is the varlen multi_head_attention_backward_into, bias gradients as it allows). `bias_gradients`
/// asks for the gradients of the mask's learnable biases (a per-head T5 table, a stacked
/// per-head AdditiveMask, or ones every head shares), as multi_head_attention_backward_into.
/// \throws attend::invalid_argument when d_output or the context does not fit the layer.
template <class T, class DO, class Mask = NoMask>
MultiHeadLayerGradients<T> multi_head_layer_backward(const MultiHeadAttention<T>& layer,
                                                     const MultiHeadContext<T>& context,
                                                     const Eigen::MatrixBase<DO>& d_output,
                                                     const MaskBase<Mask>& mask = NoMask{},
                                                     const AttentionOptions& options = {},
                                                     const BiasGradients<T>& bias_gradients = {}) {
  static_assert(detail::full_precision_scalars<T, DO>);
  const MultiHeadContext<T>& c = context;
  const MultiHeadWeights<T>& w = layer.weights();
  const Index lq = c.query.rows(), lk = c.key_input().rows();
  detail::check_shape(d_output, lq, layer.output_width(), "d_output");
  detail::check_shape(c.q, lq, w.q_proj_weight.rows(), "saved q");
  detail::check_shape(c.k, lk, w.k_proj_weight.rows(), "saved k");
  detail::check_shape(c.v, lk, w.v_proj_weight.rows(), "saved v");
  detail::check_shape(c.heads, lq, w.out_proj_weight.cols(), "saved heads");
  detail::check_shape(c.lse, lq, layer.num_heads(), "saved log-sum-exp");
  const detail::ThreadScope threads(options.num_threads);
  MultiHeadLayerGradients<T> g;
  const SequenceRows q_rows = c.query_rows.value_or(SequenceRows::uniform(1, lq));
  const SequenceRows k_rows = c.key_rows.value_or(SequenceRows::uniform(1, lk));
  Matrix<T> d_out = d_output;  // (Lq, E_out)
  if (c.query_rows)  // an output row of no sequence is the constant 0: nothing flows from it
    for (const Index r : detail::rows_of_no_sequence(q_rows, lq)) d_out.row(r).setZero();

  // out = heads W_o^T + b_o
  Matrix<T> d_heads;  // (Lq, H d_v)
  detail::linear_backward(c.heads, w.out_proj_weight, w.out_proj_bias, d_out, d_heads, g.weights.out_proj_weight,
                          g.weights.out_proj_bias);

  // heads = attention(Q, K, V): dQ, dK, dV with respect to the rotated projections
  Matrix<T> dq(lq, c.q.cols()), dk(lk, c.k.cols()), dv(lk, c.v.cols());
  multi_head_attention_backward_into(c.q, c.k, c.v, layer.num_heads(), q_rows, k_rows, c.heads, c.lse, d_heads, dq,
                                     dk, dv, mask, options, bias_gradients);
  if (const auto* rope = layer.rotary())  // Q = R Q_lin: dQ_lin = R^T dQ, per sequence from position 0
    for (Index b = 0; b < q_rows.size(); ++b) {
      rope->apply_transpose(dq.middleRows(q_rows.begin(b), q_rows.length(b)), 0);
      rope->apply_transpose(dk.middleRows(k_rows.begin(b), k_rows.length(b)), 0);
    }

  detail::linear_backward(c.query, w.q_proj_weight, w.q_proj_bias, dq, g.d_query, g.weights.q_proj_weight,
                          g.weights.q_proj_bias);
  detail::linear_backward(c.key_input(), w.k_proj_weight, w.k_proj_bias, dk, g.d_key, g.weights.k_proj_weight,
                          g.weights.k_proj_bias);
  detail::linear_backward(c.value_input(), w.v_proj_weight, w.v_proj_bias, dv, g.d_value, g.weights.v_proj_weight,
                          g.weights.v_proj_bias);
  return g;
}

}  // namespace attend
