// SPDX-License-Identifier: MIT
/// \file attention/backward.hpp
/// \brief Gradients of attention (training): for a forward out = softmax(S) V with its saved
/// log-sum-exp, and the gradient dO of a loss with respect to out, the gradients dQ, dK, dV and
/// those of the variant's parameters.
///
///   P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  D_i = <dO_i, O_i>,  dS = P * (dP - D),
///   dQ = scale dS K,   dK = scale dS^T Q
/// (FlashAttention-2's backward; see attention/backward_blocked.hpp for the two passes). What a
/// forward must save is its inputs, its output and its log-sum-exp (the `_with_lse` forms, or
/// the `lse` argument of the `_into` forms); the weights are recomputed, so the forward's
/// recomputation is the gradient checkpointing. The backward takes the same mask and options
/// as its forward; `Algorithm::Auto` picks the same path. Defined results: a query that saw no
/// key (fully masked, or Lk = 0) has zero gradients and contributes nothing; NaN propagates to
/// the gradients it touches. Results are bitwise identical for any thread count. The multi-head
/// forms also take a batch of sequences read in place (SequenceRows, as the varlen
/// multi_head_attention_into): each sequence's gradients are bitwise those of a call on it alone.
#pragma once

#include "../biases.hpp"
#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../sequences.hpp"
#include "../types.hpp"
#include "backward_blocked.hpp"
#include "backward_materialized.hpp"
#include "dot_family.hpp"
#include "local_window.hpp"
#include "multi_head.hpp"
#include "scaled_dot_product.hpp"
#include "top_k.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace attend {

/// Gradients of the inputs of one attention call.
template <class T>
struct AttentionGradients {
  Matrix<T> dq;  ///< (Lq, Dk)
  Matrix<T> dk;  ///< (Lk, Dk)
  Matrix<T> dv;  ///< (Lk, Dv)
};

/// Which T5 relative-position buckets a table gradient sums into: the configuration of the
/// RelativePositionBias the forward used (see biases.hpp).
struct RelativePositionBuckets {
  Index num_buckets = 32;
  bool bidirectional = true;
  Index max_distance = 128;
  Alignment alignment = Alignment::TopLeft;
};

/// Gradients of learnable score biases, on request. The gradient of a bias added to the scores
/// is dS = dL/dS itself (zero at hidden keys). Each field, when set, is resized and filled:
///  - d_bias (Lq, Lk): the gradient of an AdditiveMask's matrix that every head shares, summed
///    over the heads of a multi-head call (for one mask in the call; several additive masks each
///    get this same gradient);
///  - d_bias_per_head (H Lq, Lk): slice h (rows h Lq .. (h + 1) Lq) the gradient of head h's
///    slice of a stacked per-head AdditiveMask (masks.hpp); (Lq, Lk) for one head;
///  - d_table (num_buckets): the gradient of a T5 table that every head shares (a vector table),
///    sum of dS_ij over the (i, j) with bucket(j - a_i) = b, buckets as `table_buckets` says,
///    summed over the heads of a multi-head call;
///  - d_table_per_head (num_buckets, H): column h the gradient of column h of a per-head
///    (num_buckets, H) RelativePositionBias table.
/// Sums over heads and key tiles run in a fixed order: bitwise the same for any thread count.
/// The dS of every head is kept until the heads are summed, so a multi-head d_bias without
/// d_bias_per_head holds an (H Lq, Lk) temporary.
/// The gradients are those of biases that no score modifier (SoftCap, ScoreMod) follows in the
/// mask: a request with a mask that has a modifier is rejected.
template <class T>
struct BiasGradients {
  Matrix<T>* d_bias = nullptr;
  Vector<T>* d_table = nullptr;
  RelativePositionBuckets table_buckets{};
  Matrix<T>* d_bias_per_head = nullptr;
  Matrix<T>* d_table_per_head = nullptr;

  bool requested() const { return d_bias || d_table || d_bias_per_head || d_table_per_head; }
};

namespace detail {

/// Receives the key pass's tiles of dS of one head (backward_blocked.hpp): copies them into rows
/// [row0, row0 + Lq) of d_bias, and sums them by bucket into row `task` of `partials` (one row
/// per key tile, summed in order after).
template <class T>
struct BiasGradientSink {
  static constexpr bool active = true;
  Matrix<T>* d_bias = nullptr;                 // (H Lq, Lk) or null
  Index row0 = 0;                              // the head's first row in d_bias
  Matrix<T>* partials = nullptr;               // (tasks, num_buckets) or null
  const std::vector<Index>* bucket = nullptr;  // bucket of relative position d at [d - d_min]
  Index d_min = 0;
  Index offset = 0;  // aligned key of query 0

