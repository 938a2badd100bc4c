// SPDX-License-Identifier: MIT
/// \file positional/rotary.hpp
/// \brief Rotary position embedding (RoPE, Su et al. 2021): both layouts, partial rotary, explicit
/// positions or an offset, and the linear, NTK-aware, YaRN and Llama-3 frequency scalings.
///
/// A head vector x of width d has its first r features (r = rotary_dim, even, <= d) grouped in
/// r/2 pairs (a_i, b_i); pair i at position p turns by the angle p * theta_i:
///
///     a_i' = a_i cos(p theta_i) - b_i sin(p theta_i),
///     b_i' = b_i cos(p theta_i) + a_i sin(p theta_i),      theta_i = base^(-2i/r),
///
/// and features r..d-1 pass unchanged. Since R(m)^T R(n) = R(n - m), the score <R(m) q, R(n) k>
/// depends on the positions only through n - m. The layout says which features form pair i:
/// `HalfSplit` (a_i, b_i) = (x_i, x_{i+r/2}) (GPT-NeoX, HF transformers Llama `rotate_half`),
/// `Interleaved` (a_i, b_i) = (x_{2i}, x_{2i+1}) (GPT-J, Meta's original Llama, llama.cpp NORM).
/// `permute_rotary_weight` converts a projection's weights from one layout to the other.
///
/// Frequency scaling (`RotaryScaling`) changes theta_i only, following HF transformers'
/// `modeling_rope_utils.py` rope init functions (s = factor):
/// - Linear (position interpolation): theta_i / s, i.e. positions divided by s.
/// - NtkAware: base' = base * s^(r / (r - 2)) in place of base.
/// - Yarn: per pair, a ramp between theta_i (extrapolation, fast-turning pairs) and theta_i / s
///   (interpolation, slow pairs); see `RotaryScaling::yarn`. Also an attention factor
///   m = 0.1 ln(s) + 1 that multiplies cos and sin (as HF transformers and ggml do), so the
///   rotated features come out scaled by m and their logits by m^2, while features r..d-1 are
///   not scaled; see `RotaryEmbedding::attention_factor`.
/// - Llama3: by wavelength lambda_i = 2 pi / theta_i against the original context N:
///   lambda_i < N / high_freq_factor keeps theta_i, lambda_i > N / low_freq_factor uses theta_i / s,
///   and in between mixes (1 - g) theta_i / s + g theta_i with g = (N / lambda_i - low) / (high - low).
///
/// Angles p * theta_i and their cosines and sines (times m) are computed in double, then rounded
/// to T, so float results stay within a few roundings of the exact rotation at any practical
/// position.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../types.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

namespace attend {

/// Which features of a head form the rotated pairs.
enum class RotaryLayout {
  HalfSplit,   ///< pair i is (x_i, x_{i + r/2}): GPT-NeoX, HF transformers Llama.
  Interleaved  ///< pair i is (x_{2i}, x_{2i + 1}): GPT-J, Meta's Llama checkpoints.
};

/// Kinds of RoPE frequency scaling (context extension).
enum class RotaryScalingType {
  None,      ///< theta_i = base^(-2i/r).
  Linear,    ///< positions divided by `factor` (position interpolation).
  NtkAware,  ///< base scaled by factor^(r / (r - 2)).
  Yarn,      ///< YaRN: per-pair ramp between interpolation and extrapolation.
  Llama3     ///< Llama 3.1: wavelength-based smooth interpolation.
};

/// Frequency scaling of a RotaryEmbedding. Build it with the named constructors; the fields a
/// type does not use are ignored.
struct RotaryScaling {
  RotaryScalingType type = RotaryScalingType::None;
  double factor = 1.0;                     ///< context extension factor s >= 1 (every type but None)
  Index original_max_position = 8192;      ///< pretraining context N (Yarn, Llama3)
  double beta_fast = 32.0;                 ///< Yarn: pairs turning more than this over N extrapolate
  double beta_slow = 1.0;                  ///< Yarn: pairs turning less than this over N interpolate
  double low_freq_factor = 1.0;            ///< Llama3: wavelengths above N / low interpolate
  double high_freq_factor = 4.0;           ///< Llama3: wavelengths below N / high extrapolate
  std::optional<double> attention_factor;  ///< Yarn: m > 0; unset means 0.1 ln(factor) + 1

