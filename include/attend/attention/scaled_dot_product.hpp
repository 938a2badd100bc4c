// SPDX-License-Identifier: MIT
/// \file attention/scaled_dot_product.hpp
/// \brief Scaled dot-product attention: out = softmax(scale * Q K^T + mask) V, for one head.
///
/// Shapes: Q (Lq, Dk), K (Lk, Dk), V (Lk, Dv), out (Lq, Dv); one token per row. The mask is
/// any policy of masks.hpp (NoMask, Causal, Window, KeyPadding, BooleanMask, AdditiveMask, or
/// `a & b`). Defined results: Lq = 0 gives an empty output; Lk = 0 or a query that sees no key
/// gives a zero row with log-sum-exp -inf; NaN and Inf in the data propagate to their rows.
#pragma once

#include "../detail/checks.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../detail/sinks.hpp"
#include "blocked.hpp"
#include "materialized.hpp"

namespace attend {
namespace detail {

/// Auto picks the blocked path once the score matrix would exceed this many elements.
inline constexpr Index kAutoBlockedMinScores = Index(256) * 256;

inline bool use_blocked(const AttentionOptions& options, Index num_queries, Index num_keys) {
  switch (options.algorithm) {
    case Algorithm::Materialized: return false;
    case Algorithm::Blocked: return true;
    case Algorithm::Auto: break;
  }
  return num_queries * num_keys > kAutoBlockedMinScores;
}

/// The shared core: checks shapes and aliasing, binds the mask for head `at`, and runs the
/// chosen path on the options' threads. Q, K and V are stored as S, the output as O (S, or
/// accumulator_t<S> for a full-precision output of reduced inputs), the log-sum-exp as
/// T = accumulator_t<S>. With S = bf16 or half, the blocked path of the scaled dot product
/// reads the inputs in place; the materialized path and other score policies compute on
/// T copies of Q, K and V (O((Lq + 2 Lk) d) more memory), and the output is rounded to O once.
template <class S, class Score, class Mask, class O = S>
void attention_into(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                    const ConstMatrixRef<identity_t<S>>& v, const Score& score, const Mask& mask,
                    const AttentionOptions& options, MatrixRef<identity_t<O>> out,
                    VectorRef<accumulator_t<S>> lse, const HeadIndex& at = {}) {
  using T = accumulator_t<S>;
  const ThreadScope threads(options.num_threads);
  check_shape(out, q.rows(), v.cols(), "output");
  ATTEND_CHECK(lse.size() == 0 || lse.size() == q.rows(),
               "log-sum-exp of size " + std::to_string(lse.size()) + " must have Lq = " + std::to_string(q.rows()) +
                   " entries");
  check_outputs_do_not_alias<S, O, T>(q, k, v, out, lse);
  const bool blocked = use_blocked(options, q.rows(), k.rows());
  const TileShape tiles = resolve_tiles(options, q.rows(), k.rows());  // (checks the block sizes on every path)
  const auto bound = bind_mask(mask.derived(), at, q.rows(), k.rows());
  if constexpr (std::is_same_v<S, T>) {
    if (blocked) {
      blocked_attention<T>(q, k, v, score, bound, tiles, out, lse);
    } else {
      Matrix<T> weights(q.rows(), k.rows());
      materialized_attention<T>(q, k, v, score, bound, out, lse, weights);
    }
  } else {
    if constexpr (is_dot_product_score<Score>::value) {
      if (blocked) return blocked_attention<T, S, O>(q, k, v, score, bound, tiles, out, lse);
    }
    const Matrix<T> q_full = q.template cast<T>(), k_full = k.template cast<T>(), v_full = v.template cast<T>();
    Matrix<T> out_full(out.rows(), out.cols());
    attention_into<T>(q_full, k_full, v_full, score, mask, options, out_full, lse, at);
    out = out_full.template cast<O>();
  }
}

/// attention_into with a learned sink (attention/sinks.hpp): the path's result and log-sum-exp,
/// then each row merged with the partial (0, sink) in T, before the output is rounded to O.
/// `lse` (Lq, or empty) receives the merged log-sum-exp. Every entry point that takes sinks runs
/// this per head (or, the batched call, its per-tile equivalent).
template <class S, class Score, class Mask, class O = S>
void attention_with_sink_into(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                              const ConstMatrixRef<identity_t<S>>& v, const Score& score, const Mask& mask,
                              const AttentionOptions& options, MatrixRef<identity_t<O>> out,
                              VectorRef<accumulator_t<S>> lse, accumulator_t<S> sink, const HeadIndex& at = {}) {
  using T = accumulator_t<S>;
  if (lse.size() == 0 && q.rows() != 0) {  // the merge needs the log-sum-exp
    Vector<T> own(q.rows());
    return attention_with_sink_into<S, Score, Mask, O>(q, k, v, score, mask, options, out, own, sink, at);
  }
  if constexpr (std::is_same_v<O, T>) {
    attention_into<S, Score, Mask, O>(q, k, v, score, mask, options, out, lse, at);
    merge_sink_into<T>(out, lse, sink);
  } else {  // merged in T, rounded once
    check_shape(out, q.rows(), v.cols(), "output");
    check_outputs_do_not_alias<S, O, T>(q, k, v, out, lse);
    Matrix<T> full(out.rows(), out.cols());
    attention_into<S, Score, Mask, T>(q, k, v, score, mask, options, full, lse, at);
    merge_sink_into<T>(full, lse, sink);
    out = full.template cast<O>();
  }
}

}  // namespace detail

/// Writes softmax(scale * Q K^T + mask) V into `out` (Lq, Dv), and each row's log-sum-exp into
/// `lse` when it is non-empty. `out` may be a block of a larger row-major matrix, but must not
/// share memory with q, k or v (an argument Eigen copies into a row-major temporary, such as a
/// column-major matrix, is exempt: the kernel reads the copy).
///
/// \param q    (Lq, Dk) queries, any Eigen expression
/// \param k    (Lk, Dk) keys
/// \param v    (Lk, Dv) values
/// \param out  (Lq, Dv) output
/// \param mask mask policy (default: none)
/// \param options scale (default 1/sqrt(Dk)), algorithm, tile sizes
/// \param lse  (Lq) or empty; float for bf16 and half inputs
/// \param sinks empty, or one learned sink logit s (attention/sinks.hpp; the one head of a
///         multi-head call's sinks(h), e.g. `sinks.segment(h, 1)`): an extra logit in every row's
///         softmax denominator that carries no value, so out_i = sum_j e^(x_ij - lse_i) v_j with
///         lse_i = log(e^s + sum_j e^(x_ij)), on either path. A row that sees no key keeps a zero
///         output and gets lse = s.
/// \throws attend::invalid_argument on mismatched shapes, a mask of the wrong shape, a bad window,
///         a bad tile size, more than one sink, or `out` or `lse` aliasing an input.
///
/// Inputs of Eigen::bfloat16 or Eigen::half are read in place and computed in float (scores,
/// softmax, P V, log-sum-exp); the output is rounded to the inputs' type once, or written in
/// float by the overload below.
template <class DQ, class DK, class DV, class Mask = NoMask>
void scaled_dot_product_attention_into(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    MatrixRef<typename DQ::Scalar> out, const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>(),
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  detail::check_qkv(q, k, v);
  detail::check_sinks(sinks.size(), 1);
  const ConstMatrixRef<S> q_ref(q), k_ref(k), v_ref(v);
  const detail::ScaledDot<T> score{detail::resolve_scale<T>(options, q.cols())};
  if (sinks.size() != 0)
    detail::attention_with_sink_into<S>(q_ref, k_ref, v_ref, score, mask.derived(), options, out, lse, T(sinks(0)));
  else
    detail::attention_into<S>(q_ref, k_ref, v_ref, score, mask.derived(), options, out,
                              lse);  // (the instantiation extern_templates.hpp names)
}

/// bf16 or half inputs with a float output (and log-sum-exp): the output is not rounded.
template <class DQ, class DK, class DV, class Mask = NoMask,
          std::enable_if_t<detail::is_reduced_precision<typename DQ::Scalar>, int> = 0>
void scaled_dot_product_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                       const Eigen::MatrixBase<DV>& v, MatrixRef<float> out,
                                       const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                                       VectorRef<float> lse = detail::no_vector<float>(),
                                       const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks =
                                           Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  detail::check_qkv(q, k, v);
  detail::check_sinks(sinks.size(), 1);
  const ConstMatrixRef<S> q_ref(q), k_ref(k), v_ref(v);
  const detail::ScaledDot<float> score{detail::resolve_scale<float>(options, q.cols())};
  if (sinks.size() != 0)
    detail::attention_with_sink_into<S, detail::ScaledDot<float>, Mask, float>(q_ref, k_ref, v_ref, score,
                                                                               mask.derived(), options, out, lse,
                                                                               float(sinks(0)));
  else
    detail::attention_into<S, detail::ScaledDot<float>, Mask, float>(q_ref, k_ref, v_ref, score, mask.derived(),
                                                                      options, out, lse);
}