  template <class S>
  void add(const S& ds, Index q0, Index k0, Index task) const {
    if (d_bias) d_bias->block(row0 + q0, k0, ds.rows(), ds.cols()) = ds;
    if (!partials) return;
    for (Index i = 0; i < ds.rows(); ++i) {
      const Index first = k0 - (q0 + i + offset) - d_min;  // relative position of key k0, shifted
      for (Index j = 0; j < ds.cols(); ++j) (*partials)(task, (*bucket)[std::size_t(first + j)]) += ds(i, j);
    }
  }
};

/// The sinks of a backward call of H heads for the gradients `request` asks for, and the sums
/// that make the requested gradients of what they received (finish).
template <class T>
class BiasGradientSinks {
 public:
  /// \param tasks the key pass's tasks of one head (key tiles; 1 for the materialized path)
  /// \throws attend::invalid_argument on a bad bucket configuration or a gradient too large
  BiasGradientSinks(const BiasGradients<T>& request, Index num_heads, Index num_queries, Index num_keys, Index tasks)
      : request_(request), heads_(num_heads), queries_(num_queries), keys_(num_keys), tasks_(tasks) {
    sinks_.resize(std::size_t(num_heads));
    Matrix<T>* d_bias = nullptr;  // (H Lq, Lk) the sinks write
    if (request.d_bias_per_head) {
      check_array_size<T>(num_heads * num_queries, num_keys, "per-head bias gradient (H Lq x Lk)");
      request.d_bias_per_head->setZero(num_heads * num_queries, num_keys);
      d_bias = request.d_bias_per_head;
    }
    if (request.d_bias) {
      check_array_size<T>(num_queries, num_keys, "bias gradient (Lq x Lk)");
      if (!d_bias) {
        d_bias = num_heads == 1 ? request.d_bias : &stacked_;
        check_array_size<T>(num_heads * num_queries, num_keys, "per-head bias gradient (H Lq x Lk)");
        d_bias->setZero(num_heads * num_queries, num_keys);
      }
    }
    if (request.d_table || request.d_table_per_head) {
      const RelativePositionBuckets& b = request.table_buckets;
      relative_position_bucket(0, b.bidirectional, b.num_buckets, b.max_distance);  // validates the configuration
      offset_ = diagonal_offset(b.alignment, num_queries, num_keys);
      d_min_ = -(num_queries - 1 + offset_);
      if (num_queries > 0 && num_keys > 0)
        for (Index d = d_min_; d <= num_keys - 1 - offset_; ++d)
          bucket_.push_back(relative_position_bucket(d, b.bidirectional, b.num_buckets, b.max_distance));
      partials_.assign(std::size_t(num_heads), Matrix<T>::Zero(tasks, b.num_buckets));
    }
    for (Index h = 0; h < num_heads; ++h) {
      BiasGradientSink<T>& sink = sinks_[std::size_t(h)];
      sink.d_bias = d_bias;
      sink.row0 = h * num_queries;
      if (!partials_.empty()) {
        sink.partials = &partials_[std::size_t(h)];
        sink.bucket = &bucket_;
        sink.d_min = d_min_;
        sink.offset = offset_;
      }
    }
  }

  /// Head h's sink; the sinks of heads h, h + 1, ... follow it.
  const BiasGradientSink<T>* sinks(Index h = 0) const { return &sinks_[std::size_t(h)]; }

  /// Sums what the sinks received into the requested gradients: per-head tables over the key
  /// tiles in order, shared ones over the heads in order.
  void finish() {
    const bool empty = queries_ == 0 || keys_ == 0;  // (no block of an empty matrix)
    if (request_.d_bias) {
      const Matrix<T>* stacked = request_.d_bias_per_head ? request_.d_bias_per_head : &stacked_;
      if (heads_ > 1 || request_.d_bias_per_head) {
        request_.d_bias->setZero(queries_, keys_);
        if (!empty)
          for (Index h = 0; h < heads_; ++h) *request_.d_bias += stacked->middleRows(h * queries_, queries_);
      }
    }
    if (request_.d_table || request_.d_table_per_head) {
      const Index buckets = request_.table_buckets.num_buckets;
      Matrix<T> columns = Matrix<T>::Zero(buckets, heads_);  // (num_buckets, H)
      for (Index h = 0; h < heads_; ++h)
        for (Index t = 0; t < tasks_; ++t) columns.col(h) += partials_[std::size_t(h)].row(t).transpose();
      if (request_.d_table) {
        request_.d_table->setZero(buckets);
        for (Index h = 0; h < heads_; ++h) *request_.d_table += columns.col(h);
      }
      if (request_.d_table_per_head) *request_.d_table_per_head = std::move(columns);
    }
  }

 private:
  BiasGradients<T> request_;
  Index heads_, queries_, keys_, tasks_;
  Index offset_ = 0, d_min_ = 0;
  Matrix<T> stacked_;                // (H Lq, Lk) for d_bias of several heads without d_bias_per_head
  std::vector<Matrix<T>> partials_;  // per head (tasks, num_buckets)
  std::vector<Index> bucket_;        // bucket of relative position d at [d - d_min]
  std::vector<BiasGradientSink<T>> sinks_;
};

/// Rejects bias gradients with a mask that has a score modifier: dS is the gradient of the final
/// scores, not of a bias that a modifier transforms afterwards.
template <class BoundMask>
void check_bias_gradients_without_modifier(bool requested) {
  if constexpr (has_score_slope<BoundMask>::value)
    ATTEND_CHECK(!requested,
                 "bias gradients (BiasGradients) with a mask that has a score modifier (SoftCap, ScoreMod) are not "
                 "supported: the gradient of a bias is dS only where no modifier transforms the scores after it");
}

/// Checks the shapes of a backward call (out and d_out of out_cols columns) and that no output
/// shares memory with an input or another output.
template <class T>
void check_backward(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                    const ConstMatrixRef<T>& out, Index lse_size, const ConstMatrixRef<T>& d_out,
                    const MatrixRef<T>& dq, const MatrixRef<T>& dk, const MatrixRef<T>& dv, Index out_cols) {
  check_shape(out, q.rows(), out_cols, "forward output");
  ATTEND_CHECK(lse_size == q.rows(), "forward log-sum-exp of size " + std::to_string(lse_size) +
                                         " must have Lq = " + std::to_string(q.rows()) +
                                         " entries (save it with the forward's _with_lse form or lse argument)");
  check_shape(d_out, q.rows(), out_cols, "output gradient d_out");
  check_shape(dq, q.rows(), q.cols(), "dq");
  check_shape(dk, k.rows(), k.cols(), "dk");
  check_shape(dv, v.rows(), v.cols(), "dv");
  const auto inputs = {std::pair<const ConstMatrixRef<T>*, const char*>{&q, "input q"},
                       {&k, "input k"},
                       {&v, "input v"},
                       {&out, "forward output"},
                       {&d_out, "d_out"}};
  for (const auto& [input, name] : inputs) {
    check_no_alias(dq, "dq", *input, name);
    check_no_alias(dk, "dk", *input, name);
    check_no_alias(dv, "dv", *input, name);
  }
  check_no_alias(dq, "dq", dk, "dk");
  check_no_alias(dq, "dq", dv, "dv");
  check_no_alias(dk, "dk", dv, "dv");
}

/// The shared core of every single-head backward: checks, binds the mask, and runs the path
/// `options` selects (as the forward's attention_into does).
template <class T, class Modifier, class Mask, class Sink>
void attention_backward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                             const ConstMatrixRef<T>& out, const ConstStridedVectorRef<T>& lse,
                             const ConstMatrixRef<T>& d_out, T scale, const Modifier& modifier, const Mask& mask,
                             const AttentionOptions& options, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv,
                             const Sink& sink) {
  const ThreadScope threads(options.num_threads);
  check_backward<T>(q, k, v, out, lse.size(), d_out, dq, dk, dv, v.cols());
  const TileShape tiles = resolve_backward_tiles(options, q.rows(), k.rows());
  const auto bound = bind_mask(mask, HeadIndex{}, q.rows(), k.rows());
  const BackwardHead<T> head{q, out, d_out, lse};
  if (use_blocked(options, q.rows(), k.rows()))
    blocked_backward<T>(head, k, v, scale, modifier, bound, tiles, dq, dk, dv, sink);
  else
    materialized_backward<T>(head, k, v, scale, modifier, bound, dq, dk, dv, sink);
}

