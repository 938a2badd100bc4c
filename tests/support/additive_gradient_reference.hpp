// SPDX-License-Identifier: MIT
// Gradients of additive (Bahdanau) attention by plain scalar loops, written from the chain rule
// and sharing no code with the library. In long double it is the reference; in float or double
// it is the naive same-precision implementation whose error the tolerance rule scales.
#pragma once

#include "reference.hpp"

#include <attend/types.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <string>

namespace attend::test {

/// The forward and every gradient, in S.
template <class S>
struct AdditiveGradientsOf {
  Matrix<S> output;             // (Lq, Dv)
  Vector<S> lse;                // (Lq), -inf for a row that sees nothing
  Matrix<S> dq, dk, dv;         // (Lq, d_q), (Lk, d_k), (Lk, Dv)
  Matrix<S> dw_query, dw_key;   // (h, d_q), (h, d_k)
  Vector<S> dw_v, dbias;        // (h), (h) or empty
  // The size of what each gradient entry sums, the same chain rule on magnitudes
  // (dS_ij from p_ij (|dP_ij| + |D_i|)): the `terms` of gradient_within_tolerance.
  Matrix<S> dq_terms, dk_terms, dv_terms, dw_query_terms, dw_key_terms;
  Vector<S> dw_v_terms, dbias_terms;

