// SPDX-License-Identifier: MIT
/// \file attention/additive.hpp
/// \brief Additive (Bahdanau) attention: score(q, k) = v^T tanh(W_q q + W_k k + b).
#pragma once

#include "../detail/checks.hpp"
#include "../detail/linear.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores/additive.hpp"
#include "../types.hpp"
#include "materialized.hpp"
#include "scaled_dot_product.hpp"

#include <string>
#include <utility>

namespace attend {

/// Additive attention (Bahdanau, Cho & Bengio 2015) with its parameters:
///   s_ij = v^T tanh(W_q q_i + W_k k_j + b),   out_i = sum_j softmax_j(s_ij + mask) values_j.
/// Weights follow PyTorch's nn.Linear layout: W_q (h, d_q), W_k (h, d_k), b (h) optional,
/// v (h); d_q and d_k may differ. A forward pass projects Q and K once, (Lq, h) and (Lk, h),
/// then computes scores tile by tile without forming the (Lq, Lk, h) tensor: the blocked path
/// holds one (Bq, Bk) tile of scores beyond the projections. Any mask policy applies, and
/// `options` selects the path and tiles; additive scores have no scale, so `options.scale` must
/// stay unset.
///
/// T is the scalar of the weights, inputs and output: float, double, Eigen::bfloat16 or
/// Eigen::half. A bf16 or half layer rounds to T once per stage, as PyTorch's bf16 modules do,
/// and accumulates in float inside each: the projections widen q, k, W and b exactly to float,
/// accumulate in float and round to T once; scores (tanh and the dot with v), softmax and P V
/// are computed in float and the output rounded to T once; the log-sum-exp and the weights are
/// float (accumulator_t<T>). Gradients (additive_backward.hpp) are float and double only.
template <class T>
class AdditiveAttention {
 public:
  static_assert(detail::supported_scalars<T>);

  /// \param w_query (h, d_q)
  /// \param w_key   (h, d_k)
  /// \param v       (h)
  /// \param bias    (h), or empty for none
  AdditiveAttention(Matrix<T> w_query, Matrix<T> w_key, Vector<T> v, Vector<T> bias = Vector<T>())
      : w_query_(std::move(w_query)), w_key_(std::move(w_key)), v_(std::move(v)), bias_(std::move(bias)) {
    if constexpr (detail::is_reduced_precision<T>) v_wide_ = v_.template cast<accumulator_t<T>>();
    const std::string shapes = "W_q " + detail::shape_of(w_query_) + ", W_k " + detail::shape_of(w_key_) +
                               ", v (" + std::to_string(v_.size()) + "), b (" + std::to_string(bias_.size()) + ")";
    ATTEND_CHECK(w_query_.rows() >= 1 && w_query_.cols() >= 1 && w_key_.cols() >= 1,
                 "additive attention needs non-empty weights, got " + shapes);
    ATTEND_CHECK(w_key_.rows() == hidden_dim() && v_.size() == hidden_dim() &&
                     (bias_.size() == 0 || bias_.size() == hidden_dim()),
                 "additive attention weights must share the hidden size h = W_q's rows: W_k (h x d_k), v (h), "
                 "b (h) or empty; got " + shapes);
  }

  Index hidden_dim() const { return w_query_.rows(); }
  Index query_dim() const { return w_query_.cols(); }
  Index key_dim() const { return w_key_.cols(); }
  const Matrix<T>& w_query() const { return w_query_; }  ///< (h, d_q)
  const Matrix<T>& w_key() const { return w_key_; }      ///< (h, d_k)
  const Vector<T>& v() const { return v_; }              ///< (h)
  const Vector<T>& bias() const { return bias_; }        ///< (h), or empty for none

  /// Writes the attention of queries `q` (Lq, d_q) over keys `k` (Lk, d_k) and `values`
  /// (Lk, Dv) into `out` (Lq, Dv), and each row's log-sum-exp into `lse` when non-empty.
  /// `out` and `lse` must not share memory with `values` (q and k are read only to project them).
  template <class DQ, class DK, class DV, class Mask = NoMask>
  void forward_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                    const Eigen::MatrixBase<DV>& values, MatrixRef<T> out, const MaskBase<Mask>& mask = NoMask{},
                    const AttentionOptions& options = {},
                    VectorRef<accumulator_t<T>> lse = detail::no_vector<accumulator_t<T>>()) const {
    static_assert(detail::supported_scalars<T, DQ, DK, DV>);
    check_inputs(q, k, values, options);
    const detail::ThreadScope threads(options.num_threads);  // for the projections too
    const Matrix<T> q_proj = project_queries(q), k_proj = project_keys(k);  // (Lq, h), (Lk, h)
    const ConstMatrixRef<T> values_ref(values);
    detail::attention_into<T>(q_proj, k_proj, values_ref, score(), mask, options, out, lse);
  }