/// attention_backward_into with the bias gradients of `request`.
template <class T, class Modifier, class Mask>
void attention_backward_into(const ConstMatrixRef<T>& q, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v,
                             const ConstMatrixRef<T>& out, const ConstStridedVectorRef<T>& lse,
                             const ConstMatrixRef<T>& d_out, T scale, const Modifier& modifier, const Mask& mask,
                             const AttentionOptions& options, MatrixRef<T> dq, MatrixRef<T> dk, MatrixRef<T> dv,
                             const BiasGradients<T>& request) {
  const Index num_queries = q.rows(), num_keys = k.rows();
  check_bias_gradients_without_modifier<decltype(bind_mask(mask, HeadIndex{}, 0, 0))>(request.requested());
  const bool blocked = use_blocked(options, num_queries, num_keys);
  const TileShape tiles = resolve_backward_tiles(options, num_queries, num_keys);
  const Index tasks = blocked ? std::max<Index>((num_keys + tiles.keys - 1) / tiles.keys, 1) : 1;
  BiasGradientSinks<T> sinks(request, 1, num_queries, num_keys, tasks);
  attention_backward_into<T>(q, k, v, out, lse, d_out, scale, modifier, mask, options, dq, dk, dv, *sinks.sinks());
  sinks.finish();
}

/// Gradients of y = x / max(||x||, 1e-12) (unit_rows) for each row: with n = ||x||,
///   dx = (dy - y <y, dy>) / n  when n > 1e-12,   dx = dy / 1e-12 otherwise.
/// x is a contiguous copy, as unit_rows normalizes one, so the norms round as the forward's.
template <class T>
Matrix<T> unit_rows_backward(const Matrix<T>& x, const Matrix<T>& y, const Matrix<T>& dy) {
  Matrix<T> dx(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    const T norm = x.row(i).stableNorm();
    if (norm > T(kUnitRowsMinNorm))
      dx.row(i) = (dy.row(i) - y.row(i) * y.row(i).dot(dy.row(i))) / norm;
    else
      dx.row(i) = dy.row(i) / T(kUnitRowsMinNorm);
  }
  return dx;
}

/// Allocated gradients of the shapes of q, k, v.
template <class T, class DQ, class DK, class DV>
AttentionGradients<T> gradients_like(const DQ& q, const DK& k, const DV& v) {
  return {Matrix<T>(q.rows(), q.cols()), Matrix<T>(k.rows(), k.cols()), Matrix<T>(v.rows(), v.cols())};
}

}  // namespace detail

/// Writes the gradients of scaled_dot_product_attention(q, k, v, mask, options) at `d_out` into
/// dq (Lq, Dk), dk (Lk, Dk), dv (Lk, Dv), given the forward's output `out` (Lq, Dv) and its
/// log-sum-exp `lse` (Lq). The mask and options must be the forward's. Gradients of an
/// AdditiveMask's bias or a T5 table: pass `bias_gradients`.
/// \throws attend::invalid_argument on mismatched shapes (naming them), a bad mask or tile size,
///         or an output sharing memory with an input or another output.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
void scaled_dot_product_attention_backward_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DO>& out,
                                                const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
                                                MatrixRef<typename DQ::Scalar> dq, MatrixRef<typename DQ::Scalar> dk,
                                                MatrixRef<typename DQ::Scalar> dv,
                                                const MaskBase<Mask>& mask = NoMask{},
                                                const AttentionOptions& options = {},
                                                const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  detail::check_qkv(q, k, v);
  const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v), out_ref(out), d_out_ref(d_out);
  const Vector<T> lse_copy = lse.reshaped();  // O(Lq); any vector expression or orientation
  const T scale = detail::resolve_scale<T>(options, q.cols());
  if (bias_gradients.requested())
    detail::attention_backward_into<T>(q_ref, k_ref, v_ref, out_ref, lse_copy, d_out_ref, scale,
                                       detail::IdentityModifier{}, mask.derived(), options, dq, dk, dv, bias_gradients);
  else
    detail::attention_backward_into<T>(q_ref, k_ref, v_ref, out_ref, lse_copy, d_out_ref, scale,
                                       detail::IdentityModifier{}, mask.derived(), options, dq, dk, dv,
                                       detail::NoBiasGradient{});
}

/// Returns the gradients of scaled_dot_product_attention(q, k, v, mask, options) at `d_out`,
/// given its `_with_lse` result. See scaled_dot_product_attention_backward_into.
template <class DQ, class DK, class DV, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> scaled_dot_product_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const AttentionResult<typename DQ::Scalar>& forward, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DD>);
  using T = typename DQ::Scalar;
  detail::check_qkv(q, k, v);
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  scaled_dot_product_attention_backward_into(q, k, v, forward.output, forward.lse, d_out, g.dq, g.dk, g.dv, mask,
                                             options, bias_gradients);
  return g;
}