/// Returns softmax(scale * Q K^T + mask) V, shape (Lq, Dv), with a learned sink when `sinks`
/// holds one. See scaled_dot_product_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> scaled_dot_product_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  detail::check_qkv(q, k, v);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  scaled_dot_product_attention_into(q, k, v, out, mask, options,
                                    detail::no_vector<accumulator_t<typename DQ::Scalar>>(), sinks);
  return out;
}

/// Returns the output with each row's log-sum-exp (the sink's term included when `sinks` holds
/// one), through the path `options` selects.
template <class DQ, class DK, class DV, class Mask = NoMask>
AttentionResult<typename DQ::Scalar> scaled_dot_product_attention_with_lse(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  detail::check_qkv(q, k, v);
  AttentionResult<typename DQ::Scalar> result{Matrix<typename DQ::Scalar>(q.rows(), v.cols()),
                                              Vector<accumulator_t<typename DQ::Scalar>>(q.rows()), {}};
  scaled_dot_product_attention_into(q, k, v, result.output, mask, options, result.lse, sinks);
  return result;
}

/// Returns the output, the (Lq, Lk) weights and the log-sum-exp, through the materialized path
/// (the weights are the score matrix it forms anyway). With a sink (`sinks` holds one logit s),
/// the weights are e^(x_ij - lse_i) with the sink's term in lse_i: each row sums to
/// 1 - e^(s - lse_i) < 1, the rest going to the sink.
template <class DQ, class DK, class DV, class Mask = NoMask>
AttentionResult<typename DQ::Scalar> scaled_dot_product_attention_with_weights(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  detail::check_qkv(q, k, v);
  detail::check_sinks(sinks.size(), 1);
  if constexpr (detail::is_reduced_precision<S>) {  // on float copies, the output rounded once
    AttentionResult<T> full = scaled_dot_product_attention_with_weights(
        q.template cast<T>(), k.template cast<T>(), v.template cast<T>(), mask, options,
        Vector<T>(sinks.template cast<T>()));
    return {full.output.template cast<S>(), std::move(full.lse), std::move(full.weights)};
  } else {
    const detail::ThreadScope threads(options.num_threads);
    AttentionResult<T> result{Matrix<T>(q.rows(), v.cols()), Vector<T>(q.rows()), Matrix<T>(q.rows(), k.rows())};
    const ConstMatrixRef<T> q_ref(q), k_ref(k), v_ref(v);
    const auto bound = detail::bind_mask(mask.derived(), HeadIndex{}, q.rows(), k.rows());
    detail::materialized_attention<T>(q_ref, k_ref, v_ref,
                                      detail::ScaledDot<T>{detail::resolve_scale<T>(options, q.cols())}, bound,
                                      result.output, result.lse, result.weights);
    if (sinks.size() != 0) {
      MatrixRef<T> weights(result.weights);
      detail::merge_sink_into<T>(result.output, result.lse, T(sinks(0)), &weights);
    }
    return result;
  }
}

}  // namespace attend
