// SPDX-License-Identifier: MIT
// The long-double reference of a multi-head layer with projections (and, optionally, rotary
// positions on Q and K), written from the definition: project, rotate, attend per head (query
// head h reads kv head h / (H / H_kv)), concatenate, out-project. Shared by the multi-head and
// the decoding tests.
#pragma once

#include <attend/attention/multi_head.hpp>

#include "baseline.hpp"
#include "random.hpp"
#include "reference.hpp"
#include "rope_reference.hpp"

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace attend::test {

/// Shapes of one multi-head problem.
struct Shape {
  Index heads, kv_heads, d, dv;  // H, H_kv, per-head widths
  Index eq, ek, ev, eout;        // input widths of query, key, value; output width
  bool bias;
};

inline std::string describe(const Shape& s) {
  return "H=" + std::to_string(s.heads) + " H_kv=" + std::to_string(s.kv_heads) + " d=" + std::to_string(s.d) +
         " d_v=" + std::to_string(s.dv) + " E_q=" + std::to_string(s.eq) + " E_k=" + std::to_string(s.ek) +
         " E_v=" + std::to_string(s.ev) + " E_out=" + std::to_string(s.eout) + (s.bias ? " bias" : "");
}

/// Weights N(0, 1/fan_in) so that projected values keep unit variance.
template <class T>
MultiHeadWeights<T> random_weights(const Shape& s, Rng& rng) {
  const auto w = [&](Index rows, Index cols) { return rng.normal<T>(rows, cols, 1 / std::sqrt(double(cols))); };
  const auto b = [&](Index n) { return s.bias ? Vector<T>(rng.normal<T>(n, 1, 0.5)) : Vector<T>(); };
  return {w(s.heads * s.d, s.eq), w(s.kv_heads * s.d, s.ek), w(s.kv_heads * s.dv, s.ev), w(s.eout, s.heads * s.dv),
          b(s.heads * s.d),       b(s.kv_heads * s.d),       b(s.kv_heads * s.dv),       b(s.eout)};
}

/// x W^T + b in the scalar S.
template <class S, class T, class X>
Matrix<S> project(const X& x, const Matrix<T>& w, const Vector<T>& b) {
  Matrix<S> y = x.template cast<S>() * w.template cast<S>().transpose();
  if (b.size() != 0) y.rowwise() += b.template cast<S>().transpose();
  return y;
}

/// A rotary configuration, unscaled or with YaRN as HF transformers computes it, written out
/// for the reference.
struct RotarySpec {
  Index head_dim, rotary_dim;
  RotaryLayout layout;
  double base;
  std::optional<HfYarnConfig> yarn = std::nullopt;

  RotaryOptions options() const {
    RotaryOptions o;
    o.rotary_dim = rotary_dim;
    o.layout = layout;
    o.base = base;
    if (yarn) {
      const std::optional<double> m =
          yarn->attention_factor ? std::optional<double>(double(*yarn->attention_factor)) : std::nullopt;
      o.scaling = RotaryScaling::yarn(double(yarn->factor), yarn->original_max_position, double(yarn->beta_fast),
                                      double(yarn->beta_slow), m);
    }
    return o;
  }
};

/// Rotates every head of x in the scalar S, row r at position r: pair i turns by the angle
/// r theta_i, theta_i = base^(-2i / rotary_dim) (HF's YaRN inv_freq with `yarn`), computed here
/// in long double (and the cosine and sine, times YaRN's attention factor, rounded to S),
/// pairing features as the layout says; features rotary_dim.. pass unchanged.
template <class S>
void rotate(Matrix<S>& x, const RotarySpec& spec) {
  const Index pairs = spec.rotary_dim / 2;
  const bool half_split = spec.layout == RotaryLayout::HalfSplit;
  const std::optional<HfYarnParameters> yarn =
      spec.yarn ? std::optional<HfYarnParameters>(hf_yarn_parameters(spec.rotary_dim, spec.base, *spec.yarn))
                : std::nullopt;
  const Real m = yarn ? yarn->attention_factor : Real(1);
  for (Index r = 0; r < x.rows(); ++r)
    for (Index h0 = 0; h0 < x.cols(); h0 += spec.head_dim)
      for (Index i = 0; i < pairs; ++i) {
        const Real theta = yarn ? yarn->inv_freq[std::size_t(i)]
                                : std::pow(Real(spec.base), -Real(2 * i) / Real(spec.rotary_dim));
        const S c = S(m * std::cos(Real(r) * theta)), s = S(m * std::sin(Real(r) * theta));
        const Index a = h0 + (half_split ? i : 2 * i), b = h0 + (half_split ? i + pairs : 2 * i + 1);
        const S xa = x(r, a), xb = x(r, b);
        x(r, a) = xa * c - xb * s;
        x(r, b) = xb * c + xa * s;
      }
}

/// The expected result in long double, and the same computation in T (the baseline of the
/// tolerance rule).
template <class T>
struct Expected {
  RealMatrix output;
  std::vector<RealMatrix> weights;
  Matrix<T> base_output;
  std::vector<Matrix<T>> base_weights;
};

/// The layer of weights `w` (and rotary positions `rotary`, when given) on query (Lq, E_q) over
/// key (Lk, E_k) and value (Lk, E_v), each head h attended by
///   head(h, q_h, k_g, v_g, qt_h, kt_g, vt_g)
/// on its long-double projections (q, k, v) and their T counterparts (qt, kt, vt), g its kv head;
/// it returns a struct with output, weights, base_output and base_weights.
template <class T, class Head>
Expected<T> expected_mha_per_head(const Shape& s, const MultiHeadWeights<T>& w, const Matrix<T>& query,
                                  const Matrix<T>& key, const Matrix<T>& value, const RotarySpec* rotary,
                                  const Head& head) {
  RealMatrix q = project<Real>(query, w.q_proj_weight, w.q_proj_bias);
  RealMatrix k = project<Real>(key, w.k_proj_weight, w.k_proj_bias);
  const RealMatrix v = project<Real>(value, w.v_proj_weight, w.v_proj_bias);
  Matrix<T> qt = project<T>(query, w.q_proj_weight, w.q_proj_bias);
  Matrix<T> kt = project<T>(key, w.k_proj_weight, w.k_proj_bias);
  const Matrix<T> vt = project<T>(value, w.v_proj_weight, w.v_proj_bias);
  if (rotary) {
    rotate(q, *rotary);
    rotate(k, *rotary);
    rotate(qt, *rotary);
    rotate(kt, *rotary);
  }
  RealMatrix heads(query.rows(), s.heads * s.dv);
  Matrix<T> base_heads(query.rows(), s.heads * s.dv);
  Expected<T> e;
  for (Index h = 0; h < s.heads; ++h) {
    const Index g = h / (s.heads / s.kv_heads);
    const auto one = head(h, q.middleCols(h * s.d, s.d), k.middleCols(g * s.d, s.d), v.middleCols(g * s.dv, s.dv),
                          qt.middleCols(h * s.d, s.d), kt.middleCols(g * s.d, s.d), vt.middleCols(g * s.dv, s.dv));
    heads.middleCols(h * s.dv, s.dv) = one.output;
    base_heads.middleCols(h * s.dv, s.dv) = one.base_output;
    e.weights.push_back(one.weights);
    e.base_weights.push_back(one.base_weights);
  }
  e.output = project<Real>(heads, w.out_proj_weight, w.out_proj_bias);
  e.base_output = project<T>(base_heads, w.out_proj_weight, w.out_proj_bias);
  return e;
}

/// The layer with plain attention per head under the visibility `visible` (Lq, Lk).
template <class T>
Expected<T> expected_mha(const Shape& s, const MultiHeadWeights<T>& w, const Matrix<T>& query, const Matrix<T>& key,
                         const Matrix<T>& value, const BoolMatrix& visible, const RotarySpec* rotary = nullptr) {
  struct Head {
    RealMatrix output, weights;
    Matrix<T> base_output, base_weights;
  };
  const Real scale = 1 / std::sqrt(Real(s.d));
  return expected_mha_per_head<T>(s, w, query, key, value, rotary,
                                  [&](Index, const RealMatrix& q, const RealMatrix& k, const RealMatrix& v,
                                      const Matrix<T>& qt, const Matrix<T>& kt, const Matrix<T>& vt) {
                                    const Reference ref = reference_attention(q, k, v, scale, visible);
                                    const Baseline<T> base = baseline_attention<T>(qt, kt, vt, T(scale), visible);
                                    return Head{ref.output, ref.weights, base.output, base.weights};
                                  });
}

}  // namespace attend::test