/// Gradients of dot_product_attention (scale 1 unless options.scale is set), given its output
/// and log-sum-exp.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> dot_product_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  detail::check_qkv(q, k, v);
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  scaled_dot_product_attention_backward_into(q, k, v, out, lse, d_out, g.dq, g.dk, g.dv, mask,
                                             detail::with_default_scale(options, 1.0));
  return g;
}

/// Gradients of bilinear attention, with that of its weight W (d_q, d_k).
template <class T>
struct BilinearGradients {
  Matrix<T> dq;  ///< (Lq, d_q)
  Matrix<T> dk;  ///< (Lk, d_k)
  Matrix<T> dv;  ///< (Lk, Dv)
  Matrix<T> dw;  ///< (d_q, d_k)
};

/// Gradients of bilinear_attention(q, k, v, w, mask, options), s_ij = q_i^T W k_j, given its output
/// and log-sum-exp. With Q' = Q W and dQ' its gradient from the engine: dQ = dQ' W^T, dW = Q^T dQ'.
template <class DQ, class DK, class DV, class DW, class DO, class DL, class DD, class Mask = NoMask>
BilinearGradients<typename DQ::Scalar> bilinear_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const Eigen::MatrixBase<DW>& w, const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse,
    const Eigen::MatrixBase<DD>& d_out, const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DW, DO, DL, DD>);
  using T = typename DQ::Scalar;
  const detail::ThreadScope threads(options.num_threads);
  ATTEND_CHECK(w.rows() == q.cols() && w.cols() == k.cols(), "bilinear weight W " + detail::shape_of(w) +
                                                                 " must be (d_q x d_k) for q " + detail::shape_of(q) +
                                                                 " and k " + detail::shape_of(k));
  Matrix<T> q_w(q.rows(), w.cols());  // (Lq, d_k)
  detail::parallel_product(q_w, q, w);
  BilinearGradients<T> g{Matrix<T>(q.rows(), q.cols()), Matrix<T>(k.rows(), k.cols()), Matrix<T>(v.rows(), v.cols()),
                         Matrix<T>(w.rows(), w.cols())};
  Matrix<T> d_q_w(q.rows(), w.cols());  // (Lq, d_k)
  scaled_dot_product_attention_backward_into(q_w, k, v, out, lse, d_out, d_q_w, g.dk, g.dv, mask,
                                             detail::with_default_scale(options, 1.0));
  detail::parallel_product(g.dq, d_q_w, w.transpose());
  detail::parallel_product(g.dw, q.transpose(), d_q_w);
  return g;
}

/// Gradients of cosine attention, with that of its temperature.
template <class T>
struct CosineGradients {
  Matrix<T> dq;         ///< (Lq, Dk)
  Matrix<T> dk;         ///< (Lk, Dk)
  Matrix<T> dv;         ///< (Lk, Dv)
  T d_temperature = 0;  ///< dL / d temperature
};

/// Gradients of cosine_attention(q, k, v, temperature, mask, options), given its output and
/// log-sum-exp. With unit rows Q^, K^ (unit_rows) and s = <q^_i, k^_j> / t, the engine gives
/// dQ^, dK^; then through the normalization (unit_rows_backward) and
///   dL/dt = -(1/t) sum_ij dS_ij s_ij = -(1/t) sum_i <q^_i, dq^_i>.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
CosineGradients<typename DQ::Scalar> cosine_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, double temperature,
    const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  const detail::ThreadScope threads(options.num_threads);
  ATTEND_CHECK(temperature > 0 && std::isfinite(temperature) && std::isfinite(static_cast<T>(1.0 / temperature)),
               "cosine attention temperature " + detail::number_string(temperature) +
                   " must be a positive finite number whose inverse is a finite " + detail::scalar_name<T>());
  ATTEND_CHECK(!options.scale, "cosine attention takes its scale as 1 / temperature; leave options.scale unset (got " +
                                   detail::number_string(*options.scale) + ")");
  detail::check_qkv(q, k, v);
  const Matrix<T> q_copy = q, k_copy = k;  // contiguous, as unit_rows normalizes them
  const Matrix<T> q_unit = detail::unit_rows(q_copy), k_unit = detail::unit_rows(k_copy);
  AttentionGradients<T> unit = detail::gradients_like<T>(q, k, v);
  scaled_dot_product_attention_backward_into(q_unit, k_unit, v, out, lse, d_out, unit.dq, unit.dk, unit.dv, mask,
                                             detail::with_default_scale(options, 1.0 / temperature));
  Vector<T> row_sums(q_unit.rows());
  detail::row_dots(q_unit.data(), q_unit.outerStride(), unit.dq.data(), unit.dq.outerStride(), q_unit.rows(), q.cols(),
                   row_sums.data());
  T sum = 0;
  for (Index i = 0; i < q_unit.rows(); ++i) sum += row_sums(i);
  return {detail::unit_rows_backward<T>(q_copy, q_unit, unit.dq),
          detail::unit_rows_backward<T>(k_copy, k_unit, unit.dk), std::move(unit.dv),
          -sum / static_cast<T>(temperature)};
}

/// Gradients of soft_capped_attention(q, k, v, cap, mask, options), s = cap tanh(z / cap) with
/// z = scale <q_i, k_j>, given its output and log-sum-exp: dZ = dS (1 - (s / cap)^2).
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> soft_capped_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, double cap,
    const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  const T checked_cap = detail::checked_soft_cap<T>(cap);
  detail::check_qkv(q, k, v);
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v), out_ref(out), d_out_ref(d_out);
  const Vector<T> lse_copy = lse.reshaped();
  detail::attention_backward_into<T>(
      q_ref, k_ref, v_ref, out_ref, lse_copy, d_out_ref, detail::resolve_scale<T>(options, q.cols()),
      detail::SoftCapModifier<T>{checked_cap}, mask.derived(), options, g.dq, g.dk, g.dv, detail::NoBiasGradient{});
  return g;
}