  /// No scaling.
  static RotaryScaling none() { return {}; }

  /// theta_i / factor: positions divided by `factor`.
  static RotaryScaling linear(double factor) {
    RotaryScaling s;
    s.type = RotaryScalingType::Linear;
    s.factor = factor;
    return s;
  }

  /// base * factor^(r / (r - 2)) in place of base (for r = 2 the single theta_0 = 1 is unchanged).
  static RotaryScaling ntk_aware(double factor) {
    RotaryScaling s = linear(factor);
    s.type = RotaryScalingType::NtkAware;
    return s;
  }

  /// YaRN (Peng et al. 2023) as in HF transformers `_compute_yarn_parameters`. With
  /// c(b) = r ln(N / (2 pi b)) / (2 ln base) the pair index that turns b times over N,
  /// lo = max(floor(c(beta_fast)), 0), hi = min(ceil(c(beta_slow)), r - 1) (hi += 0.001 if equal),
  /// ramp_i = clamp((i - lo) / (hi - lo), 0, 1), the frequency is
  ///     theta_i' = (theta_i / s) ramp_i + theta_i (1 - ramp_i),
  /// and cos and sin are multiplied by the attention factor m (HF's `attention_factor`; unset
  /// means 0.1 ln(s) + 1, eq. 22 of the paper).
  static RotaryScaling yarn(double factor, Index original_max_position, double beta_fast = 32.0, double beta_slow = 1.0,
                            std::optional<double> attention_factor = std::nullopt) {
    RotaryScaling s = linear(factor);
    s.type = RotaryScalingType::Yarn;
    s.original_max_position = original_max_position;
    s.beta_fast = beta_fast;
    s.beta_slow = beta_slow;
    s.attention_factor = attention_factor;
    return s;
  }

