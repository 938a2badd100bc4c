// SPDX-License-Identifier: MIT
// The fuzzer's runs: each entry point called through every path, and checked (see
// attention_fuzzer.cpp). run<float> and run<double> are compiled in separate files.
#pragma once

#include "fuzz_input.hpp"
#include "oracle.hpp"

#include <attend/attend.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace attend::fuzz {

/// Runs `call`, which must throw attend::invalid_argument exactly when `invalid`.
template <class F>
void expect(bool invalid, const std::string& what, F&& call) {
  std::string message;
  bool threw = false;
  try {
    call();
  } catch (const attend::invalid_argument& e) {
    threw = true;
    message = e.what();
  } catch (const std::exception& e) {
    fail(what + ": threw something other than attend::invalid_argument: " + e.what());
  }
  if (threw && !invalid) fail(what + ": threw for a valid configuration: " + message);
  if (!threw && invalid) fail(what + ": accepted an invalid configuration");
}

/// An output block inside a NaN-filled buffer: catches writes outside it, and entries the
/// call forgot to write (they stay NaN).
template <class T>
class GuardedOutput {
 public:
  GuardedOutput(Index rows, Index cols)
      : rows_(rows), cols_(cols), buffer_(Matrix<T>::Constant(rows + 2, cols + 3, std::numeric_limits<T>::quiet_NaN())) {}

  MatrixRef<T> ref() { return buffer_.block(1, 1, rows_, cols_); }
  Matrix<T> value() const { return buffer_.block(1, 1, rows_, cols_); }

  void check_guards(const std::string& what) const {
    for (Index i = 0; i < buffer_.rows(); ++i)
      for (Index j = 0; j < buffer_.cols(); ++j) {
        const bool inside = i >= 1 && i <= rows_ && j >= 1 && j <= cols_;
        if (!inside && !std::isnan(buffer_(i, j)))
          fail(what + ": wrote outside the output block at (" + std::to_string(i - 1) + ", " + std::to_string(j - 1) + ")");
      }
  }

 private:
  Index rows_, cols_;
  Matrix<T> buffer_;
};

inline const char* name_of(Algorithm a) {
  switch (a) {
    case Algorithm::Materialized: return "materialized";
    case Algorithm::Blocked: return "blocked";
    case Algorithm::Auto: break;
  }
  return "auto";
}

inline constexpr Algorithm kAlgorithms[] = {Algorithm::Materialized, Algorithm::Blocked, Algorithm::Auto};

inline AttentionOptions options_of(const Config& c, Algorithm algorithm) {
  AttentionOptions o;
  o.scale = c.scale;
  o.algorithm = algorithm;
  o.block_q = c.block_q;
  o.block_k = c.block_k;
  return o;
}

inline bool block_invalid(const Config& c) { return c.block_q < 0 || c.block_k < 0; }

/// A given scale must be finite once cast to T (NaN, Inf and doubles beyond T's range throw).
template <class T>
bool scale_invalid(const Config& c) {
  return c.scale && !std::isfinite(static_cast<T>(*c.scale));
}


// ---------------------------------------------------------------------------------------------
// Masks

inline bool has_causal(MaskKind k) { return k == MaskKind::Causal || k == MaskKind::CausalAndAdditive; }
inline bool has_window(MaskKind k) {
  return k == MaskKind::Window || k == MaskKind::WindowAndBoolean || k == MaskKind::PaddingAndWindow;
}
inline bool has_padding(MaskKind k) { return k == MaskKind::KeyPadding || k == MaskKind::PaddingAndWindow; }
inline bool has_boolean(MaskKind k) {
  return k == MaskKind::Boolean || k == MaskKind::WindowAndBoolean || k == MaskKind::BooleanAndAdditive;
}
inline bool has_bias(MaskKind k) {
  return k == MaskKind::Additive || k == MaskKind::CausalAndAdditive || k == MaskKind::BooleanAndAdditive;
}