/// Gradients of local_window_attention(q, k, v, window, mask, options), given its output and
/// log-sum-exp. The blocked path visits only the tiles the window sees: O(L w d).
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> local_window_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const Window& window, const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse,
    const Eigen::MatrixBase<DD>& d_out, const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  detail::check_qkv(q, k, v);
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  scaled_dot_product_attention_backward_into(q, k, v, out, lse, d_out, g.dq, g.dk, g.dv, window & mask,
                                             detail::local_window_options(options, window, k.rows()));
  return g;
}

/// Gradients of top_k_attention(q, k, v, top_k, mask, options), given its output and log-sum-exp,
/// with the selection held fixed: each query's keys are selected again (by index, as the forward
/// selects them; call with the forward's options) and the engine differentiates through them.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> top_k_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index top_k,
    const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  const detail::ThreadScope threads(options.num_threads);
  ATTEND_CHECK(top_k >= 1, "top-k attention needs k >= 1, got k=" + std::to_string(top_k));
  detail::check_qkv(q, k, v);
  const ConstMatrixRef<T> q_ref(q), k_ref(k);
  const T scale = detail::resolve_scale<T>(options, q.cols());
  const detail::KeySelection selection = detail::select_top_keys<T>(
      q_ref, k_ref, detail::ScaledDot<T>{scale}, detail::bind_mask(mask.derived(), HeadIndex{}, q.rows(), k.rows()),
      std::min(top_k, k.rows()), detail::resolve_tiles(options, q.rows(), k.rows()));
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  scaled_dot_product_attention_backward_into(q, k, v, out, lse, d_out, g.dq, g.dk, g.dv,
                                             mask.derived() & detail::SelectedKeys(selection), options);
  return g;
}

/// Gradients of hard_attention (top-k with k = 1).
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> hard_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) {
  return top_k_attention_backward(q, k, v, 1, out, lse, d_out, mask, options);
}

/// Output and log-sum-exp of a multi-head call, what its backward needs.
template <class T>
struct MultiHeadLseResult {
  Matrix<T> output;  ///< (Lq, H d_v)
  Matrix<T> lse;     ///< (Lq, H), column h for head h
};

/// Multi-head attention of a batch of sequences read in place (the varlen form) with each
/// head's log-sum-exp: multi_head_attention_into(q, k, v, num_heads, query_rows, key_rows, out,
/// mask, options, lse) into a new output (rows, H d_v) and log-sum-exp (rows, H). Rows of no
/// sequence hold zeros and -inf. Sequence b's rows are bitwise those of a call on it alone
/// (with a mask that binds the same for it).
/// \throws attend::invalid_argument as multi_head_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
MultiHeadLseResult<typename DQ::Scalar> multi_head_attention_with_lse(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const SequenceRows& query_rows, const SequenceRows& key_rows, const MaskBase<Mask>& mask = NoMask{},
    const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using T = typename DQ::Scalar;
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  MultiHeadLseResult<T> result{Matrix<T>(q.rows(), layout.heads * layout.value_dim), Matrix<T>(q.rows(), layout.heads)};
  multi_head_attention_into(q, k, v, num_heads, query_rows, key_rows, result.output, mask, options, result.lse);
  return result;
}

/// Multi-head attention of projected inputs (as multi_head_attention) with each head's
/// log-sum-exp: q (Lq, H d), k (Lk, H_kv d), v (Lk, H_kv d_v); query head h reads kv head
/// h / (H / H_kv), and the mask is bound per head (HeadIndex{0, h, 1, H}). The forward of
/// multi_head_attention_into with its `lse` argument: the same heads in parallel, the same
/// output bits.
/// \throws attend::invalid_argument when the widths do not split into heads.
template <class DQ, class DK, class DV, class Mask = NoMask>
MultiHeadLseResult<typename DQ::Scalar> multi_head_attention_with_lse(const Eigen::MatrixBase<DQ>& q,
                                                                      const Eigen::MatrixBase<DK>& k,
                                                                      const Eigen::MatrixBase<DV>& v, Index num_heads,
                                                                      const MaskBase<Mask>& mask = NoMask{},
                                                                      const AttentionOptions& options = {}) {
  return multi_head_attention_with_lse(q, k, v, num_heads, SequenceRows::uniform(1, q.rows()),
                                       SequenceRows::uniform(1, k.rows()), mask, options);  // one sequence
}

