// SPDX-License-Identifier: MIT
/// \file attention/dot_family.hpp
/// \brief The dot-product family folded into the scaled-dot engine: plain dot, general /
/// bilinear (Luong), cosine with a temperature, and logit soft-capping.
///
/// Each score of the family is a dot product after transforming Q or K once, so each call is
/// scaled dot-product attention on the transformed inputs with a chosen scale, and runs the
/// engine's GEMM path:
///   dot       s_ij = <q_i, k_j>                         scale 1
///   bilinear  s_ij = q_i^T W k_j = <q_i W, k_j>         Q <- Q W, scale 1
///   cosine    s_ij = cos(q_i, k_j) / temperature        rows of Q and K normalized (norms floored at
///                                                       1e-12, as F.normalize), scale 1 / temperature
/// Soft-capping wraps the scaled dot score: s_ij = cap tanh(scale <q_i, k_j> / cap).
/// Every function takes any mask policy and `options` (path, tiles) and writes each row's
/// log-sum-exp into `lse` when it is non-empty.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../scores/soft_cap.hpp"
#include "../types.hpp"
#include "scaled_dot_product.hpp"

#include <algorithm>
#include <cmath>
#include <string>

namespace attend {
namespace detail {

/// `options` with its scale defaulted to `scale` when unset.
inline AttentionOptions with_default_scale(AttentionOptions options, double scale) {
  if (!options.scale) options.scale = scale;
  return options;
}

/// The floor of a row norm in unit_rows: torch.nn.functional.normalize's default eps.
inline constexpr double kUnitRowsMinNorm = 1e-12;

/// Each row divided by its Euclidean norm floored at 1e-12, x_i / max(||x_i||, 1e-12), exactly
/// torch.nn.functional.normalize(x, dim=-1): cosine attention in models is written with it
/// (Swin Transformer V2: normalize(q) @ normalize(k)^T), so a ported model gets its numbers.
/// (torch.nn.functional.cosine_similarity floors each norm at 1e-8 instead; the two differ only
/// for rows of norm below 1e-8, which keep their direction here.) A zero row stays zero: its
/// cosine with anything is 0. stableNorm() scales before squaring, so a float row of entries
/// near 1e30 keeps its direction (norm() would overflow). bf16 and half rows are normalized in
/// float and rounded back once.
template <class D>
Matrix<typename D::Scalar> unit_rows(const Eigen::MatrixBase<D>& x) {
  using T = accumulator_t<typename D::Scalar>;
  Matrix<T> out = x.template cast<T>();
  for (Index i = 0; i < out.rows(); ++i) out.row(i) /= std::max(out.row(i).stableNorm(), T(kUnitRowsMinNorm));
  if constexpr (std::is_same_v<T, typename D::Scalar>)
    return out;
  else
    return out.template cast<typename D::Scalar>();
}

}  // namespace detail

/// Plain dot-product attention, softmax(Q K^T + mask) V: the scale defaults to 1 (an explicit
/// `options.scale` still applies). Shapes as scaled_dot_product_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
void dot_product_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                const Eigen::MatrixBase<DV>& v, MatrixRef<typename DQ::Scalar> out,
                                const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                                VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  scaled_dot_product_attention_into(q, k, v, out, mask, detail::with_default_scale(options, 1.0), lse);
}

/// Returns softmax(Q K^T + mask) V, (Lq, Dv). See dot_product_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                  const Eigen::MatrixBase<DV>& v, const MaskBase<Mask>& mask = NoMask{},
                                                  const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  return scaled_dot_product_attention(q, k, v, mask, detail::with_default_scale(options, 1.0));
}

/// Luong's "general" (bilinear) attention, s_ij = q_i^T W k_j, computed as dot-product
/// attention of Q W against K. W (d_q, d_k) is nn.Linear(d_k, d_q).weight, so d_q may differ
/// from d_k. The scale defaults to 1. With bf16 or half inputs, Q W is computed in float and
/// rounded to the inputs' type once (as a framework's bf16 Linear layer would).
///
/// \param q (Lq, d_q)  \param k (Lk, d_k)  \param v (Lk, Dv)  \param w (d_q, d_k)
template <class DQ, class DK, class DV, class DW, class Mask = NoMask>
void bilinear_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                             const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DW>& w,
                             MatrixRef<typename DQ::Scalar> out, const MaskBase<Mask>& mask = NoMask{},
                             const AttentionOptions& options = {},
                             VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DW>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  ATTEND_CHECK(w.rows() == q.cols() && w.cols() == k.cols(),
               "bilinear weight W " + detail::shape_of(w) + " must be (d_q x d_k) for q " + detail::shape_of(q) +
                   " and k " + detail::shape_of(k));
  const detail::ThreadScope threads(options.num_threads);  // for the product too
  Matrix<T> q_w(q.rows(), w.cols());                        // (Lq, d_k)
  if constexpr (std::is_same_v<S, T>)
    detail::parallel_product(q_w, q, w);
  else
    detail::parallel_product(q_w, q.template cast<T>(), w.template cast<T>());
  if constexpr (std::is_same_v<S, T>)
    scaled_dot_product_attention_into(q_w, k, v, out, mask, detail::with_default_scale(options, 1.0), lse);
  else
    scaled_dot_product_attention_into(q_w.template cast<S>(), k, v, out, mask,
                                      detail::with_default_scale(options, 1.0), lse);
}