  /// Llama 3.1 as in HF transformers `_compute_llama3_parameters` (defaults of Llama 3.1).
  static RotaryScaling llama3(double factor = 8.0, Index original_max_position = 8192,
                              double low_freq_factor = 1.0, double high_freq_factor = 4.0) {
    RotaryScaling s = linear(factor);
    s.type = RotaryScalingType::Llama3;
    s.original_max_position = original_max_position;
    s.low_freq_factor = low_freq_factor;
    s.high_freq_factor = high_freq_factor;
    return s;
  }
};

/// Configuration of a RotaryEmbedding besides the head dimension.
struct RotaryOptions {
  /// Rotated features per head, even and <= head_dim; unset means head_dim (full rotary).
  std::optional<Index> rotary_dim;
  /// theta base (10000 for Llama 2 and GPT-NeoX, 500000 for Llama 3); must exceed 1.
  double base = 10000.0;
  /// Which features form the rotated pairs.
  RotaryLayout layout = RotaryLayout::HalfSplit;
  /// Frequency scaling.
  RotaryScaling scaling;
  /// cos/sin are precomputed for positions [0, cache_length); others are computed on the fly.
  Index cache_length = 4096;
};

namespace detail {

/// Feature offsets, within a head, of rotated pair i (of `pairs` = r/2) in each layout.
struct HalfSplitPairs {
  static Index first(Index i, Index) { return i; }
  static Index second(Index i, Index pairs) { return i + pairs; }
};
struct InterleavedPairs {
  static Index first(Index i, Index) { return 2 * i; }
  static Index second(Index i, Index) { return 2 * i + 1; }
};

/// Calls f(Pairs{}) with the pair policy of `layout`.
template <class F>
void with_pairs(RotaryLayout layout, F&& f) {
  if (layout == RotaryLayout::Interleaved)
    f(InterleavedPairs{});
  else
    f(HalfSplitPairs{});
}

/// r even with 2 <= r <= head_dim.
inline void check_rotary_dims(Index head_dim, Index rotary_dim) {
  ATTEND_CHECK(head_dim >= 1, "rotary head_dim must be at least 1, got " + std::to_string(head_dim));
  ATTEND_CHECK(rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
               "rotary_dim " + std::to_string(rotary_dim) + " must be even, at least 2 and at most head_dim " +
                   std::to_string(head_dim));
}

inline void check_rotary_scaling(const RotaryScaling& s) {
  if (s.type == RotaryScalingType::None) return;
  ATTEND_CHECK(std::isfinite(s.factor) && s.factor >= 1,
               "rotary scaling factor must be finite and >= 1, got " + detail::number_string(s.factor));
  if (s.type == RotaryScalingType::Yarn || s.type == RotaryScalingType::Llama3)
    ATTEND_CHECK(s.original_max_position >= 1, "rotary scaling original_max_position must be at least 1, got " +
                                                    std::to_string(s.original_max_position));
  if (s.type == RotaryScalingType::Yarn) {
    ATTEND_CHECK(s.beta_slow > 0 && s.beta_fast >= s.beta_slow && std::isfinite(s.beta_fast),
                 "YaRN needs finite beta_fast >= beta_slow > 0, got beta_fast " + detail::number_string(s.beta_fast) +
                     " and beta_slow " + detail::number_string(s.beta_slow));
    ATTEND_CHECK(
        !s.attention_factor || (std::isfinite(*s.attention_factor) && *s.attention_factor > 0),
        "YaRN attention_factor must be finite and positive, got " + number_string(s.attention_factor.value_or(0)));
  }
  if (s.type == RotaryScalingType::Llama3)
    ATTEND_CHECK(s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor && std::isfinite(s.high_freq_factor),
                 "Llama-3 scaling needs finite high_freq_factor > low_freq_factor > 0, got low_freq_factor " +
                     detail::number_string(s.low_freq_factor) + " and high_freq_factor " +
                     detail::number_string(s.high_freq_factor));
}

/// YaRN: theta_i' = (theta_i / s) ramp_i + theta_i (1 - ramp_i), see RotaryScaling::yarn.
inline Vector<double> yarn_frequencies(const Vector<double>& theta, Index rotary_dim, double base,
                                       const RotaryScaling& s) {
  constexpr double kTwoPi = 6.283185307179586476925;
  const double r = static_cast<double>(rotary_dim);
  const auto correction_dim = [&](double rotations) {
    return r * std::log(static_cast<double>(s.original_max_position) / (rotations * kTwoPi)) / (2 * std::log(base));
  };
  const double lo = std::max(std::floor(correction_dim(s.beta_fast)), 0.0);
  double hi = std::min(std::ceil(correction_dim(s.beta_slow)), r - 1);
  if (lo == hi) hi += 0.001;
  Vector<double> scaled(theta.size());
  for (Index i = 0; i < theta.size(); ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - lo) / (hi - lo), 0.0, 1.0);
    scaled(i) = theta(i) / s.factor * ramp + theta(i) * (1 - ramp);
  }
  return scaled;
}

/// Llama 3.1: by wavelength 2 pi / theta_i, keep, divide by s, or mix; see the file comment.
inline Vector<double> llama3_frequencies(const Vector<double>& theta, const RotaryScaling& s) {
  constexpr double kTwoPi = 6.283185307179586476925;
  const double context = static_cast<double>(s.original_max_position);
  const double low_freq_wavelength = context / s.low_freq_factor;
  const double high_freq_wavelength = context / s.high_freq_factor;
  Vector<double> scaled(theta.size());
  for (Index i = 0; i < theta.size(); ++i) {
    const double wavelength = kTwoPi / theta(i);
    if (wavelength < high_freq_wavelength) {
      scaled(i) = theta(i);
    } else if (wavelength > low_freq_wavelength) {
      scaled(i) = theta(i) / s.factor;
    } else {
      const double g = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      scaled(i) = (1 - g) * theta(i) / s.factor + g * theta(i);
    }
  }
  return scaled;
}