/// Key j visible to query i under a band around the aligned key (the documented semantics,
/// written independently of masks.hpp): a - left <= j <= a + right, -1 = unbounded.
inline bool in_band(Index i, Index j, Index lq, Index lk, Alignment alignment, Index left, Index right) {
  const Index a = i + (alignment == Alignment::BottomRight ? lk - lq : 0);
  return (left < 0 || j >= a - left) && (right < 0 || j <= a + right);
}

template <class T>
struct MaskData {
  MaskKind kind = MaskKind::None;
  Alignment alignment = Alignment::TopLeft;
  Index left = -1, right = -1, valid = 0;
  std::optional<Placed<bool>> visible;  // the boolean mask as the call sees it
  std::optional<Placed<T>> bias_view;   // the additive mask as the call sees it
  BoolMatrix structural;                // (Lq, Lk) band and boolean visibility
  Matrix<T> bias;                       // (Lq, Lk) additive part, when there is one
  bool invalid = false;
};

template <class T>
MaskData<T> make_mask(const Config& c, ValueSource<T>& src, Index lq, Index lk) {
  MaskData<T> m;
  m.kind = c.mask;
  m.alignment = c.alignment;
  m.left = c.left;
  m.right = c.right;
  m.valid = c.valid;
  m.structural = BoolMatrix::Constant(lq, lk, true);
  const bool bad_shape = c.perturb == Perturb::MaskShape && (has_boolean(m.kind) || has_bias(m.kind));
  const Index rows = lq + (bad_shape ? 1 : 0);
  const Layout dense_layout = c.dense_column_major ? Layout::ColumnMajor : Layout::Contiguous;
  if (has_window(m.kind) && (m.left < -1 || m.right < -1)) m.invalid = true;
  if (has_padding(m.kind) && (m.valid < 0 || m.valid > lk)) m.invalid = true;
  if (bad_shape) m.invalid = true;
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      bool visible = true;
      if (has_causal(m.kind)) visible = visible && in_band(i, j, lq, lk, m.alignment, -1, 0);
      if (has_window(m.kind)) visible = visible && in_band(i, j, lq, lk, m.alignment, m.left, m.right);
      if (has_padding(m.kind)) visible = visible && j < m.valid;
      m.structural(i, j) = visible;
    }
  if (has_boolean(m.kind)) {
    BoolMatrix b(rows, lk);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < lk; ++j) b(i, j) = src.next_bit(c.bool_density);
    if (!bad_shape) m.structural = m.structural.array() && b.array();
    m.visible.emplace(b, dense_layout);
  }
  if (has_bias(m.kind)) {
    Matrix<T> b(rows, lk);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < lk; ++j) b(i, j) = src.next_bias();
    m.bias = b;
    m.bias_view.emplace(b, dense_layout);
  }
  return m;
}

/// Calls f(mask) with the mask policy that `m` describes.
template <class T, class F>
void with_mask(const MaskData<T>& m, F&& f) {
  const auto window = [&] { return Window(m.left, m.right, m.alignment); };
  const auto boolean = [&] { return BooleanMask(m.visible->view()); };
  const auto additive = [&] { return AdditiveMask(m.bias_view->view()); };
  switch (m.kind) {
    case MaskKind::None: return f(NoMask{});
    case MaskKind::Causal: return f(Causal(m.alignment));
    case MaskKind::Window: return f(window());
    case MaskKind::KeyPadding: return f(KeyPadding(m.valid));
    case MaskKind::Boolean: return f(boolean());
    case MaskKind::Additive: return f(additive());
    case MaskKind::WindowAndBoolean: return f(window() & boolean());
    case MaskKind::CausalAndAdditive: return f(Causal(m.alignment) & additive());
    case MaskKind::PaddingAndWindow: return f(KeyPadding(m.valid) & window());
    case MaskKind::BooleanAndAdditive: return f(boolean() & additive());
    case MaskKind::kCount: break;
  }
}