/// Returns bilinear attention, (Lq, Dv). See bilinear_attention_into.
template <class DQ, class DK, class DV, class DW, class Mask = NoMask>
Matrix<typename DQ::Scalar> bilinear_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                               const Eigen::MatrixBase<DV>& v, const Eigen::MatrixBase<DW>& w,
                                               const MaskBase<Mask>& mask = NoMask{},
                                               const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV, DW>);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  bilinear_attention_into(q, k, v, w, out, mask, options);
  return out;
}

/// Cosine attention, s_ij = <q_i / max(||q_i||, 1e-12), k_j / max(||k_j||, 1e-12)> / temperature,
/// as torch.nn.functional.normalize computes the unit rows: cos(q_i, k_j) / temperature, with a
/// row of norm below 1e-12 divided by 1e-12 (a zero row has cosine 0 with every key). It is
/// dot-product attention of the normalized rows with scale 1 / temperature.
/// The temperature is the scale, so `options.scale` must stay unset.
/// \throws attend::invalid_argument unless temperature > 0 and finite, and 1 / temperature is finite
///         as a T.
template <class DQ, class DK, class DV, class Mask = NoMask>
void cosine_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                           const Eigen::MatrixBase<DV>& v, double temperature, MatrixRef<typename DQ::Scalar> out,
                           const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                           VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  ATTEND_CHECK(temperature > 0 && std::isfinite(temperature),
               "cosine attention temperature " + detail::number_string(temperature) +
                   " must be a positive finite number");
  ATTEND_CHECK(!options.scale, "cosine attention takes its scale as 1 / temperature; leave options.scale unset (got " +
                                   detail::number_string(*options.scale) + ")");
  ATTEND_CHECK(std::isfinite(static_cast<accumulator_t<typename DQ::Scalar>>(1.0 / temperature)),
               "cosine attention temperature " + detail::number_string(temperature) +
                   ": its scale 1 / temperature is not a finite " +
                   detail::scalar_name<accumulator_t<typename DQ::Scalar>>());
  detail::check_qkv(q, k, v);
  scaled_dot_product_attention_into(detail::unit_rows(q), detail::unit_rows(k), v, out, mask,
                                    detail::with_default_scale(options, 1.0 / temperature), lse);
}

/// Returns cosine attention, (Lq, Dv). See cosine_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> cosine_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                             const Eigen::MatrixBase<DV>& v, double temperature,
                                             const MaskBase<Mask>& mask = NoMask{},
                                             const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  cosine_attention_into(q, k, v, temperature, out, mask, options);
  return out;
}

/// Scaled dot-product attention with logit soft-capping (Gemma 2, Grok):
///   s_ij = cap tanh(scale <q_i, k_j> / cap),  then the mask,  softmax, and V.
/// The cap acts before the mask, so masked keys stay masked. The scale defaults to 1/sqrt(d_k).
/// \throws attend::invalid_argument unless cap > 0 and finite (as a T).
template <class DQ, class DK, class DV, class Mask = NoMask>
void soft_capped_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                const Eigen::MatrixBase<DV>& v, double cap, MatrixRef<typename DQ::Scalar> out,
                                const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
                                VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  using T = accumulator_t<S>;
  const T checked_cap = detail::checked_soft_cap<T>(cap);
  detail::check_qkv(q, k, v);
  const ConstMatrixRef<S> q_ref(q), k_ref(k), v_ref(v);
  const detail::SoftCapped<detail::ScaledDot<T>, T> score{{detail::resolve_scale<T>(options, q.cols())}, checked_cap};
  detail::attention_into<S>(q_ref, k_ref, v_ref, score, mask, options, out, lse);
}

/// Returns soft-capped attention, (Lq, Dv). See soft_capped_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> soft_capped_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                  const Eigen::MatrixBase<DV>& v, double cap,
                                                  const MaskBase<Mask>& mask = NoMask{},
                                                  const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  soft_capped_attention_into(q, k, v, cap, out, mask, options);
  return out;
}

}  // namespace attend