/// theta_i for i in [0, r/2) after the scaling.
inline Vector<double> rotary_frequencies(Index rotary_dim, double base, const RotaryScaling& s) {
  const double r = static_cast<double>(rotary_dim);
  const double ntk_base =
      s.type == RotaryScalingType::NtkAware && rotary_dim > 2 ? base * std::pow(s.factor, r / (r - 2)) : base;
  Vector<double> theta(rotary_dim / 2);
  for (Index i = 0; i < theta.size(); ++i) theta(i) = 1.0 / std::pow(ntk_base, static_cast<double>(2 * i) / r);
  switch (s.type) {
    case RotaryScalingType::Linear:
      return theta / s.factor;
    case RotaryScalingType::Yarn:
      return yarn_frequencies(theta, rotary_dim, base, s);
    case RotaryScalingType::Llama3:
      return llama3_frequencies(theta, s);
    default:
      return theta;
  }
}

/// The attention factor m that multiplies cos and sin: YaRN's, else 1.
inline double rotary_attention_factor(const RotaryScaling& s) {
  if (s.type != RotaryScalingType::Yarn) return 1.0;
  return s.attention_factor.value_or(0.1 * std::log(s.factor) + 1);
}

/// m cos(p theta_i) and m sin(p theta_i), angle and product in double, rounded to T.
template <class T>
void rotary_cos_sin(Index position, const Vector<double>& theta, double attention_factor, T* cos, T* sin) {
  for (Index i = 0; i < theta.size(); ++i) {
    const double angle = static_cast<double>(position) * theta(i);
    cos[i] = static_cast<T>(attention_factor * std::cos(angle));
    sin[i] = static_cast<T>(attention_factor * std::sin(angle));
  }
}

/// Rotates the `pairs` pairs of one head in place: (a, b) <- (a cos - b sin, b cos + a sin), with
/// cos and sin already multiplied by the attention factor.
template <class Pairs, class T>
void rotate_head(T* x, const T* cos, const T* sin, Index pairs) {
  for (Index i = 0; i < pairs; ++i) {
    const T a = x[Pairs::first(i, pairs)];
    const T b = x[Pairs::second(i, pairs)];
    x[Pairs::first(i, pairs)] = a * cos[i] - b * sin[i];
    x[Pairs::second(i, pairs)] = b * cos[i] + a * sin[i];
  }
}

/// The transpose of rotate_head: (a, b) <- (a cos + b sin, b cos - a sin), the rotation by -angle
/// (scaled by the same attention factor). What the gradient of a rotated vector needs.
template <class Pairs, class T>
void rotate_head_transpose(T* x, const T* cos, const T* sin, Index pairs) {
  for (Index i = 0; i < pairs; ++i) {
    const T a = x[Pairs::first(i, pairs)];
    const T b = x[Pairs::second(i, pairs)];
    x[Pairs::first(i, pairs)] = a * cos[i] + b * sin[i];
    x[Pairs::second(i, pairs)] = b * cos[i] - a * sin[i];
  }
}

}  // namespace detail

/// Rotary position embedding for one configuration, applied in place to (L, H * head_dim)
/// matrices whose heads are column blocks (any number H of heads, so queries and GQA keys share
/// one instance). Llama 3.1 8B, for example:
///
///     attend::RotaryOptions options;
///     options.base = 500000;
///     options.scaling = attend::RotaryScaling::llama3();  // factor 8, N = 8192, low 1, high 4
///     const attend::RotaryEmbedding<float> rope(128, options);
///     rope.apply(q, past_length);  // q (L, 32 * 128): rows at positions past_length, ...
///     rope.apply(k, past_length);  // k (L, 8 * 128): GQA keys, same positions
///
/// Thread safety: `apply` is const and reads only immutable state (the frequencies and the
/// cos/sin cache), so concurrent calls are safe. `extend_cache` mutates the cache and must not
/// run concurrently with anything else on the same instance. Results are bitwise the same for
/// cached and uncached positions and for any thread count.
template <class T>
class RotaryEmbedding {
 public:
  static_assert(detail::full_precision_scalars<T>);