namespace detail {

/// One sequence of a multi-head backward that sees something (Lq, Lk > 0): head h's views,
/// bound mask and bias-gradient sink, the K and V its heads read, its gradients, and the path
/// and tiles its lengths select (those of a call on it alone).
template <class T, class BoundMask, class Sink>
struct BackwardSequence {
  std::vector<BackwardHead<T>> heads;  // H
  std::vector<BoundMask> masks;        // H
  const Sink* sinks;                   // H
  ConstMatrixRef<T> k;                 // (Lk, H_kv d)
  ConstMatrixRef<T> v;                 // (Lk, H_kv d_v)
  MatrixRef<T> dq;                     // (Lq, H d)
  MatrixRef<T> dk;                     // (Lk, H_kv d)
  MatrixRef<T> dv;                     // (Lk, H_kv d_v)
  TileShape tiles;
  bool blocked;
};

/// The gradients of every sequence, each computed as a call on it alone would (GQA: kv head g
/// serves query heads g group .. (g + 1) group - 1, summed in head order). Three parallel loops
/// over the sequences together: (sequence, kv head) items of the materialized path, then the
/// blocked path's key pass over (sequence, kv head, key tile) items and its query pass over
/// (sequence, head, query tile) items, so that even one head splits across threads -- or, when
/// the blocked sequences have at least as many kv heads as the team has threads, the one pass
/// over (sequence, kv head) items (backward_group_one_pass, bitwise the same). Every item
/// owns the rows it writes: no atomics, and the bits do not depend on the threads.
template <class T, class BoundMask, class Sink>
void multi_head_backward_passes(const std::vector<BackwardSequence<T, BoundMask, Sink>>& sequences,
                                const HeadLayout& layout, T scale) {
  const Index d = layout.key_dim, dv_width = layout.value_dim, group = layout.heads / layout.kv_heads;
  constexpr bool slope = needs_slope<IdentityModifier, BoundMask>;
  const auto key_tiles = [](const BackwardSequence<T, BoundMask, Sink>& seq) {
    return (seq.k.rows() + seq.tiles.keys - 1) / seq.tiles.keys;
  };
  const auto query_tiles = [](const BackwardSequence<T, BoundMask, Sink>& seq) {
    return (seq.heads[0].q.rows() + seq.tiles.queries - 1) / seq.tiles.queries;
  };
  std::vector<std::pair<std::size_t, Index>> dense;  // (sequence, kv head) on the materialized path
  std::vector<Index> key_end, query_end;             // per sequence, one past its last item of each pass
  TileShape largest{1, 1};                           // the scratch fits every sequence's tiles
  Index key_items = 0, query_items = 0;
  for (std::size_t b = 0; b < sequences.size(); ++b) {
    const BackwardSequence<T, BoundMask, Sink>& seq = sequences[b];
    if (seq.blocked) {
      key_items += layout.kv_heads * key_tiles(seq);
      query_items += layout.heads * query_tiles(seq);
      largest = {std::max(largest.queries, seq.tiles.queries), std::max(largest.keys, seq.tiles.keys)};
    } else {
      for (Index g = 0; g < layout.kv_heads; ++g) dense.emplace_back(b, g);
    }
    key_end.push_back(key_items);
    query_end.push_back(query_items);
  }
  const auto k_of = [&](const BackwardSequence<T, BoundMask, Sink>& seq, Index g) {
    return ConstMatrixRef<T>(seq.k.middleCols(g * d, d));
  };
  const auto v_of = [&](const BackwardSequence<T, BoundMask, Sink>& seq, Index g) {
    return ConstMatrixRef<T>(seq.v.middleCols(g * dv_width, dv_width));
  };
  // Item `item` of a pass: its sequence and its index among that sequence's items.
  const auto locate = [](const std::vector<Index>& end, Index item) {
    const std::size_t b = std::size_t(std::upper_bound(end.begin(), end.end(), item) - end.begin());
    return std::pair<std::size_t, Index>{b, item - (b == 0 ? 0 : end[b - 1])};
  };
  // The readable path, a kv head's query heads in order; its dK and dV sum theirs.
  parallel_for(Index(dense.size()), [&](Index item) {
    const auto [b, g] = dense[std::size_t(item)];
    const BackwardSequence<T, BoundMask, Sink>& seq = sequences[b];
    MatrixRef<T> dq = seq.dq, all_dk = seq.dk, all_dv = seq.dv;  // writable copies of the views
    MatrixRef<T> dk = all_dk.middleCols(g * d, d), dv = all_dv.middleCols(g * dv_width, dv_width);
    dk.setZero();
    dv.setZero();
    Matrix<T> dk_head(seq.k.rows(), d), dv_head(seq.k.rows(), dv_width);
    for (Index h = g * group; h < (g + 1) * group; ++h) {
      materialized_backward<T>(seq.heads[std::size_t(h)], k_of(seq, g), v_of(seq, g), scale, IdentityModifier{},
                               seq.masks[std::size_t(h)], dq.middleCols(h * d, d), dk_head, dv_head, seq.sinks[h]);
      dk += dk_head;
      dv += dv_head;
    }
  });
  // One pass when the blocked sequences' kv groups give every thread a task: (sequence, kv head)
  // items, each its group's dQ, dK and dV, bitwise the two passes' (backward_group_one_pass).
  std::vector<std::size_t> blocked;  // the blocked sequences
  for (std::size_t b = 0; b < sequences.size(); ++b)
    if (sequences[b].blocked) blocked.push_back(b);
  if (!blocked.empty() && use_one_pass(Index(blocked.size()) * layout.kv_heads)) {
    parallel_for_with_scratch(
        Index(blocked.size()) * layout.kv_heads, [&] { return KeyPassScratch<T>(largest, d, dv_width, slope, true); },
        [&](Index item, KeyPassScratch<T>& scratch) {
          const BackwardSequence<T, BoundMask, Sink>& seq = sequences[blocked[std::size_t(item / layout.kv_heads)]];
          const Index g = item % layout.kv_heads;
          MatrixRef<T> all_dq = seq.dq, dk = seq.dk, dv = seq.dv;  // writable copies of the views
          std::vector<MatrixRef<T>> dq;                           // (Lq, d) of the group's heads
          dq.reserve(std::size_t(group));
          for (Index h = g * group; h < (g + 1) * group; ++h) dq.emplace_back(all_dq.middleCols(h * d, d));
          backward_group_one_pass<T>(&seq.heads[std::size_t(g * group)], &seq.masks[std::size_t(g * group)],
                                     seq.sinks + g * group, group, k_of(seq, g), v_of(seq, g), scale,
                                     IdentityModifier{}, seq.tiles, dq.data(), dk.middleCols(g * d, d),
                                     dv.middleCols(g * dv_width, dv_width), scratch);
        });
    return;
  }
  parallel_for_with_scratch(
      key_items, [&] { return KeyPassScratch<T>(largest, d, dv_width, slope); },
      [&](Index item, KeyPassScratch<T>& scratch) {
        const auto [b, local] = locate(key_end, item);
        const BackwardSequence<T, BoundMask, Sink>& seq = sequences[b];
        const Index tiles = key_tiles(seq), g = local / tiles, tile = local % tiles, k0 = tile * seq.tiles.keys;
        MatrixRef<T> dk = seq.dk, dv = seq.dv;
        backward_key_tile<T>(&seq.heads[std::size_t(g * group)], &seq.masks[std::size_t(g * group)],
                             seq.sinks + g * group, group, k_of(seq, g), v_of(seq, g), scale, IdentityModifier{},
                             seq.tiles, k0, std::min(seq.tiles.keys, seq.k.rows() - k0), dk.middleCols(g * d, d),
                             dv.middleCols(g * dv_width, dv_width), scratch, tile);
      });
  parallel_for_with_scratch(
      query_items, [&] { return QueryPassScratch<T>(largest, d, dv_width, slope); },
      [&](Index item, QueryPassScratch<T>& scratch) {
        const auto [b, local] = locate(query_end, item);
        const BackwardSequence<T, BoundMask, Sink>& seq = sequences[b];
        const Index tiles = query_tiles(seq), h = local / tiles, q0 = (local % tiles) * seq.tiles.queries;
        const BackwardHead<T>& head = seq.heads[std::size_t(h)];
        MatrixRef<T> dq = seq.dq;
        backward_query_tile<T>(head, k_of(seq, h / group), v_of(seq, h / group), scale, IdentityModifier{},
                               seq.masks[std::size_t(h)], seq.tiles, q0, std::min(seq.tiles.queries, head.q.rows() - q0),
                               dq.middleCols(h * d, d), scratch);
      });
}

}  // namespace detail