/// Calls f(q, k, v) with the matrices in the configured layout: the plain matrices, or strided
/// maps of copies (all three of one type, so each entry point is compiled twice, not 64 times).
template <class T, class F>
void with_layout(Layout layout, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, F&& f) {
  if (layout == Layout::Contiguous) return f(q, k, v);
  const Placed<T> pq(q, layout), pk(k, layout), pv(v, layout);
  f(pq.view(), pk.view(), pv.view());
}

// ---------------------------------------------------------------------------------------------
// Single-head entry points

/// The matrices of one single-head case, with the deliberate shape errors applied.
template <class T>
struct Inputs {
  Matrix<T> q, k, v;  // (Lq, Dk), (Lk, Dk'), (Lk', Dv)
  bool shape_invalid = false;
};

template <class T>
Inputs<T> make_inputs(const Config& c, ValueSource<T>& src, Index key_dim) {
  Inputs<T> in;
  const Index k_cols = key_dim + (c.perturb == Perturb::KeyDim ? 1 : 0);
  const Index v_rows = c.lk + (c.perturb == Perturb::ValueRows ? 1 : 0);
  in.q = src.matrix(c.lq, c.dk);
  in.k = src.matrix(c.lk, k_cols);
  in.v = src.matrix(v_rows, c.dv, true);
  in.shape_invalid = c.perturb == Perturb::KeyDim || c.perturb == Perturb::ValueRows;
  return in;
}

/// Everything one single-head entry point needs to be run and checked.
template <class T>
struct Case {
  const Config& config;
  const Inputs<T>& inputs;
  const MaskData<T>& mask;
  std::string name;
  bool invalid = false;  // invalid for every form of the call
  std::optional<Problem> problem;
};

/// Runs the returning and the _into forms of one entry point through every algorithm.
/// call(options) returns the output; call_into(out, options, lse) writes it.
template <class T, class V, class Call, class CallInto>
void run_forms(const Case<T>& cs, const V& v, Call&& call, CallInto&& call_into) {
  const Config& c = cs.config;
  const Index lq = cs.inputs.q.rows(), dv = cs.inputs.v.cols();
  for (Algorithm algorithm : kAlgorithms) {
    const AttentionOptions o = options_of(c, algorithm);
    const std::string what = cs.name + " (" + name_of(algorithm) + ")";
    const bool invalid = cs.invalid || block_invalid(c);
    expect(invalid, what, [&] {
      const Matrix<T> out = call(o);
      if (cs.problem) check_problem<T>(what, *cs.problem, v, out);
    });
    const bool bad_out = c.perturb == Perturb::OutShape, bad_lse = c.perturb == Perturb::LseSize;
    GuardedOutput<T> out(lq + (bad_out ? 1 : 0), dv);
    Vector<T> lse = Vector<T>::Constant(lq + (bad_lse ? 1 : 0), std::numeric_limits<T>::quiet_NaN());
    expect(invalid || bad_out || bad_lse, what + " into", [&] {
      call_into(out.ref(), o, VectorRef<T>(lse));
      out.check_guards(what + " into");
      if (cs.problem) check_problem<T>(what + " into", *cs.problem, v, out.value(), lse.data());
    });
  }
}

/// The exact problem of a valid case; `visible` replaces the mask's structural visibility.
template <class T>
std::optional<Problem> problem_of(const Case<T>& cs, const Scores& s, const BoolMatrix* visible = nullptr) {
  if (cs.invalid) return std::nullopt;
  const MaskData<T>& m = cs.mask;
  return make_problem<T>(s, visible ? *visible : m.structural, has_bias(m.kind) ? &m.bias : nullptr,
                         all_finite(cs.inputs.v), cs.inputs.q, cs.inputs.k);
}