  /// \throws invalid_argument for an odd rotary_dim, rotary_dim > head_dim, base <= 1, a negative
  ///         cache length, or bad scaling parameters (factor < 1, beta_fast < beta_slow, a YaRN
  ///         attention factor that is not positive and finite in T, ...).
  explicit RotaryEmbedding(Index head_dim, const RotaryOptions& options = {})
      : head_dim_(head_dim), rotary_dim_(options.rotary_dim.value_or(head_dim)), layout_(options.layout) {
    detail::check_rotary_dims(head_dim_, rotary_dim_);
    ATTEND_CHECK(std::isfinite(options.base) && options.base > 1,
                 "rotary base must be finite and greater than 1, got " + detail::number_string(options.base));
    ATTEND_CHECK(options.cache_length >= 0,
                 "rotary cache_length must be non-negative, got " + std::to_string(options.cache_length));
    detail::check_rotary_scaling(options.scaling);
    theta_ = detail::rotary_frequencies(rotary_dim_, options.base, options.scaling);
    attention_factor_ = detail::rotary_attention_factor(options.scaling);
    ATTEND_CHECK(attention_factor_ <= double(std::numeric_limits<T>::max()),
                 "YaRN attention_factor " + detail::number_string(attention_factor_) + " is not a finite " +
                     detail::scalar_name<T>());
    extend_cache(options.cache_length);
  }

  Index head_dim() const { return head_dim_; }
  Index rotary_dim() const { return rotary_dim_; }
  RotaryLayout layout() const { return layout_; }
  /// Positions [0, cache_length()) have precomputed cos/sin.
  Index cache_length() const { return cos_.rows(); }

  /// theta_i, i in [0, rotary_dim / 2): the angle of pair i per unit of position, after scaling.
  const Vector<double>& frequencies() const { return theta_; }

  /// YaRN's attention factor m (0.1 ln(s) + 1 unless given; 1 for every other scaling). `apply`
  /// multiplies cos and sin by it, as HF transformers and ggml do: the rotated features of q and
  /// k come out scaled by m, so their part of each logit by m^2, and features r..d-1 are not
  /// scaled. Leave the attention scale at its default 1 / sqrt(head_dim); MultiHeadAttention and
  /// decode_step need nothing more.
  double attention_factor() const { return attention_factor_; }

  /// Precomputes cos/sin for positions [0, length) (no-op if already cached). Not thread-safe.
  /// \throws invalid_argument when the tables cannot be allocated (the cache is then unchanged;
  ///         positions past the cache are computed on the fly, so a shorter cache serves).
  void extend_cache(Index length) {
    const Index old_length = cos_.rows();
    if (length <= old_length) return;
    const char* what = "rotary cos/sin cache (cache_length x rotary_dim / 2)";
    Matrix<T> cos_table = detail::allocate_array<T>(length, theta_.size(), what);  // (length, r/2)
    Matrix<T> sin_table = detail::allocate_array<T>(length, theta_.size(), what);
    if (old_length > 0) {  // (an empty cache is 0 x 0, not 0 x r/2)
      cos_table.topRows(old_length) = cos_;
      sin_table.topRows(old_length) = sin_;
    }
    for (Index p = old_length; p < length; ++p)
      detail::rotary_cos_sin(p, theta_, attention_factor_, &cos_table(p, 0), &sin_table(p, 0));
    cos_.swap(cos_table);
    sin_.swap(sin_table);
  }

  /// Rotates every head of `x` in place, row r at position start_position + r. In place by
  /// design: `x` is the only matrix read or written (each pair is read before it is written).
  /// \param x (L, H * head_dim), heads as column blocks; any block of a row-major matrix works.
  /// \throws invalid_argument when the last position start_position + L - 1 exceeds Index's range.
  void apply(MatrixRef<T> x, Index start_position = 0) const {
    const Index last_row = std::max<Index>(x.rows() - 1, 0);
    ATTEND_CHECK(start_position <= std::numeric_limits<Index>::max() - last_row,
                 "rotary start_position " + std::to_string(start_position) + " with " + std::to_string(x.rows()) +
                     " rows: the last position start_position + " + std::to_string(last_row) +
                     " exceeds the largest Index " + std::to_string(std::numeric_limits<Index>::max()));
    rotate_rows(x, [start_position](Index r) { return start_position + r; }, false);
  }