/// Writes the gradients of the varlen multi_head_attention_into(q, k, v, num_heads, query_rows,
/// key_rows, out, mask, options, lse) at d_out (rows, H d_v) into dq (rows, H d), dk (rows_k,
/// H_kv d) and dv (rows_k, H_kv d_v), given that forward's output (rows, H d_v) and log-sum-exp
/// (rows, H) (multi_head_attention_with_lse with the same SequenceRows). The mask binds as the
/// forward's, for head h of sequence b with HeadIndex{b, h, B, H} and that sequence's lengths.
/// Sequence b's rows of dq, dk, dv are bitwise those of multi_head_attention_backward_into on
/// its rows alone (with a mask that binds the same for it); rows of no sequence are zero. The
/// sequences' key and query tiles run in parallel together.
/// `bias_gradients`: with B = 1 as multi_head_attention_backward_into; with several sequences,
/// d_table and d_table_per_head sum the sequences' gradients in order, and d_bias and
/// d_bias_per_head (one matrix for sequences of different lengths) are rejected.
/// \throws attend::invalid_argument on mismatched shapes, layouts that disagree on B or reach
///         past the matrices, aliasing outputs, or a bias matrix gradient of several sequences.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
void multi_head_attention_backward_into(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const SequenceRows& query_rows, const SequenceRows& key_rows, const Eigen::MatrixBase<DO>& out,
    const Eigen::MatrixBase<DL>& lse, const Eigen::MatrixBase<DD>& d_out, MatrixRef<typename DQ::Scalar> dq,
    MatrixRef<typename DQ::Scalar> dk, MatrixRef<typename DQ::Scalar> dv, const MaskBase<Mask>& mask = NoMask{},
    const AttentionOptions& options = {}, const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DO, DL, DD>);
  using T = typename DQ::Scalar;
  const detail::ThreadScope threads(options.num_threads);
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  const Index d = layout.key_dim, dv_width = layout.value_dim, batch = query_rows.size();
  const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v), out_ref(out), d_out_ref(d_out), lse_ref(lse);
  detail::check_shape(lse_ref, q.rows(), layout.heads, "forward log-sum-exp (Lq x H)");
  detail::check_backward<T>(q_ref, k_ref, v_ref, out_ref, q.rows(), d_out_ref, dq, dk, dv, layout.heads * dv_width);
  detail::check_no_alias(dq, "dq", lse_ref, "forward log-sum-exp");
  detail::check_no_alias(dk, "dk", lse_ref, "forward log-sum-exp");
  detail::check_no_alias(dv, "dv", lse_ref, "forward log-sum-exp");
  ATTEND_CHECK(key_rows.size() == batch,
               std::to_string(batch) + " query sequences and " + std::to_string(key_rows.size()) + " key sequences");
  ATTEND_CHECK(query_rows.rows_used() <= q.rows() && key_rows.rows_used() <= k.rows(),
               "the sequences use " + std::to_string(query_rows.rows_used()) + " query rows and " +
                   std::to_string(key_rows.rows_used()) + " key rows of q " + detail::shape_of(q) + " and k " +
                   detail::shape_of(k));
  ATTEND_CHECK(batch == 1 || !(bias_gradients.d_bias || bias_gradients.d_bias_per_head),
               "bias matrix gradients (BiasGradients::d_bias, d_bias_per_head) of a batch of " +
                   std::to_string(batch) + " sequences: one (Lq, Lk) matrix does not fit sequences of their own "
                   "lengths; call the backward per sequence for them");
  const T scale = detail::resolve_scale<T>(options, d);
  detail::resolve_tiles(options);  // validates the tile sizes, whatever the lengths
  using BoundMask = decltype(detail::bind_mask(mask.derived(), HeadIndex{}, 0, 0));
  detail::check_bias_gradients_without_modifier<BoundMask>(bias_gradients.requested());
  std::vector<std::vector<BoundMask>> masks(static_cast<std::size_t>(batch));  // every (sequence, head) validated first
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < layout.heads; ++h)
      masks[std::size_t(b)].push_back(detail::bind_mask(mask.derived(), HeadIndex{b, h, batch, layout.heads},
                                                        query_rows.length(b), key_rows.length(b)));
  // Bias-gradient sinks per sequence; with several sequences each sums into its own tables.
  std::vector<std::optional<detail::BiasGradientSinks<T>>> sinks(std::size_t(bias_gradients.requested() ? batch : 0));
  std::vector<Vector<T>> tables(std::size_t(batch != 1 && bias_gradients.d_table ? batch : 0));
  std::vector<Matrix<T>> tables_per_head(std::size_t(batch != 1 && bias_gradients.d_table_per_head ? batch : 0));
  for (std::size_t b = 0; b < sinks.size(); ++b) {
    const Index lq = query_rows.length(Index(b)), lk = key_rows.length(Index(b));
    const detail::TileShape tiles = detail::resolve_backward_tiles(options, lq, lk);
    const Index tasks =
        detail::use_blocked(options, lq, lk) ? std::max<Index>((lk + tiles.keys - 1) / tiles.keys, 1) : 1;
    BiasGradients<T> request = bias_gradients;
    if (!tables.empty()) request.d_table = &tables[b];
    if (!tables_per_head.empty()) request.d_table_per_head = &tables_per_head[b];
    sinks[b].emplace(request, layout.heads, lq, lk, tasks);
  }
  dq.setZero();  // rows of no sequence or of one that sees nothing; the others are overwritten
  dk.setZero();
  dv.setZero();
  const auto run = [&](const auto& sinks_of) {
    using Sink = std::remove_cv_t<std::remove_pointer_t<decltype(sinks_of(std::size_t(0)))>>;
    std::vector<detail::BackwardSequence<T, BoundMask, Sink>> sequences;
    for (std::size_t b = 0; b < std::size_t(batch); ++b) {
      const Index q0 = query_rows.begin(Index(b)), lq = query_rows.length(Index(b));
      const Index k0 = key_rows.begin(Index(b)), lk = key_rows.length(Index(b));
      if (lq == 0 || lk == 0) continue;  // nothing seen: zero gradients (and no block of an empty matrix)
      std::vector<detail::BackwardHead<T>> heads;
      for (Index h = 0; h < layout.heads; ++h)
        heads.push_back({q_ref.block(q0, h * d, lq, d), out_ref.block(q0, h * dv_width, lq, dv_width),
                         d_out_ref.block(q0, h * dv_width, lq, dv_width), lse_ref.col(h).segment(q0, lq)});
      sequences.push_back({std::move(heads), std::move(masks[b]), sinks_of(b), k_ref.middleRows(k0, lk),
                           v_ref.middleRows(k0, lk), dq.middleRows(q0, lq), dk.middleRows(k0, lk),
                           dv.middleRows(k0, lk), detail::resolve_backward_tiles(options, lq, lk),
                           detail::use_blocked(options, lq, lk)});
    }
    detail::multi_head_backward_passes<T>(sequences, layout, scale);
  };
  if (sinks.empty()) {
    const std::vector<detail::NoBiasGradient> none(std::size_t(layout.heads));
    run([&](std::size_t) { return none.data(); });
  } else {
    run([&](std::size_t b) { return sinks[b]->sinks(); });
    for (std::optional<detail::BiasGradientSinks<T>>& s : sinks) s->finish();
  }
  if (batch != 1 && bias_gradients.d_table) {  // (zero for no sequence)
    bias_gradients.d_table->setZero(bias_gradients.table_buckets.num_buckets);
    for (const Vector<T>& table : tables) *bias_gradients.d_table += table;
  }
  if (batch != 1 && bias_gradients.d_table_per_head) {
    bias_gradients.d_table_per_head->setZero(bias_gradients.table_buckets.num_buckets, layout.heads);
    for (const Matrix<T>& table : tables_per_head) *bias_gradients.d_table_per_head += table;
  }
}