  /// The largest finite |lse|: the max_abs_lse of gradient_within_tolerance (gradient_reference.hpp).
  Real max_abs_lse() const {
    Real m = 0;
    for (Index i = 0; i < lse.size(); ++i)
      if (std::isfinite(lse(i))) m = std::max(m, std::fabs(Real(lse(i))));
    return m;
  }
};

/// Additive attention s_ij = v^T tanh(W_q q_i + b + W_k k_j) + bias_ij over the `visible` keys,
/// out = softmax(S) values, and the gradients of sum(d_out * out), all computed in S:
///   dP_ij = d_out_i . values_j,   D_i = sum_j P_ij dP_ij,   dS_ij = P_ij (dP_ij - D_i),
///   d(qp_ic) = sum_j dS_ij v_c (1 - t_ijc^2), d(kp_jc) likewise over i, dv_c = sum_ij dS_ij t_ijc.
template <class S, class T>
AdditiveGradientsOf<S> additive_gradients(const Matrix<T>& w_query, const Matrix<T>& w_key, const Vector<T>& v,
                                          const Vector<T>& bias, const Matrix<T>& q, const Matrix<T>& k,
                                          const Matrix<T>& values, const Matrix<T>& d_out, const BoolMatrix& visible,
                                          const std::optional<RealMatrix>& mask_bias = std::nullopt) {
  const Index lq = q.rows(), lk = k.rows(), h = v.size(), dv = values.cols();
  const S neg_inf = -std::numeric_limits<S>::infinity();
  const auto at = [](const auto& m, Index i, Index j) { return static_cast<S>(m(i, j)); };
  Matrix<S> qp = Matrix<S>::Zero(lq, h), kp = Matrix<S>::Zero(lk, h);
  for (Index i = 0; i < lq; ++i)
    for (Index c = 0; c < h; ++c) {
      for (Index e = 0; e < q.cols(); ++e) qp(i, c) += at(w_query, c, e) * at(q, i, e);
      if (bias.size() != 0) qp(i, c) += static_cast<S>(bias(c));
    }
  for (Index j = 0; j < lk; ++j)
    for (Index c = 0; c < h; ++c)
      for (Index e = 0; e < k.cols(); ++e) kp(j, c) += at(w_key, c, e) * at(k, j, e);
  const auto tanh_of = [&](Index i, Index j, Index c) { return std::tanh(qp(i, c) + kp(j, c)); };

  AdditiveGradientsOf<S> g;
  Matrix<S> p = Matrix<S>::Zero(lq, lk);
  g.lse = Vector<S>::Constant(lq, neg_inf);
  for (Index i = 0; i < lq; ++i) {
    S m = neg_inf;
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      S s = 0;
      for (Index c = 0; c < h; ++c) s += static_cast<S>(v(c)) * tanh_of(i, j, c);
      if (mask_bias) s += static_cast<S>((*mask_bias)(i, j));
      p(i, j) = s;
      m = std::max(m, s);
    }
    if (m == neg_inf) continue;  // sees nothing: zero weights
    S sum = 0;
    for (Index j = 0; j < lk; ++j) sum += p(i, j) = visible(i, j) ? std::exp(p(i, j) - m) : S(0);
    for (Index j = 0; j < lk; ++j) p(i, j) /= sum;
    g.lse(i) = m + std::log(sum);
  }
  g.output = Matrix<S>::Zero(lq, dv);
  g.dv = Matrix<S>::Zero(lk, dv);
  g.dv_terms = Matrix<S>::Zero(lk, dv);
  Matrix<S> ds = Matrix<S>::Zero(lq, lk), ds_terms = Matrix<S>::Zero(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    S delta = 0;
    for (Index j = 0; j < lk; ++j) {
      S dp = 0;
      for (Index c = 0; c < dv; ++c) {
        g.output(i, c) += p(i, j) * at(values, j, c);
        g.dv(j, c) += p(i, j) * at(d_out, i, c);
        g.dv_terms(j, c) += p(i, j) * std::fabs(at(d_out, i, c));
        dp += at(d_out, i, c) * at(values, j, c);
      }
      ds(i, j) = dp;
      delta += p(i, j) * dp;
    }
    for (Index j = 0; j < lk; ++j) {
      ds_terms(i, j) = p(i, j) * (std::fabs(ds(i, j)) + std::fabs(delta));
      ds(i, j) = p(i, j) * (ds(i, j) - delta);
    }
  }
  Matrix<S> dqp = Matrix<S>::Zero(lq, h), dkp = Matrix<S>::Zero(lk, h);
  Matrix<S> dqp_terms = Matrix<S>::Zero(lq, h), dkp_terms = Matrix<S>::Zero(lk, h);
  g.dw_v = g.dw_v_terms = Vector<S>::Zero(h);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j)
      for (Index c = 0; c < h; ++c) {
        const S t = tanh_of(i, j, c), slope = static_cast<S>(v(c)) * (1 - t * t);
        dqp(i, c) += ds(i, j) * slope;
        dkp(j, c) += ds(i, j) * slope;
        g.dw_v(c) += ds(i, j) * t;
        dqp_terms(i, c) += ds_terms(i, j) * std::fabs(slope);
        dkp_terms(j, c) += ds_terms(i, j) * std::fabs(slope);
        g.dw_v_terms(c) += ds_terms(i, j) * std::fabs(t);
      }
  g.dq = g.dq_terms = Matrix<S>::Zero(lq, q.cols());
  g.dw_query = g.dw_query_terms = Matrix<S>::Zero(h, q.cols());
  for (Index i = 0; i < lq; ++i)
    for (Index c = 0; c < h; ++c)
      for (Index e = 0; e < q.cols(); ++e) {
        g.dq(i, e) += dqp(i, c) * at(w_query, c, e);
        g.dw_query(c, e) += dqp(i, c) * at(q, i, e);
        g.dq_terms(i, e) += dqp_terms(i, c) * std::fabs(at(w_query, c, e));
        g.dw_query_terms(c, e) += dqp_terms(i, c) * std::fabs(at(q, i, e));
      }
  g.dk = g.dk_terms = Matrix<S>::Zero(lk, k.cols());
  g.dw_key = g.dw_key_terms = Matrix<S>::Zero(h, k.cols());
  for (Index j = 0; j < lk; ++j)
    for (Index c = 0; c < h; ++c)
      for (Index e = 0; e < k.cols(); ++e) {
        g.dk(j, e) += dkp(j, c) * at(w_key, c, e);
        g.dw_key(c, e) += dkp(j, c) * at(k, j, e);
        g.dk_terms(j, e) += dkp_terms(j, c) * std::fabs(at(w_key, c, e));
        g.dw_key_terms(c, e) += dkp_terms(j, c) * std::fabs(at(k, j, e));
      }
  const bool with_bias = bias.size() != 0 && lq > 0;  // (no column sums of an empty matrix)
  g.dbias = with_bias ? Vector<S>(dqp.colwise().sum().transpose()) : Vector<S>::Zero(bias.size());
  g.dbias_terms = with_bias ? Vector<S>(dqp_terms.colwise().sum().transpose()) : Vector<S>::Zero(bias.size());
  return g;
}

}  // namespace attend::test