  /// Rotates bf16 or half rows in place: each row is rotated in T and rounded back once (the
  /// cos/sin tables stay in T).
  void apply(MatrixRef<Eigen::bfloat16> x, Index start_position = 0) const { apply_rounded(x, start_position); }
  void apply(MatrixRef<Eigen::half> x, Index start_position = 0) const { apply_rounded(x, start_position); }
  /// bf16 or half rows at explicit positions, rotated in T and rounded back once.
  void apply(MatrixRef<Eigen::bfloat16> x, const Eigen::Ref<const Vector<Index>>& positions) const {
    apply_rounded(x, positions);
  }
  void apply(MatrixRef<Eigen::half> x, const Eigen::Ref<const Vector<Index>>& positions) const {
    apply_rounded(x, positions);
  }

  /// Rotates every head of `x` in place, row r at position positions(r) (any integers).
  /// \param x         (L, H * head_dim), heads as column blocks.
  /// \param positions (L) position ids.
  void apply(MatrixRef<T> x, const Eigen::Ref<const Vector<Index>>& positions) const {
    ATTEND_CHECK(positions.size() == x.rows(), std::to_string(positions.size()) + " positions for x " +
                                                   detail::shape_of(x) + " with one token per row");
    rotate_rows(x, [&positions](Index r) { return positions(r); }, false);
  }

  /// Applies the transpose of `apply`'s map in place, row r at position start_position + r:
  /// each pair turns by -p theta_i, (a, b) <- m (a cos + b sin, b cos - a sin). This is the
  /// inverse of `apply` when the attention factor m is 1 (every scaling but YaRN), and in any
  /// case the backward of `apply`: if y = apply(x), then dL/dx = apply_transpose(dL/dy).
  /// \param x (L, H * head_dim), heads as column blocks.
  void apply_transpose(MatrixRef<T> x, Index start_position = 0) const {
    const Index last_row = std::max<Index>(x.rows() - 1, 0);
    ATTEND_CHECK(start_position <= std::numeric_limits<Index>::max() - last_row,
                 "rotary start_position " + std::to_string(start_position) + " with " + std::to_string(x.rows()) +
                     " rows: the last position start_position + " + std::to_string(last_row) +
                     " exceeds the largest Index " + std::to_string(std::numeric_limits<Index>::max()));
    rotate_rows(x, [start_position](Index r) { return start_position + r; }, true);
  }

  /// The transpose of `apply` with explicit positions: row r at position positions(r).
  void apply_transpose(MatrixRef<T> x, const Eigen::Ref<const Vector<Index>>& positions) const {
    ATTEND_CHECK(positions.size() == x.rows(), std::to_string(positions.size()) + " positions for x " +
                                                   detail::shape_of(x) + " with one token per row");
    rotate_rows(x, [&positions](Index r) { return positions(r); }, true);
  }

 private:
  template <class S, class Positions>
  void apply_rounded(MatrixRef<S> x, const Positions& positions) const {
    Matrix<T> full = x.template cast<T>();  // (L, H * head_dim)
    apply(full, positions);
    x = full.template cast<S>();
  }

