// SPDX-License-Identifier: MIT
// The naive same-precision layers, the baselines of FlashAttention's rule (low_precision.hpp) for
// bf16 and half MultiHeadAttention and AdditiveAttention: what PyTorch's eager code computes for a
// module in S, every tensor operation rounding its result to S, each accumulating in float:
//   projection   y~ = r(x W^T + b)                       (addmm: one rounding, after the bias)
//   rotary       q~ = r(r(a r(cos)) - r(b r(sin))), ...   (HF apply_rotary_pos_emb on S tensors)
//   attention    naive_low_precision_attention<S> per head (low_precision.hpp)
//   output       r(heads W_o^T + b_o)
//   additive     s~_ij = r(sum_c r(tanh(r(qp~_ic + kp~_jc))) v_c), then r(softmax), r(P~ V)
// with r() rounding to nearest even in S. They share no code with the library.
#pragma once

#include "low_precision.hpp"
#include "multi_head_reference.hpp"
#include "reference.hpp"

#include <cmath>
#include <limits>

namespace attend::test {

/// r(x W^T + b), products accumulated in float.
template <class S>
Matrix<float> naive_linear(const Matrix<float>& x, const Matrix<S>& w, const Vector<S>& b) {
  Matrix<float> y(x.rows(), w.rows());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index o = 0; o < w.rows(); ++o) {
      float acc = 0;
      for (Index c = 0; c < x.cols(); ++c) acc += x(i, c) * float(w(o, c));
      if (b.size() != 0) acc += float(b(o));
      y(i, o) = round_to<S>(acc);
    }
  return y;
}

/// Rotates every head of x (values in S) as eager S code does, row r at position r: cos and sin
/// of r theta_i (in long double) rounded to S, each product and the sum rounded. No YaRN.
template <class S>
void naive_rotate(Matrix<float>& x, const RotarySpec& spec) {
  const Index pairs = spec.rotary_dim / 2;
  const bool half_split = spec.layout == RotaryLayout::HalfSplit;
  for (Index r = 0; r < x.rows(); ++r)
    for (Index h0 = 0; h0 < x.cols(); h0 += spec.head_dim)
      for (Index i = 0; i < pairs; ++i) {
        const Real theta = std::pow(Real(spec.base), -Real(2 * i) / Real(spec.rotary_dim));
        const float c = round_to<S>(float(std::cos(Real(r) * theta))),
                    s = round_to<S>(float(std::sin(Real(r) * theta)));
        const Index a = h0 + (half_split ? i : 2 * i), b = h0 + (half_split ? i + pairs : 2 * i + 1);
        const float xa = x(r, a), xb = x(r, b);
        x(r, a) = round_to<S>(round_to<S>(xa * c) - round_to<S>(xb * s));
        x(r, b) = round_to<S>(round_to<S>(xb * c) + round_to<S>(xa * s));
      }
}

/// The naive S layer of weights w on query (Lq, E_q) over key and value (Lk, E): its output.
template <class S>
Matrix<float> naive_low_precision_layer(const Shape& s, const MultiHeadWeights<S>& w, const Matrix<S>& query,
                                        const Matrix<S>& key, const Matrix<S>& value, const BoolMatrix& visible,
                                        const RotarySpec* rotary = nullptr) {
  Matrix<float> q = naive_linear<S>(query.template cast<float>(), w.q_proj_weight, w.q_proj_bias);
  Matrix<float> k = naive_linear<S>(key.template cast<float>(), w.k_proj_weight, w.k_proj_bias);
  const Matrix<float> v = naive_linear<S>(value.template cast<float>(), w.v_proj_weight, w.v_proj_bias);
  if (rotary) {
    naive_rotate<S>(q, *rotary);
    naive_rotate<S>(k, *rotary);
  }
  const float scale = 1.0f / std::sqrt(float(s.d));
  Matrix<float> heads(query.rows(), s.heads * s.dv);
  for (Index h = 0; h < s.heads; ++h) {
    const Index g = h / (s.heads / s.kv_heads);
    heads.middleCols(h * s.dv, s.dv) = naive_low_precision_attention<S>(
        q.middleCols(h * s.d, s.d), k.middleCols(g * s.d, s.d), v.middleCols(g * s.dv, s.dv), scale, visible);
  }
  return naive_linear<S>(heads, w.out_proj_weight, w.out_proj_bias);
}

/// The naive S additive attention (W_q (h, d_q), W_k (h, d_k), v (h), b (h) or empty).
template <class S>
Matrix<float> naive_low_precision_additive(const Matrix<S>& w_query, const Matrix<S>& w_key, const Vector<S>& v,
                                           const Vector<S>& bias, const Matrix<S>& q, const Matrix<S>& k,
                                           const Matrix<S>& values, const BoolMatrix& visible) {
  const Matrix<float> qp = naive_linear<S>(q.template cast<float>(), w_query, bias);
  const Matrix<float> kp = naive_linear<S>(k.template cast<float>(), w_key, Vector<S>());
  const Index lq = q.rows(), lk = k.rows();
  Matrix<float> p(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    float m = -std::numeric_limits<float>::infinity();
    for (Index j = 0; j < lk; ++j) {
      float acc = 0;
      for (Index c = 0; c < v.size(); ++c)
        acc += round_to<S>(std::tanh(round_to<S>(qp(i, c) + kp(j, c)))) * float(v(c));
      p(i, j) = visible(i, j) ? round_to<S>(acc) : -std::numeric_limits<float>::infinity();
      m = std::max(m, p(i, j));
    }
    float sum = 0;
    for (Index j = 0; j < lk; ++j) {
      p(i, j) = p(i, j) == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(p(i, j) - m);
      sum += p(i, j);
    }
    for (Index j = 0; j < lk; ++j) p(i, j) = sum > 0 ? round_to<S>(p(i, j) / sum) : 0.0f;
  }
  Matrix<float> out(lq, values.cols());
  for (Index i = 0; i < lq; ++i)
    for (Index c = 0; c < values.cols(); ++c) {
      float acc = 0;
      for (Index j = 0; j < lk; ++j) acc += p(i, j) * float(values(j, c));
      out(i, c) = round_to<S>(acc);
    }
  return out;
}

}  // namespace attend::test