  /// Returns the attention output (Lq, Dv). See forward_into.
  template <class DQ, class DK, class DV, class Mask = NoMask>
  Matrix<T> forward(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& values,
                    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {}) const {
    static_assert(detail::supported_scalars<T, DQ, DK, DV>);
    check_inputs(q, k, values, options);
    Matrix<T> out(q.rows(), values.cols());
    forward_into(q, k, values, out, mask, options);
    return out;
  }

  /// Returns the output (Lq, Dv) and each row's log-sum-exp (Lq), what a backward pass needs
  /// (additive_backward.hpp), through the path `options` selects.
  template <class DQ, class DK, class DV, class Mask = NoMask>
  AttentionResult<T> forward_with_lse(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                      const Eigen::MatrixBase<DV>& values, const MaskBase<Mask>& mask = NoMask{},
                                      const AttentionOptions& options = {}) const {
    static_assert(detail::supported_scalars<T, DQ, DK, DV>);
    check_inputs(q, k, values, options);
    AttentionResult<T> result{Matrix<T>(q.rows(), values.cols()), Vector<accumulator_t<T>>(q.rows()), {}};
    forward_into(q, k, values, result.output, mask, options, result.lse);
    return result;
  }

  /// Returns the output, the (Lq, Lk) weights and the log-sum-exp through the materialized path.
  template <class DQ, class DK, class DV, class Mask = NoMask>
  AttentionResult<T> forward_with_weights(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                          const Eigen::MatrixBase<DV>& values,
                                          const MaskBase<Mask>& mask = NoMask{}) const {
    static_assert(detail::supported_scalars<T, DQ, DK, DV>);
    using A = accumulator_t<T>;
    check_inputs(q, k, values, AttentionOptions{});
    AttentionResult<T> result{Matrix<T>(), Vector<A>(q.rows()), Matrix<A>(q.rows(), k.rows())};
    Matrix<A> output(q.rows(), values.cols());
    const Matrix<T> q_proj = project_queries(q), k_proj = project_keys(k);
    const ConstMatrixRef<T> values_ref(values);
    // (on float copies for bf16 and half: cast<A> is the matrix itself for float and double)
    detail::materialized_attention<A>(q_proj.template cast<A>(), k_proj.template cast<A>(),
                                      values_ref.template cast<A>(), score(),
                                      detail::bind_mask(mask.derived(), HeadIndex{}, q.rows(), k.rows()), output,
                                      result.lse, result.weights);
    if constexpr (std::is_same_v<T, A>)
      result.output = std::move(output);
    else
      result.output = output.template cast<T>();
    return result;
  }

  /// The score policy on projected rows (scores/additive.hpp), in accumulator_t<T> (float for
  /// bf16 and half: their scores are computed on float copies of the rounded projections).
  detail::AdditiveScore<accumulator_t<T>> score() const {
    if constexpr (detail::is_reduced_precision<T>)
      return {{v_wide_.data(), v_wide_.size()}};
    else
      return {{v_.data(), v_.size()}};
  }

  /// W_q q_i + b for every row: (Lq, h) (for bf16 and half accumulated in float, rounded once).
  template <class DQ>
  Matrix<T> project_queries(const Eigen::MatrixBase<DQ>& q) const {
    return detail::linear_rows<T>(q, w_query_, bias_);
  }

  /// W_k k_j for every row: (Lk, h).
  template <class DK>
  Matrix<T> project_keys(const Eigen::MatrixBase<DK>& k) const {
    return detail::linear_rows<T>(k, w_key_, Vector<T>());
  }

  /// Throws attend::invalid_argument naming the shapes when q, k and values do not fit the
  /// weights and each other, or when options.scale is set.
  template <class DQ, class DK, class DV>
  void check_inputs(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& values,
                    const AttentionOptions& options) const {
    ATTEND_CHECK(q.cols() == query_dim(), "q " + detail::shape_of(q) + " must have d_q = " +
                                              std::to_string(query_dim()) + " columns to match W_q " +
                                              detail::shape_of(w_query_));
    ATTEND_CHECK(k.cols() == key_dim(), "k " + detail::shape_of(k) + " must have d_k = " + std::to_string(key_dim()) +
                                            " columns to match W_k " + detail::shape_of(w_key_));
    ATTEND_CHECK(k.rows() == values.rows(), "k " + detail::shape_of(k) + " and values " + detail::shape_of(values) +
                                                " must have the same number of rows (keys)");
    ATTEND_CHECK(!options.scale, "additive attention has no scale; leave options.scale unset (got " +
                                     detail::number_string(*options.scale) + ")");
  }

 private:
  Matrix<T> w_query_;  // (h, d_q)
  Matrix<T> w_key_;    // (h, d_k)
  Vector<T> v_;        // (h)
  Vector<T> bias_;     // (h) or empty
  Vector<accumulator_t<T>> v_wide_;  // (h) v in float for bf16 and half, else empty
};

}  // namespace attend