  template <class PositionOf>
  void rotate_rows(MatrixRef<T>& x, PositionOf position_of, bool transpose) const {
    ATTEND_CHECK(x.cols() % head_dim_ == 0, "x " + detail::shape_of(x) + " has " + std::to_string(x.cols()) +
                                                " columns, not a multiple of head_dim " + std::to_string(head_dim_));
    if (x.rows() == 0 || x.cols() == 0) return;
    const Index heads = x.cols() / head_dim_;
    const Index pairs = theta_.size();
    detail::with_pairs(layout_, [&](auto pair_policy) {
      using Pairs = decltype(pair_policy);
      const auto make_scratch = [pairs] { return Matrix<T>(2, pairs); };  // cos; sin of an uncached position
      const auto rotate_row = [&](Index r, Matrix<T>& uncached) {
        const Index position = position_of(r);
        const T* cos = uncached.row(0).data();
        const T* sin = uncached.row(1).data();
        if (position >= 0 && position < cos_.rows()) {
          cos = cos_.row(position).data();
          sin = sin_.row(position).data();
        } else {
          detail::rotary_cos_sin(position, theta_, attention_factor_, uncached.row(0).data(), uncached.row(1).data());
        }
        T* row = x.row(r).data();
        for (Index h = 0; h < heads; ++h) {
          if (transpose)
            detail::rotate_head_transpose<Pairs>(row + h * head_dim_, cos, sin, pairs);
          else
            detail::rotate_head<Pairs>(row + h * head_dim_, cos, sin, pairs);
        }
      };
      if (x.size() >= kMinParallelElements) {
        detail::parallel_for_with_scratch(x.rows(), make_scratch, rotate_row);
      } else {  // a decode step or a small block: a parallel region would cost more than the work
        Matrix<T> uncached = make_scratch();
        for (Index r = 0; r < x.rows(); ++r) rotate_row(r, uncached);
      }
    });
  }

  static constexpr Index kMinParallelElements = Index(1) << 16;

  Index head_dim_;
  Index rotary_dim_;
  RotaryLayout layout_;
  Vector<double> theta_;  // (r/2)
  double attention_factor_ = 1.0;
  Matrix<T> cos_;  // (cache_length, r/2)
  Matrix<T> sin_;  // (cache_length, r/2)
};

/// Reorders the output rows of a query or key projection (PyTorch nn.Linear layout,
/// out_features x in_features, or a bias as out_features x 1) so that features laid out for
/// `from` come out laid out for `to`, head by head (head h is rows [h d, (h + 1) d)):
///
///     out(h d + to.first(i))  = in(h d + from.first(i)),
///     out(h d + to.second(i)) = in(h d + from.second(i)),   i in [0, r/2),
///
/// rows h d + j with j >= r unchanged. Interleaved -> HalfSplit is HF transformers' `permute`
/// for Meta Llama checkpoints (row (h, t, i) <- row (h, i, t), t in {0, 1}). With P this
/// permutation, to_rope(P W x) = P from_rope(W x); P is orthogonal and applied to both q and k,
/// so every score <R(m) q, R(n) k> is unchanged.
///
/// \param weight     (H * head_dim, in_features) weight or (H * head_dim, 1) bias.
/// \param rotary_dim rotated features per head; unset means head_dim.
template <class D>
Matrix<typename D::Scalar> permute_rotary_weight(const Eigen::MatrixBase<D>& weight, Index head_dim,
                                                 RotaryLayout from, RotaryLayout to,
                                                 std::optional<Index> rotary_dim = std::nullopt) {
  static_assert(detail::supported_scalars<D>);
  const Index r = rotary_dim.value_or(head_dim);
  detail::check_rotary_dims(head_dim, r);
  ATTEND_CHECK(weight.rows() % head_dim == 0, "weight " + detail::shape_of(weight) + " has " +
                                                  std::to_string(weight.rows()) +
                                                  " rows, not a multiple of head_dim " + std::to_string(head_dim));
  Matrix<typename D::Scalar> out = weight;
  const Index pairs = r / 2;
  detail::with_pairs(from, [&](auto from_pairs) {
    detail::with_pairs(to, [&](auto to_pairs) {
      using From = decltype(from_pairs);
      using To = decltype(to_pairs);
      for (Index head = 0; head < weight.rows(); head += head_dim)
        for (Index i = 0; i < pairs; ++i) {
          out.row(head + To::first(i, pairs)) = weight.row(head + From::first(i, pairs));
          out.row(head + To::second(i, pairs)) = weight.row(head + From::second(i, pairs));
        }
    });
  });
  return out;
}

}  // namespace attend
