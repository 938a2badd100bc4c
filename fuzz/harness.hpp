// SPDX-License-Identifier: MIT
// The fuzzer's runs: each entry point called through every path, and checked (see
// attention_fuzzer.cpp). run<float> and run<double> are compiled in separate files.
#pragma once

#include "fuzz_input.hpp"
#include "oracle.hpp"

#include <attend/attend.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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

// ---------------------------------------------------------------------------------------------
// Threads: every result must be bitwise the same under any OpenMP and Eigen thread setting.

inline void set_threads(int omp_threads, int eigen_threads) {
#ifdef _OPENMP
  omp_set_num_threads(omp_threads);
#endif
  Eigen::setNbThreads(eigen_threads);
}

template <class M>
bool same_bits(const M& a, const M& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index i = 0; i < a.rows(); ++i)
    for (Index j = 0; j < a.cols(); ++j) {
      const auto x = a(i, j), y = b(i, j);
      if (std::memcmp(&x, &y, sizeof x) != 0) return false;
    }
  return true;
}

template <class T>
bool same_bits(const MultiHeadResult<T>& a, const MultiHeadResult<T>& b) {
  if (!same_bits(a.output, b.output) || a.weights.size() != b.weights.size()) return false;
  for (std::size_t h = 0; h < a.weights.size(); ++h)
    if (!same_bits(a.weights[h], b.weights[h])) return false;
  return true;
}

/// Returns call() under the run's thread settings; when they are not one thread, calls it again
/// with one OpenMP and one Eigen thread and fails unless the two results are bitwise equal.
template <class F>
auto thread_invariant(const Config& c, const std::string& what, F&& call) {
  set_threads(c.threads, c.eigen_threads);
  auto result = call();
  if (c.threads > 1 || c.eigen_threads > 1) {
    set_threads(1, 1);
    const auto serial = call();
    set_threads(c.threads, c.eigen_threads);
    if (!same_bits(result, serial))
      fail(what + ": the result with " + std::to_string(c.threads) + " OpenMP and " + std::to_string(c.eigen_threads) +
           " Eigen threads differs from the one-thread result");
    ++check_counts.invariant;
  }
  return result;
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
  // One key column too many: a wrong row count could be a valid stack of per-head slices.
  const Index cols = lk + (bad_shape ? 1 : 0);
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
    BoolMatrix b(lq, cols);
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < cols; ++j) b(i, j) = src.next_bit(c.bool_density);
    if (!bad_shape) m.structural = m.structural.array() && b.array();
    m.visible.emplace(b, dense_layout);
  }
  if (has_bias(m.kind)) {
    Matrix<T> b(lq, cols);
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < cols; ++j) b(i, j) = src.next_bias();
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
      const Matrix<T> out = thread_invariant(c, what, [&] { return Matrix<T>(call(o)); });
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
        expect(invalid, what, [&] {
          check(what,
                thread_invariant(c, what, [&] { return Matrix<T>(batched_attention(qq, kk, vv, layout, m, o)); }));
        });
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