/// Writes the gradients of multi_head_attention(q, k, v, num_heads, mask, options) at d_out
/// (Lq, H d_v) into dq (Lq, H d), dk (Lk, H_kv d), dv (Lk, H_kv d_v), given the forward's
/// output (Lq, H d_v) and log-sum-exp (Lq, H) (multi_head_attention_with_lse). The dK and dV of
/// a kv head sum the contributions of its H / H_kv query heads (GQA, MQA), in head order.
/// The mask binds per head as the forward's (HeadIndex{0, h, 1, H}); `bias_gradients` asks for
/// the gradients of its learnable biases: a per-head T5 table (num_buckets, H) or stacked
/// AdditiveMask (H Lq, Lk) per head, or summed over the heads for a table or mask they share
/// (see BiasGradients). The key pass runs over (kv head, key tile) items and the query pass over
/// (head, query tile) items, in parallel, so even one head splits across threads. The varlen
/// form of one sequence of every row.
/// \throws attend::invalid_argument on mismatched shapes or aliasing outputs.
template <class DQ, class DK, class DV, class DO, class DL, class DD, class Mask = NoMask>
void multi_head_attention_backward_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                        const Eigen::MatrixBase<DV>& v, Index num_heads,
                                        const Eigen::MatrixBase<DO>& out, const Eigen::MatrixBase<DL>& lse,
                                        const Eigen::MatrixBase<DD>& d_out, MatrixRef<typename DQ::Scalar> dq,
                                        MatrixRef<typename DQ::Scalar> dk, MatrixRef<typename DQ::Scalar> dv,
                                        const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                                        const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  multi_head_attention_backward_into(q, k, v, num_heads, SequenceRows::uniform(1, q.rows()),
                                     SequenceRows::uniform(1, k.rows()), out, lse, d_out, dq, dk, dv, mask, options,
                                     bias_gradients);
}

/// Returns the gradients of multi_head_attention at d_out, given its multi_head_attention_with_lse
/// result. See multi_head_attention_backward_into.
template <class DQ, class DK, class DV, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> multi_head_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const MultiHeadLseResult<typename DQ::Scalar>& forward, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DD>);
  using T = typename DQ::Scalar;
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  multi_head_attention_backward_into(q, k, v, num_heads, forward.output, forward.lse, d_out, g.dq, g.dk, g.dv, mask,
                                     options, bias_gradients);
  return g;
}

/// Returns the gradients of the varlen multi-head attention at d_out (rows, H d_v), given its
/// multi_head_attention_with_lse result with the same SequenceRows. See the varlen
/// multi_head_attention_backward_into.
template <class DQ, class DK, class DV, class DD, class Mask = NoMask>
AttentionGradients<typename DQ::Scalar> multi_head_attention_backward(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v, Index num_heads,
    const SequenceRows& query_rows, const SequenceRows& key_rows,
    const MultiHeadLseResult<typename DQ::Scalar>& forward, const Eigen::MatrixBase<DD>& d_out,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const BiasGradients<typename DQ::Scalar>& bias_gradients = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DD>);
  using T = typename DQ::Scalar;
  AttentionGradients<T> g = detail::gradients_like<T>(q, k, v);
  multi_head_attention_backward_into(q, k, v, num_heads, query_rows, key_rows, forward.output, forward.lse, d_out,
                                     g.dq, g.dk, g.dv, mask, options, bias_gradients);
  return g;
}

}  // namespace attend