template <class T>
T default_scale(const Config& c, Index d) {
  return c.scale ? static_cast<T>(*c.scale) : T(1) / std::sqrt(static_cast<T>(d));
}

template <class T>
void run_single_head(const Config& c, ValueSource<T>& src) {
  const Index key_dim = c.entry == Entry::Bilinear ? c.d2 : c.dk;
  const Inputs<T> in = make_inputs(c, src, key_dim);
  const MaskData<T> mask = make_mask(c, src, c.lq, c.lk);
  Case<T> cs{c, in, mask, "", in.shape_invalid || mask.invalid || scale_invalid<T>(c), std::nullopt};
  const auto& q = in.q;
  const auto& k = in.k;

  switch (c.entry) {
    case Entry::Sdpa: {
      cs.name = "scaled_dot_product_attention";
      cs.invalid = cs.invalid || c.dk == 0;
      cs.problem = problem_of(cs, dot_scores<T>(q, k, default_scale<T>(c, c.dk)));
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return scaled_dot_product_attention(qq, kk, vv, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                scaled_dot_product_attention_into(qq, kk, vv, out, m, o, lse);
              });
          for (Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
            const std::string what = cs.name + "_with_lse (" + name_of(algorithm) + ")";
            expect(cs.invalid || block_invalid(c), what, [&] {
              const AttentionResult<T> r = scaled_dot_product_attention_with_lse(qq, kk, vv, m, options_of(c, algorithm));
              if (r.lse.size() != c.lq) fail(what + ": lse has the wrong size");
              if (cs.problem) check_problem<T>(what, *cs.problem, vv, r.output, r.lse.data());
            });
          }
          // The weights path forms S whole and takes no tile sizes.
          expect(cs.invalid, cs.name + "_with_weights", [&] {
            const AttentionResult<T> r =
                scaled_dot_product_attention_with_weights(qq, kk, vv, m, options_of(c, Algorithm::Auto));
            if (r.lse.size() != c.lq) fail(cs.name + "_with_weights: lse has the wrong size");
            if (cs.problem) check_problem<T>(cs.name + "_with_weights", *cs.problem, vv, r.output, r.lse.data(), &r.weights);
          });
        });
      });
      break;
    }
    case Entry::Dot: {
      cs.name = "dot_product_attention";
      cs.invalid = cs.invalid || c.dk == 0;
      cs.problem = problem_of(cs, dot_scores<T>(q, k, c.scale ? static_cast<T>(*c.scale) : T(1)));
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return dot_product_attention(qq, kk, vv, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                dot_product_attention_into(qq, kk, vv, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::Bilinear: {
      cs.name = "bilinear_attention";
      // W (d_q, d_k) is always well-shaped; K's width d2 may be 0 (then q W has no columns).
      const Matrix<T> w = src.matrix(c.dk, c.d2);
      cs.invalid = cs.invalid || c.d2 == 0;
      if (!cs.invalid)  // K's width must match W's before the scores exist
        cs.problem = problem_of(cs, bilinear_scores<T>(q, w, k, c.scale ? static_cast<T>(*c.scale) : T(1)));
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return bilinear_attention(qq, kk, vv, w, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                bilinear_attention_into(qq, kk, vv, w, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::Cosine: {
      cs.name = "cosine_attention";
      const double temperature = c.param;
      cs.invalid = cs.invalid || c.dk == 0 || !(temperature > 0 && std::isfinite(temperature)) ||
                   !std::isfinite(static_cast<T>(1.0 / temperature)) || c.scale.has_value();
      cs.problem = problem_of(cs, cosine_scores<T>(q, k, static_cast<T>(1.0 / temperature)));
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return cosine_attention(qq, kk, vv, temperature, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                cosine_attention_into(qq, kk, vv, temperature, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::SoftCap: {
      cs.name = "soft_capped_attention";
      const double cap = c.param;
      cs.invalid = cs.invalid || c.dk == 0 || !(static_cast<T>(cap) > 0 && std::isfinite(static_cast<T>(cap)));
      cs.problem = problem_of(cs, soft_cap_scores<T>(dot_scores<T>(q, k, default_scale<T>(c, c.dk)), T(cap)));
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return soft_capped_attention(qq, kk, vv, cap, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                soft_capped_attention_into(qq, kk, vv, cap, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::TopK: {
      cs.name = "top_k_attention(k=" + std::to_string(c.top_k) + ")";
      cs.invalid = cs.invalid || c.dk == 0 || c.top_k < 1;
      cs.problem = problem_of(cs, dot_scores<T>(q, k, default_scale<T>(c, c.dk)));
      if (cs.problem) keep_top_k(*cs.problem, c.top_k);
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return top_k_attention(qq, kk, vv, c.top_k, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                top_k_attention_into(qq, kk, vv, c.top_k, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::LocalWindow: {
      const Window& w = c.local_window;
      cs.name = "local_window_attention(" + std::to_string(w.left) + ", " + std::to_string(w.right) + ")";
      cs.invalid = cs.invalid || c.dk == 0 || w.left < -1 || w.right < -1;
      BoolMatrix visible = mask.structural;  // the window and the mask
      for (Index i = 0; i < c.lq; ++i)
        for (Index j = 0; j < c.lk; ++j)
          visible(i, j) = visible(i, j) && in_band(i, j, c.lq, c.lk, w.alignment, w.left, w.right);
      cs.problem = problem_of(cs, dot_scores<T>(q, k, default_scale<T>(c, c.dk)), &visible);
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return local_window_attention(qq, kk, vv, w, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                local_window_attention_into(qq, kk, vv, w, out, m, o, lse);
              });
        });
      });
      break;
    }
    case Entry::Additive: {
      // W_q (h, d_q), W_k (h, d_k), v (h), bias (h) or none; h = d2.
      const Index h = c.d2;
      const Matrix<T> w_q = src.matrix(h, c.dk), w_k = src.matrix(h, c.dk);
      const Vector<T> v_att = src.matrix(h, 1);
      const Vector<T> b = c.dense_column_major ? Vector<T>(src.matrix(h, 1)) : Vector<T>();
      cs.name = "AdditiveAttention";
      const bool weights_invalid = h == 0 || c.dk == 0;
      cs.invalid = cs.invalid || weights_invalid || c.scale.has_value();
      const bool weights_call_invalid = in.shape_invalid || mask.invalid || weights_invalid;
      Case<T> pcs = cs;
      pcs.invalid = weights_call_invalid;
      const std::optional<Problem> problem =
          weights_call_invalid ? std::nullopt : problem_of(pcs, additive_scores<T>(q, k, w_q, w_k, v_att, b));
      cs.problem = cs.invalid ? std::nullopt : problem;
      with_layout<T>(c.layout, q, k, in.v, [&](const auto& qq, const auto& kk, const auto& vv) {
        with_mask(mask, [&](const auto& m) {
          // The constructor rejects empty weights; build it inside each checked call.
          const auto make = [&] { return AdditiveAttention<T>(w_q, w_k, v_att, b); };
          run_forms(
              cs, vv, [&](const AttentionOptions& o) { return make().forward(qq, kk, vv, m, o); },
              [&](MatrixRef<T> out, const AttentionOptions& o, VectorRef<T> lse) {
                make().forward_into(qq, kk, vv, out, m, o, lse);
              });
          expect(weights_call_invalid, "AdditiveAttention::forward_with_weights", [&] {
            const AttentionResult<T> r = make().forward_with_weights(qq, kk, vv, m);
            if (problem)
              check_problem<T>("AdditiveAttention::forward_with_weights", *problem, vv, r.output, r.lse.data(), &r.weights);
          });
        });
      });
      break;
    }
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// Batched heads and decoding

/// A copy of m.block(row, col, rows, cols). An empty matrix's data pointer is null, and Eigen
/// forms a block's pointer by adding the offset to it, so empty blocks are made directly.
template <class M>
Matrix<typename M::Scalar> block_of(const M& m, Index row, Index col, Index rows, Index cols) {
  if (m.size() == 0 || rows == 0 || cols == 0) return Matrix<typename M::Scalar>(rows, cols);
  return m.block(row, col, rows, cols);
}

template <class T>
void run_batched(const Config& c, ValueSource<T>& src) {
  const Index batch = c.batch, heads = c.heads;
  const Index b_rows = std::max<Index>(batch, 1), h_cols = std::max<Index>(heads, 1);
  const Index k_cols = h_cols * c.dk + (c.perturb == Perturb::KeyDim ? 1 : 0);
  const Index v_rows = b_rows * c.lk + (c.perturb == Perturb::ValueRows ? 1 : 0);
  const Matrix<T> q = src.matrix(b_rows * c.lq, h_cols * c.dk), k = src.matrix(b_rows * c.lk, k_cols),
                  v = src.matrix(v_rows, h_cols * c.dv, true);
  const MaskData<T> mask = make_mask(c, src, c.lq, c.lk);
  const bool invalid = batch == 0 || heads == 0 || c.dk == 0 || mask.invalid || block_invalid(c) ||
                       scale_invalid<T>(c) || c.perturb == Perturb::KeyDim || c.perturb == Perturb::ValueRows;
  // One exact problem per (sequence, head).
  std::vector<Problem> problems;
  if (!invalid)
    for (Index n = 0; n < batch * heads; ++n) {
      const Index b = n / heads, h = n % heads;
      const Matrix<T> qh = block_of(q, b * c.lq, h * c.dk, c.lq, c.dk), kh = block_of(k, b * c.lk, h * c.dk, c.lk, c.dk);
      problems.push_back(make_problem<T>(dot_scores<T>(qh, kh, default_scale<T>(c, c.dk)), mask.structural,
                                         has_bias(mask.kind) ? &mask.bias : nullptr,
                                         all_finite(block_of(v, b * c.lk, h * c.dv, c.lk, c.dv)), qh, kh));
    }
  const auto check = [&](const std::string& what, const Matrix<T>& out) {
    if (out.rows() != q.rows() || out.cols() != v.cols()) fail(what + ": output has the wrong shape");
    for (Index n = 0; n < Index(problems.size()); ++n) {
      const Index b = n / heads, h = n % heads;
      check_problem<T>(what + " head " + std::to_string(h) + " of sequence " + std::to_string(b), problems[std::size_t(n)],
                       block_of(v, b * c.lk, h * c.dv, c.lk, c.dv), block_of(out, b * c.lq, h * c.dv, c.lq, c.dv));
    }
  };
  const BatchLayout layout{heads, batch};
  with_layout<T>(c.layout, q, k, v, [&](const auto& qq, const auto& kk, const auto& vv) {
    with_mask(mask, [&](const auto& m) {
      for (Algorithm algorithm : kAlgorithms) {
        const AttentionOptions o = options_of(c, algorithm);
        const std::string what = std::string("batched_attention (") + name_of(algorithm) + ")";
        expect(invalid, what, [&] { check(what, batched_attention(qq, kk, vv, layout, m, o)); });
        const bool bad_out = c.perturb == Perturb::OutShape;
        GuardedOutput<T> out(q.rows() + (bad_out ? 1 : 0), v.cols());
        expect(invalid || bad_out, what + " into", [&] {
          batched_attention_into(qq, kk, vv, out.ref(), layout, m, o);
          out.check_guards(what + " into");
          check(what + " into", out.value());
        });
      }
    });
  });
}

/// Decoding: appends chunks of tokens to a KVCache and checks every step against attention
/// over the whole history (bottom-right causal, within the cache's window).
template <class T>
void run_decode(const Config& c, ValueSource<T>& src) {
  const Index capacity = c.lk, kv_heads = c.batch, group = std::max<Index>(c.heads, 1), d = c.dk;
  const Index heads = kv_heads * group + (c.perturb == Perturb::KeyDim ? 1 : 0);
  const Index window = c.left;  // -2 .. 70: -1 unbounded, else must lie in [1, capacity]
  const Index dv = c.dv == 0 ? d : c.dv;
  const bool cache_invalid = capacity < 1 || kv_heads < 1 || d < 1 || !(window == -1 || (window >= 1 && window <= capacity));
  std::optional<KVCache<T>> cache;
  expect(cache_invalid, "KVCache", [&] { cache.emplace(capacity, kv_heads, d, KVCacheOptions{window, c.dv}); });
  if (!cache) return;
  const bool step_invalid = heads % kv_heads != 0 || block_invalid(c) || scale_invalid<T>(c);
  Matrix<T> keys(0, kv_heads * d), values(0, kv_heads * dv);  // every appended row
  Index kept = 0;                                              // rows the cache holds
  for (std::size_t s = 0; s < c.chunks.size(); ++s) {
    const Index n = c.chunks[s];
    const Matrix<T> q = src.matrix(n, heads * d), k_new = src.matrix(n, kv_heads * d), v_new = src.matrix(n, kv_heads * dv, true);
    const Index keep = window < 0 ? kept : std::min(kept, window - 1);
    const bool overflow = keep + n > capacity;
    const Algorithm algorithm = kAlgorithms[s % 3];
    const std::string what = "decode_step " + std::to_string(s) + " (" + std::to_string(n) + " tokens after " +
                             std::to_string(keys.rows()) + ", window " + std::to_string(window) + ")";
    bool appended = false;
    with_layout<T>(c.layout, q, k_new, v_new, [&](const auto& qq, const auto& kk, const auto& vv) {
      expect(step_invalid || overflow, what, [&] {
        const Matrix<T> out = decode_step(*cache, qq, kk, vv, heads, options_of(c, algorithm));
        appended = true;
        if (out.rows() != n || out.cols() != heads * dv) fail(what + ": output has the wrong shape");
        const Index before = keys.rows(), total = before + n;
        keys.conservativeResize(total, Eigen::NoChange);
        values.conservativeResize(total, Eigen::NoChange);
        keys.bottomRows(n) = k_new;
        values.bottomRows(n) = v_new;
        BoolMatrix visible(n, total);
        for (Index r = 0; r < n; ++r)
          for (Index j = 0; j < total; ++j)
            visible(r, j) = j <= before + r && (window < 0 || j > before + r - window);
        for (Index h = 0; h < heads; ++h) {
          const Index g = h / (heads / kv_heads);  // the library's grouping, also when heads was perturbed
          const Matrix<T> qh = block_of(q, 0, h * d, n, d), kh = block_of(keys, 0, g * d, total, d),
                          vh = block_of(values, 0, g * dv, total, dv);
          const Problem p = make_problem<T>(dot_scores<T>(qh, kh, default_scale<T>(c, d)), visible, nullptr,
                                            all_finite(vh), qh, kh);
          check_problem<T>(what + " head " + std::to_string(h), p, vh, block_of(out, 0, h * dv, n, dv));
        }
      });
    });
    if (appended) kept = keep + n;
    if (appended && cache->size() != kept) fail(what + ": the cache holds " + std::to_string(cache->size()) + " rows, expected " + std::to_string(kept));
  }
}

template <class T>
void run(const Config& c, FuzzedDataProvider& in) {
  ValueSource<T> src(in, c.values, c.exponent);
  switch (c.entry) {
    case Entry::Batched: return run_batched<T>(c, src);
    case Entry::Decode: return run_decode<T>(c, src);
    default: return run_single_head<T>(c, src);
  }
}

}  // namespace attend::fuzz