/// Paged decoding (the Decode entry with `paged` set): a PagedKVCache of `block_k` keys a block
/// (the default for 0; a negative size must throw) holds sequence A, which appends the chunks'
/// tokens, and B, forked from A after its first chunk (sharing its blocks, copy on write),
/// truncated back by `left` positions, then appending tokens of its own. After each chunk both
/// decode their new tokens in one paged_attention_into call, checked head by head against
/// attention over the sequence's history (bottom-right causal), each sequence's rows against a
/// call with it alone (bitwise, as documented), and the output block's guards. The pool holds
/// ample blocks, or when `valid` < 0 only A's first chunk: an append that finds the pool short
/// must throw and leave both sequences' lengths and the free blocks as they were. At the end,
/// freeing both sequences returns every block to the pool.
template <class T>
void run_paged(const Config& c, ValueSource<T>& src) {
  const Index kv_heads = c.batch, group = std::max<Index>(c.heads, 1), d = c.dk;
  const Index heads = kv_heads * group + (c.perturb == Perturb::KeyDim ? 1 : 0);
  const Index dv = c.dv == 0 ? d : c.dv;
  const Index block = c.block_k == 0 ? PagedKVCacheOptions{}.block_size : c.block_k;
  Index total = 0;
  for (const Index n : c.chunks) total += n;
  const bool tight = c.valid < 0;
  const Index first = c.chunks.empty() ? 0 : c.chunks[0];
  const Index pool = block < 1 ? 1 : tight ? std::max<Index>((first + block - 1) / block, 1)
                                           : 2 * ((total + block - 1) / block) + 2;
  const bool cache_invalid = kv_heads < 1 || d < 1 || block < 1;
  std::optional<PagedKVCache<T>> cache;
  expect(cache_invalid, "PagedKVCache", [&] {
    PagedKVCacheOptions o;
    o.block_size = block;
    o.value_head_dim = c.dv;
    cache.emplace(pool, kv_heads, d, o);
  });
  if (!cache) return;
  // (A decode step reads no query tiles: like decode_attention_into it ignores block_q.)
  const bool step_invalid = heads % kv_heads != 0 || scale_invalid<T>(c);
  struct History {
    Index id = -1;
    Matrix<T> keys, values;  // every position the sequence holds, in order
  };
  std::vector<History> live;
  live.push_back({cache->add_sequence(), Matrix<T>(0, kv_heads * d), Matrix<T>(0, kv_heads * dv)});
  const auto append = [&](History& h, const Matrix<T>& k_new, const Matrix<T>& v_new, const std::string& what) {
    std::vector<Index> lengths;
    for (const History& x : live) lengths.push_back(cache->length(x.id));
    const Index free_before = cache->free_blocks();
    try {
      cache->append(h.id, k_new, v_new);
    } catch (const invalid_argument&) {
      if (!tight) fail(what + ": append threw with an ample pool");
      for (std::size_t i = 0; i < live.size(); ++i)
        if (cache->length(live[i].id) != lengths[i]) fail(what + ": a failed append changed a sequence's length");
      if (cache->free_blocks() != free_before) fail(what + ": a failed append changed the free blocks");
      return false;
    }
    const Index before = h.keys.rows();
    h.keys.conservativeResize(before + k_new.rows(), Eigen::NoChange);
    h.values.conservativeResize(before + v_new.rows(), Eigen::NoChange);
    h.keys.bottomRows(k_new.rows()) = k_new;
    h.values.bottomRows(v_new.rows()) = v_new;
    return true;
  };
  for (std::size_t s = 0; s < c.chunks.size(); ++s) {
    const Index n = c.chunks[s];
    const std::string what = "paged decode " + std::to_string(s) + " (" + std::to_string(n) + " tokens, block " +
                             std::to_string(block) + ", " + std::to_string(live.size()) + " sequences)";
    if (s == 1) {  // B: a fork of A, rolled back by `left` positions
      History b = live[0];
      b.id = cache->fork(live[0].id);
      const Index keep = std::max<Index>(b.keys.rows() - std::max<Index>(c.left, 0), 0);
      cache->truncate(b.id, keep);
      b.keys.conservativeResize(keep, Eigen::NoChange);
      b.values.conservativeResize(keep, Eigen::NoChange);
      live.push_back(b);
    }
    std::vector<Matrix<T>> queries;
    for (History& h : live) {
      const Matrix<T> k_new = src.matrix(n, kv_heads * d), v_new = src.matrix(n, kv_heads * dv, true);
      if (!append(h, k_new, v_new, what)) return;
      queries.push_back(src.matrix(n, heads * d));
    }
    std::vector<Index> ids, offsets{0};
    for (const History& h : live) {
      ids.push_back(h.id);
      offsets.push_back(offsets.back() + n);
    }
    Matrix<T> q(offsets.back(), heads * d);
    for (std::size_t b = 0; b < live.size(); ++b) q.middleRows(offsets[b], n) = queries[b];
    const AttentionOptions o = options_of(c, Algorithm::Auto);
    expect(step_invalid, what, [&] {
      GuardedOutput<T> out(q.rows(), heads * dv);
      const Matrix<T> result = thread_invariant(c, what, [&] {
        paged_attention_into(*cache, ids, SequenceRows::packed(offsets), q, heads, out.ref(), o);
        return out.value();
      });
      out.check_guards(what);
      for (std::size_t b = 0; b < live.size(); ++b) {
        const History& h = live[b];
        const std::string which = what + " sequence " + std::to_string(b);
        Matrix<T> alone(n, heads * dv);
        paged_attention_into(*cache, std::vector<Index>{h.id}, SequenceRows::packed(std::vector<Index>{0, n}),
                             queries[b], heads, alone, o);
        if (!same_bits(alone, Matrix<T>(result.middleRows(offsets[b], n))))
          fail(which + ": its rows differ from a call with it alone");
        const Index length = h.keys.rows();
        BoolMatrix visible(n, length);
        for (Index r = 0; r < n; ++r)
          for (Index j = 0; j < length; ++j) visible(r, j) = j <= length - n + r;
        for (Index head = 0; head < heads; ++head) {
          const Index g = head / (heads / kv_heads);
          const Matrix<T> qh = block_of(queries[b], 0, head * d, n, d), kh = block_of(h.keys, 0, g * d, length, d),
                          vh = block_of(h.values, 0, g * dv, length, dv);
          const Problem p = make_problem<T>(dot_scores<T>(qh, kh, default_scale<T>(c, d)), visible, nullptr,
                                            all_finite(vh), qh, kh);
          check_problem<T>(which + " head " + std::to_string(head), p, vh,
                           block_of(result, offsets[b], head * dv, n, dv));
        }
      }
    });
  }
  for (const History& h : live) cache->free_sequence(h.id);
  if (cache->free_blocks() != cache->num_blocks())
    fail("paged decode: " + std::to_string(cache->num_blocks() - cache->free_blocks()) +
         " blocks stay taken after every sequence was freed");
}

/// a + b, saturated to Index's range (positions near INT64_MAX without overflow in the harness).
inline Index saturated_add(Index a, Index b) {
  constexpr Index hi = std::numeric_limits<Index>::max(), lo = std::numeric_limits<Index>::min();
  if (b > 0 && a > hi - b) return hi;
  if (b < 0 && a < lo - b) return lo;
  return a + b;
}

/// Positions first .. first + n - 1 overflow Index.
inline bool positions_overflow(Index first, Index n) {
  return n > 0 && first > std::numeric_limits<Index>::max() - (n - 1);
}

/// The query, key and value head counts of the MultiHead and DecodeSplit entries: H_kv =
/// `heads` (1..3) and G = `batch` (1..3) query heads per kv head; `heads` = 0 asks for H_kv = H.
struct Heads {
  Index heads, kv_heads, kv_argument;
};
inline Heads heads_of(const Config& c) {
  const Index group = std::max<Index>(c.batch, 1);
  if (c.heads == 0) return {group, group, 0};
  return {c.heads * group, c.heads, c.heads};
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding

/// RotaryEmbedding's documented preconditions.
inline bool rope_invalid(const Rope& r, Index head_dim, double base) {
  const Index rotary_dim = r.rotary_dim == 0 ? head_dim : r.rotary_dim;
  if (head_dim < 1 || rotary_dim < 2 || rotary_dim % 2 != 0 || rotary_dim > head_dim) return true;
  if (!(std::isfinite(base) && base > 1) || r.cache_length < 0) return true;
  if (r.scaling == int(RotaryScalingType::None)) return false;
  if (!(std::isfinite(r.factor) && r.factor >= 1)) return true;
  const bool yarn = r.scaling == int(RotaryScalingType::Yarn), llama3 = r.scaling == int(RotaryScalingType::Llama3);
  if ((yarn || llama3) && r.original_max_position < 1) return true;
  if (yarn && !(r.beta_slow > 0 && r.beta_fast >= r.beta_slow && std::isfinite(r.beta_fast))) return true;
  if (llama3 && !(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor && std::isfinite(r.high_freq_factor)))
    return true;
  return false;
}

inline RotaryOptions rope_options(const Rope& r, double base) {
  RotaryOptions o;
  if (r.rotary_dim != 0) o.rotary_dim = r.rotary_dim;
  o.base = base;
  o.layout = r.layout == 1 ? RotaryLayout::Interleaved : RotaryLayout::HalfSplit;
  o.cache_length = r.cache_length;
  switch (RotaryScalingType(r.scaling)) {
    case RotaryScalingType::Linear: o.scaling = RotaryScaling::linear(r.factor); break;
    case RotaryScalingType::NtkAware: o.scaling = RotaryScaling::ntk_aware(r.factor); break;
    case RotaryScalingType::Yarn:
      o.scaling = RotaryScaling::yarn(r.factor, r.original_max_position, r.beta_fast, r.beta_slow);
      break;
    case RotaryScalingType::Llama3:
      o.scaling = RotaryScaling::llama3(r.factor, r.original_max_position, r.low_freq_factor, r.high_freq_factor);
      break;
    default: break;
  }
  return o;
}

/// YaRN's attention factor m multiplies cos and sin (HF transformers, ggml): the rotated
/// features come out scaled by m, the others not.
inline constexpr bool kYarnFactorInRotation = true;

inline RopeSpec rope_spec(const Rope& r, Index head_dim, double base) {
  RopeSpec s;
  s.head_dim = head_dim;
  s.rotary_dim = r.rotary_dim == 0 ? head_dim : r.rotary_dim;
  s.interleaved = r.layout == 1;
  s.scaling = r.scaling;
  s.base = Real(base);
  s.factor = Real(r.factor);
  s.original_max_position = r.original_max_position;
  s.beta_fast = r.beta_fast;
  s.beta_slow = r.beta_slow;
  s.low_freq_factor = Real(r.low_freq_factor);
  s.high_freq_factor = Real(r.high_freq_factor);
  s.factor_in_rotation = kYarnFactorInRotation;
  return s;
}

/// RotaryEmbedding::apply on a block of a NaN-filled buffer, at a start position or at
/// explicit positions; checked against the exact rotation, features past rotary_dim unchanged,
/// and cached and uncached positions bitwise equal.
template <class T>
void run_rotary(const Config& c, ValueSource<T>& src) {
  const Index head_dim = c.dk / 4, heads = std::max<Index>(c.heads, 1) * std::max<Index>(c.batch, 1);
  const Index cols = heads * head_dim + (c.perturb == Perturb::KeyDim ? 1 : 0), rows = c.lq;
  const Matrix<T> x = src.matrix(rows, cols);
  const bool ctor_invalid = rope_invalid(c.rope, head_dim, c.base);
  std::optional<RotaryEmbedding<T>> rope, uncached;
  expect(ctor_invalid, "RotaryEmbedding", [&] { rope.emplace(head_dim, rope_options(c.rope, c.base)); });
  if (!rope) return;
  RotaryOptions no_cache = rope_options(c.rope, c.base);
  no_cache.cache_length = 0;
  uncached.emplace(head_dim, no_cache);
  std::vector<Index> positions(static_cast<std::size_t>(rows));
  Vector<Index> position_ids(rows + (c.perturb == Perturb::ValueRows ? 1 : 0));
  for (Index r = 0; r < position_ids.size(); ++r)
    position_ids(r) =
        c.rope.explicit_positions ? saturated_add(c.position, r % 2 ? -r : 3 * r) : saturated_add(c.position, r);
  for (Index r = 0; r < rows; ++r) positions[std::size_t(r)] = position_ids(r);
  bool invalid = head_dim == 0 || cols % head_dim != 0;
  invalid =
      invalid || (c.rope.explicit_positions ? c.perturb == Perturb::ValueRows : positions_overflow(c.position, rows));
  const std::string what = std::string("RotaryEmbedding::apply (") +
                           (c.rope.explicit_positions ? "positions" : "start " + std::to_string(c.position)) + ")";
  const auto apply = [&](const RotaryEmbedding<T>& embedding, GuardedOutput<T>& out) {
    out.ref() = x;
    if (c.rope.explicit_positions)
      embedding.apply(out.ref(), position_ids);
    else
      embedding.apply(out.ref(), c.position);
    out.check_guards(what);
  };
  GuardedOutput<T> cached_out(rows, cols), uncached_out(rows, cols);
  expect(invalid, what, [&] { apply(*rope, cached_out); });
  if (invalid) return;
  apply(*uncached, uncached_out);
  if (!same_bits(cached_out.value(), uncached_out.value())) fail(what + ": cached and uncached positions differ");
  const Matrix<T> got = cached_out.value();
  const RopeSpec spec = rope_spec(c.rope, head_dim, c.base);
  check_approx(what, rotate_of<T>(exact_of(x), spec, positions), got);
  for (Index r = 0; r < rows; ++r)
    for (Index h = 0; h < heads; ++h)
      for (Index j = spec.rotary_dim; j < head_dim; ++j) {
        const T a = got(r, h * head_dim + j), b = x(r, h * head_dim + j);
        if (std::memcmp(&a, &b, sizeof a) != 0)
          fail(what + ": feature " + std::to_string(j) + " past rotary_dim " + std::to_string(spec.rotary_dim) +
               " changed");
      }
}

// ---------------------------------------------------------------------------------------------
// Sinusoidal encoding

template <class T>
void run_sinusoidal(const Config& c, ValueSource<T>& src) {
  const Index rows = c.lq, width = c.dk;
  const Matrix<T> x = src.matrix(rows, width);
  // Any offset is valid: positions are summed in double, past INT64_MAX without overflow.
  const bool base_invalid = !(std::isfinite(c.base) && c.base > 0);
  const std::string what = "add_sinusoidal_encoding (offset " + std::to_string(c.position) + ")";
  GuardedOutput<T> out(rows, width);
  out.ref() = x;
  expect(base_invalid, what, [&] {
    add_sinusoidal_encoding<T>(out.ref(), c.position, c.base);
    out.check_guards(what);
    check_approx(what, sinusoidal_of<T>(exact_of(x), c.position, Real(c.base)), out.value());
  });
  const Index length = c.perturb == Perturb::ValueRows ? -1 : rows, cols = c.perturb == Perturb::KeyDim ? -1 : width;
  expect(base_invalid || length < 0 || cols < 0, "sinusoidal_encoding", [&] {
    const Matrix<T> table = sinusoidal_encoding<T>(length, cols, c.position, c.base);
    check_approx("sinusoidal_encoding",
                 sinusoidal_of<T>(exact_of(Matrix<T>(Matrix<T>::Zero(rows, width))), c.position, Real(c.base)), table);
  });
}

// ---------------------------------------------------------------------------------------------
// Multi-head attention with projections

/// The exact weights of a problem (row model p_j) and their bound, as check_problem's.
template <class T>
Approx weights_of(const Problem& pr) {
  const Index lq = pr.score.rows(), lk = pr.score.cols();
  Approx w{RealMatrix::Zero(lq, lk), RealMatrix::Constant(lq, lk, unchecked()), true};
  const Real e = eps<T>(), tiny = Real(std::numeric_limits<T>::min());
  for (Index i = 0; i < lq; ++i) {
    if (pr.zero[i] && !pr.nan[i]) w.error.row(i).setZero();
    if (!pr.exact[i]) continue;
    const RowModel rm = row_model<T>(pr, i);
    if (!rm.any) w.error.row(i).setZero();
    if (!rm.any || !rm.bounded) continue;
    for (Index j = 0; j < lk; ++j) {
      w.value(i, j) = rm.p[std::size_t(j)];
      w.error(i, j) = 2 * (rm.p_err[std::size_t(j)] + (Real(rm.n) + 16) * e * rm.p[std::size_t(j)] + 4 * tiny);
    }
  }
  return w;
}

template <class T>
void run_multi_head(const Config& c, ValueSource<T>& src) {
  const Heads hc = heads_of(c);
  const Index h = hc.heads, kv = hc.kv_heads, d = c.dk / 4, dv = c.dv / 4;
  const Index e_q = c.d2, e_k = c.e_k, e_v = c.e_v, e_out = c.e_out;
  const auto bias = [&](int bit, Index size) {
    return (c.biases >> bit) & 1 ? Vector<T>(src.matrix(size, 1)) : Vector<T>();
  };
  MultiHeadWeights<T> w;
  w.q_proj_weight = src.matrix(h * d, e_q);
  w.k_proj_weight = src.matrix(kv * d, e_k);
  w.v_proj_weight = src.matrix(kv * dv, e_v);
  w.out_proj_weight = src.matrix(e_out, h * dv);
  w.q_proj_bias = bias(0, h * d);
  w.k_proj_bias = bias(1, kv * d);
  w.v_proj_bias = bias(2, kv * dv);
  const bool bad_bias = c.perturb == Perturb::OutShape;
  w.out_proj_bias = bad_bias ? Vector<T>(src.matrix(e_out + 1, 1)) : bias(3, e_out);
  const Matrix<T> query = src.matrix(c.lq, e_q), key = src.matrix(c.lk, e_k + (c.perturb == Perturb::KeyDim ? 1 : 0)),
                  value = src.matrix(c.lk + (c.perturb == Perturb::ValueRows ? 1 : 0), e_v, true);
  const MaskData<T> mask = make_mask(c, src, c.lq, c.lk);

  std::optional<MultiHeadAttention<T>> layer;
  expect(d == 0 || dv == 0 || bad_bias, "MultiHeadAttention", [&] { layer.emplace(h, w, hc.kv_argument); });
  if (!layer) return;
  bool rotated = false;
  if (c.rope.layout >= 0) {
    const double base = 10000;
    const Index rope_dim = d + (c.perturb == Perturb::LseSize ? 2 : 0);
    std::optional<RotaryEmbedding<T>> rope;
    expect(rope_invalid(c.rope, rope_dim, base), "RotaryEmbedding",
           [&] { rope.emplace(rope_dim, rope_options(c.rope, base)); });
    if (rope) expect(rope_dim != d, "MultiHeadAttention::set_rotary", [&] { layer->set_rotary(*rope); });
    rotated = rope && rope_dim == d;
  }

  const bool invalid = c.perturb == Perturb::KeyDim || c.perturb == Perturb::ValueRows || mask.invalid ||
                       block_invalid(c) || scale_invalid<T>(c);
  // The exact layer, head by head.
  Approx heads{RealMatrix::Zero(c.lq, h * dv), RealMatrix::Zero(c.lq, h * dv), true};
  std::vector<Approx> weights;
  Approx out;
  if (!invalid) {
    Approx q = linear_of(exact_of(query), w.q_proj_weight, w.q_proj_bias),
           k = linear_of(exact_of(key), w.k_proj_weight, w.k_proj_bias),
           v = linear_of(exact_of(value), w.v_proj_weight, w.v_proj_bias);
    if (rotated) {
      const RopeSpec spec = rope_spec(c.rope, d, 10000);
      std::vector<Index> q_pos(static_cast<std::size_t>(c.lq)), k_pos(static_cast<std::size_t>(c.lk));
      for (Index i = 0; i < c.lq; ++i) q_pos[std::size_t(i)] = i;
      for (Index j = 0; j < c.lk; ++j) k_pos[std::size_t(j)] = j;
      q = rotate_of<T>(q, spec, q_pos);
      k = rotate_of<T>(k, spec, k_pos);
    }
    const auto cols = [](const Approx& a, Index first, Index n) {  // block_of: no block of an empty matrix
      return Approx{block_of(a.value, 0, first, a.value.rows(), n), block_of(a.error, 0, first, a.error.rows(), n),
                    a.finite};
    };
    heads.finite = q.finite && k.finite && v.finite;
    for (Index head = 0; head < h; ++head) {
      const Index g = head / (h / kv);
      const Approx qh = cols(q, head * d, d), kh = cols(k, g * d, d), vh = cols(v, g * dv, dv);
      const Problem p = make_problem<T>(dot_scores_of<T>(qh, kh, default_scale<T>(c, d)), mask.structural,
                                        has_bias(mask.kind) ? &mask.bias : nullptr, v.finite, qh.value, kh.value);
      const Approx o = attention_of<T>(p, vh);
      if (c.lq != 0) {
        heads.value.middleCols(head * dv, dv) = o.value;
        heads.error.middleCols(head * dv, dv) = o.error;
      }
      weights.push_back(weights_of<T>(p));
    }
    out = linear_of(heads, w.out_proj_weight, w.out_proj_bias);
  }
  const auto check_weights = [&](const std::string& what, const MultiHeadResult<T>& r, NeedWeights need) {
    const std::size_t expected = need == NeedWeights::None ? 0 : need == NeedWeights::PerHead ? std::size_t(h) : 1;
    if (r.weights.size() != expected) fail(what + ": " + std::to_string(r.weights.size()) + " weight matrices");
    if (need == NeedWeights::PerHead)
      for (std::size_t head = 0; head < expected; ++head)
        check_approx(what + " weights", weights[head], r.weights[head]);
    if (need == NeedWeights::Averaged && heads.finite) {
      Approx mean{RealMatrix::Zero(c.lq, c.lk), RealMatrix::Zero(c.lq, c.lk), true};
      for (const Approx& wh : weights) {
        mean.value += wh.value / Real(h);
        mean.error += wh.error / Real(h);
      }
      mean.error.array() += (Real(h) + 2) * eps<T>() * mean.value.array();
      check_approx(what + " averaged weights", mean, r.weights[0]);
    }
  };
  // Plain inputs only (the layer reads them once, through its projections): strided ones would
  // double the build's instantiations of the layer.
  with_mask(mask, [&](const auto& m) {
    for (Algorithm algorithm : kAlgorithms) {
      MultiHeadOptions o;
      static_cast<AttentionOptions&>(o) = options_of(c, algorithm);
      o.need_weights = NeedWeights(c.need_weights);
      const std::string what =
          std::string("MultiHeadAttention::forward (") + name_of(algorithm) + (rotated ? ", rotary" : "") + ")";
      expect(invalid, what, [&] {
        const MultiHeadResult<T> r = thread_invariant(c, what, [&] { return layer->forward(query, key, value, m, o); });
        if (heads.finite) check_approx(what, out, r.output);
        check_weights(what, r, o.need_weights);
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Split-KV: the decode split and the public log-sum-exp merge

/// infer_head_layout's rule: d = q_cols / H, H_kv = k_cols / d, d_v = v_cols / H_kv.
inline bool head_layout_valid(Index q_cols, Index k_cols, Index v_cols, Index heads) {
  if (heads < 1 || q_cols <= 0 || q_cols % heads != 0) return false;
  const Index d = q_cols / heads;
  if (k_cols <= 0 || k_cols % d != 0) return false;
  const Index kv = k_cols / d;
  return heads % kv == 0 && v_cols % kv == 0;
}

template <class T>
void run_decode_split(const Config& c, ValueSource<T>& src) {
  const Heads hc = heads_of(c);
  const Index h = hc.heads, lk = c.lk * (1 + c.d2 / 2);
  const Index value_dim = c.dv;
  const Matrix<T> q = src.matrix(1, h * c.dk),
                  k = src.matrix(lk, hc.kv_heads * c.dk + (c.perturb == Perturb::KeyDim ? 1 : 0)),
                  v = src.matrix(lk + (c.perturb == Perturb::ValueRows ? 1 : 0), hc.kv_heads * value_dim, true);
  const bool layout_ok = head_layout_valid(q.cols(), k.cols(), v.cols(), h);
  const bool bad_out = c.perturb == Perturb::OutShape, bad_lse = c.perturb == Perturb::LseSize;
  const bool invalid = !layout_ok || k.rows() != v.rows() || c.block_k < 0 || scale_invalid<T>(c) || bad_out || bad_lse;
  const Index d = layout_ok ? q.cols() / h : 0, kv = layout_ok ? k.cols() / d : 1, dv = layout_ok ? v.cols() / kv : 0;
  const Index lse_size = bad_lse ? h + 1 : c.dense_column_major ? h : 0;
  const std::string what = "decode_attention_into (H=" + std::to_string(h) + ", Lk=" + std::to_string(lk) +
                           ", block_k=" + std::to_string(c.block_k) + ")";
  with_layout<T>(c.layout, q, k, v, [&](const auto& qq, const auto& kk, const auto& vv) {
    expect(invalid, what, [&] {
      GuardedOutput<T> out(1 + (bad_out ? 1 : 0), h * dv);
      Vector<T> lse = Vector<T>::Constant(lse_size, std::numeric_limits<T>::quiet_NaN());
      const Matrix<T> result = thread_invariant(c, what, [&] {
        decode_attention_into(qq, kk, vv, h, out.ref(), options_of(c, Algorithm::Auto), VectorRef<T>(lse));
        Matrix<T> both(1, h * dv + lse_size);  // the output, then the lse
        both.leftCols(h * dv) = out.value();
        both.rightCols(lse_size) = lse.transpose();
        return both;
      });
      out.check_guards(what);
      const BoolMatrix visible = BoolMatrix::Constant(1, lk, true);
      for (Index head = 0; head < h; ++head) {
        const Index g = head / (h / kv);
        const Matrix<T> qh = block_of(q, 0, head * d, 1, d), kh = block_of(k, 0, g * d, lk, d),
                        vh = block_of(v, 0, g * dv, lk, dv);
        const Problem p =
            make_problem<T>(dot_scores<T>(qh, kh, default_scale<T>(c, d)), visible, nullptr, all_finite(vh), qh, kh);
        check_problem<T>(what + " head " + std::to_string(head), p, vh, block_of(result, 0, head * dv, 1, dv),
                         lse_size != 0 ? lse.data() + head : nullptr);
      }
    });
  });
}

/// Attention over chunks of the keys (each through scaled_dot_product_attention_with_lse with
/// the chunk's columns of the mask), merged by merge_partials (left to right) and by
/// merge_partial_into (right to left); both must match attention over all keys.
template <class T>
void run_merge(const Config& c, ValueSource<T>& src) {
  const Matrix<T> q = src.matrix(c.lq, c.dk), k = src.matrix(c.lk, c.dk), v = src.matrix(c.lk, c.dv, true);
  Config mc = c;
  mc.perturb = Perturb::None;
  const MaskData<T> mask = make_mask(mc, src, c.lq, c.lk);
  const bool with_bias = has_bias(mask.kind);
  std::vector<Index> starts, lengths;
  Index start = 0;
  for (std::size_t s = 0; s < c.chunks.size(); ++s) {
    const Index n = s + 1 == c.chunks.size() ? c.lk - start : std::min(c.chunks[s], c.lk - start);
    starts.push_back(start);
    lengths.push_back(n);
    start += n;
  }
  const bool invalid = c.dk == 0 || block_invalid(c) || scale_invalid<T>(c);
  std::vector<AttentionResult<T>> partials;
  for (std::size_t s = 0; s < starts.size(); ++s) {
    const Index s0 = starts[s], n = lengths[s];
    const Matrix<T> kc = block_of(k, s0, 0, n, c.dk), vc = block_of(v, s0, 0, n, c.dv);
    const BoolMatrix visible = block_of(mask.structural, 0, s0, c.lq, n);
    const Matrix<T> bias = with_bias ? block_of(mask.bias, 0, s0, c.lq, n) : Matrix<T>();
    const AttentionOptions o = options_of(c, s % 2 ? Algorithm::Blocked : Algorithm::Materialized);
    const std::string what = "scaled_dot_product_attention_with_lse of chunk " + std::to_string(s);
    expect(invalid, what, [&] {
      if (with_bias)
        partials.push_back(
            scaled_dot_product_attention_with_lse(q, kc, vc, BooleanMask(visible) & AdditiveMask(bias), o));
      else
        partials.push_back(scaled_dot_product_attention_with_lse(q, kc, vc, BooleanMask(visible), o));
    });
    if (invalid) return;
  }
  // The problem over all keys; each chunk's lse error shifts its keys' scores in the merge.
  Problem pr = make_problem<T>(dot_scores<T>(q, k, default_scale<T>(c, c.dk)), mask.structural,
                               with_bias ? &mask.bias : nullptr, all_finite(v), q, k);
  const Real e = eps<T>();
  for (Index i = 0; i < c.lq; ++i) {
    if (!pr.exact[std::size_t(i)]) continue;
    Real extra = 0;
    for (std::size_t s = 0; s < starts.size(); ++s) {
      Problem chunk{
          pr.score.block(i, starts[s], 1, lengths[s]), pr.error.block(i, starts[s], 1, lengths[s]), {1}, {0}, {0}};
      const RowModel rm = row_model<T>(chunk, 0);
      if (!rm.any) continue;
      if (!rm.bounded) pr.exact[std::size_t(i)] = 0;
      extra += 2 * (-std::log1p(-rm.d_d) + (Real(rm.n) + 16) * e + 2 * e * (std::fabs(rm.m) + std::fabs(rm.lse))) +
               8 * e * (std::fabs(rm.lse) + 1);
    }
    for (Index j = 0; j < c.lk; ++j) pr.error(i, j) += extra;
  }
  const std::string merged_what = "merge_partials of " + std::to_string(partials.size()) + " chunks";
  const AttentionResult<T> merged = merge_partials(partials);
  check_problem<T>(merged_what, pr, v, merged.output, merged.lse.data());
  AttentionResult<T> folded = partials.back();
  for (std::size_t s = partials.size() - 1; s-- > 0;)
    merge_partial_into<T>(folded.output, folded.lse, partials[s].output, partials[s].lse);
  check_problem<T>("merge_partial_into, right to left", pr, v, folded.output, folded.lse.data());
  // Invalid merges.
  const Matrix<T> taller = Matrix<T>::Zero(c.lq + 1, c.dv);
  const Vector<T> longer = Vector<T>::Zero(c.lq + 1);
  AttentionResult<T> target = partials[0];
  switch (c.perturb) {
    case Perturb::OutShape:
      expect(true, "merge_partial_into (taller partial)",
             [&] { merge_partial_into<T>(target.output, target.lse, taller, target.lse); });
      break;
    case Perturb::LseSize:
      expect(true, "merge_partial_into (longer lse)",
             [&] { merge_partial_into<T>(target.output, target.lse, target.output, longer); });
      break;
    case Perturb::KeyDim:  // (empty views share no memory)
      if (target.output.size() != 0)
        expect(true, "merge_partial_into (aliasing)",
               [&] { merge_partial_into<T>(target.output, target.lse, target.output, partials[0].lse); });
      break;
    case Perturb::ValueRows:
      expect(true, "merge_partials (none)", [&] { merge_partials(std::vector<AttentionResult<T>>{}); });
      break;
    default: break;
  }
}

template <class T>
void run(const Config& c, FuzzedDataProvider& in) {
  ValueSource<T> src(in, c.values, c.exponent);
  set_threads(c.threads, c.eigen_threads);
  switch (c.entry) {
    case Entry::Batched: return run_batched<T>(c, src);
    case Entry::Decode: return c.paged ? run_paged<T>(c, src) : run_decode<T>(c, src);
    case Entry::MultiHead: return run_multi_head<T>(c, src);
    case Entry::Merge: return run_merge<T>(c, src);
    case Entry::DecodeSplit: return run_decode_split<T>(c, src);
    case Entry::Rotary: return run_rotary<T>(c, src);
    case Entry::Sinusoidal: return run_sinusoidal<T>(c, src);
    default: return run_single_head<T>(c, src);
  }
}

}  // namespace attend::fuzz

