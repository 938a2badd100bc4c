// SPDX-License-Identifier: MIT
// How the fuzzer turns its input into a problem: a configuration drawn from the end of the input
// (FuzzedDataProvider's integers), then the matrices' values from the front, so that mutating
// either half changes one thing at a time. Values come raw (any bit pattern: NaN, Inf,
// denormals), as small exact numbers, as small numbers with rare special values, or as small
// numbers times a power of two; once the input runs out, a fixed pattern fills the rest.
#pragma once

#include <attend/attend.hpp>

#include <fuzzer/FuzzedDataProvider.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

namespace attend::fuzz {

/// The public entry point a run exercises.
enum class Entry {
  Sdpa,
  Dot,
  Bilinear,
  Cosine,
  SoftCap,
  TopK,
  LocalWindow,
  Additive,
  Batched,
  Decode,       // decode_step over a KVCache, or (paged) paged_attention_into over a PagedKVCache
  MultiHead,    // MultiHeadAttention::forward with projections, GQA, rotary, weights; decode_step(layer)
  Merge,        // merge_partial_into / merge_partials of split-KV partials
  DecodeSplit,  // decode_attention_into: one query row, keys in splits of block_k
  Rotary,       // RotaryEmbedding::apply with every layout and scaling
  Sinusoidal,   // add_sinusoidal_encoding, sinusoidal_encoding
  kCount
};

enum class MaskKind {
  None, Causal, Window, KeyPadding, Boolean, Additive,
  WindowAndBoolean, CausalAndAdditive, PaddingAndWindow, BooleanAndAdditive, kCount
};

/// A deliberate shape error; each must make the call throw.
enum class Perturb { None, KeyDim, ValueRows, MaskShape, OutShape, LseSize, kCount };

/// How Q, K and V are stored: a plain matrix, a block of a NaN-filled larger buffer, a
/// column-major map, or a map whose data starts one element past an aligned address.
enum class Layout { Contiguous, NanPadded, ColumnMajor, Unaligned, kCount };

enum class ValueMode { Raw, Small, SmallWithSpecials, Scaled, kCount };

/// A rotary embedding's configuration; `layout` -1 = none.
struct Rope {
  int layout = -1;       // RotaryLayout, or -1 for no rotary embedding
  Index rotary_dim = 0;  // 0: head_dim (unset); may be odd or too large (invalid)
  int scaling = 0;       // RotaryScalingType
  double factor = 1;     // scaling factor (may be < 1 or non-finite: invalid)
  Index original_max_position = 8192;
  double beta_fast = 32, beta_slow = 1, low_freq_factor = 1, high_freq_factor = 4;
  Index cache_length = 0;           // may be negative (invalid)
  bool explicit_positions = false;  // Rotary: apply(x, positions) instead of a start position
};

struct Config {
  bool use_double = false;
  Entry entry = Entry::Sdpa;
  Index lq = 0, lk = 0, dk = 0, dv = 0, d2 = 0;  // d2: bilinear key width, additive hidden size
  MaskKind mask = MaskKind::None;
  Alignment alignment = Alignment::TopLeft;
  Index left = -1, right = -1, valid = 0;  // window sides, key padding length
  Window local_window;                      // local_window_attention's own window
  int bool_density = 128;                   // P(visible) = density / 256
  bool dense_column_major = false;          // storage of the boolean / additive mask
  std::optional<double> scale;
  Index block_q = 0, block_k = 0;
  Layout layout = Layout::Contiguous;
  ValueMode values = ValueMode::Small;
  int exponent = 0;  // ValueMode::Scaled multiplies by 2^exponent
  Perturb perturb = Perturb::None;
  double param = 1;  // cosine temperature or soft cap
  Index top_k = 1;
  Index heads = 1, batch = 1;  // batched layout; decode: kv heads and query heads per kv head
  std::vector<Index> chunks;   // decode: tokens appended per step; merge: key chunk lengths
  int threads = 1;             // OpenMP threads of the run (results must not depend on it)
  int eigen_threads = 1;       // Eigen::setNbThreads of the run
  Rope rope;                   // rotary embedding (MultiHead, Rotary)
  Index position = 0;          // Rotary start_position, Sinusoidal position_offset
  double base = 10000;         // Rotary and Sinusoidal base
  int need_weights = 0;        // MultiHead: NeedWeights
  Index e_k = 0, e_v = 0, e_out = 0;  // MultiHead: key, value and output widths
  int biases = 0;                     // MultiHead: bit b set = projection b (q, k, v, out) has a bias
  bool paged = false;                 // Decode: a PagedKVCache with a forked sequence (run_paged)
};

template <class E>
E draw_enum(FuzzedDataProvider& in) {
  return E(in.ConsumeIntegralInRange<int>(0, int(E::kCount) - 1));
}

/// A parameter that must be positive and finite, sometimes not.
inline double draw_positive(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: return 0.0;
    case 1: return -1.0;
    case 2: return std::numeric_limits<double>::infinity();
    case 3: return std::numeric_limits<double>::quiet_NaN();
    default: return std::ldexp(1.0 + in.ConsumeIntegral<std::uint8_t>() / 64.0, in.ConsumeIntegralInRange<int>(-6, 6));
  }
}

inline Index draw_block(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: return 0;  // default
    case 1: return -in.ConsumeIntegralInRange<Index>(1, 3);  // invalid
    default: return in.ConsumeIntegralInRange<Index>(1, 80);
  }
}

inline Config draw_config(FuzzedDataProvider& in) {
  Config c;
  c.use_double = in.ConsumeBool();
  c.entry = draw_enum<Entry>(in);
  c.lq = in.ConsumeIntegralInRange<Index>(0, 64);
  c.lk = in.ConsumeIntegralInRange<Index>(0, 64);
  c.dk = in.ConsumeIntegralInRange<Index>(0, 64);
  c.dv = in.ConsumeIntegralInRange<Index>(0, 64);
  c.d2 = in.ConsumeIntegralInRange<Index>(0, 16);
  c.mask = draw_enum<MaskKind>(in);
  c.alignment = in.ConsumeBool() ? Alignment::BottomRight : Alignment::TopLeft;
  c.left = in.ConsumeIntegralInRange<Index>(-2, 70);
  c.right = in.ConsumeIntegralInRange<Index>(-2, 70);
  c.valid = in.ConsumeIntegralInRange<Index>(-1, 66);
  c.local_window = Window(in.ConsumeIntegralInRange<Index>(-2, 70), in.ConsumeIntegralInRange<Index>(-2, 70),
                          in.ConsumeBool() ? Alignment::BottomRight : Alignment::TopLeft);
  c.bool_density = in.ConsumeIntegral<std::uint8_t>();
  c.dense_column_major = in.ConsumeBool();
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: case 1: case 2: break;  // default 1/sqrt(d_k)
    case 3: c.scale = 0.0; break;
    case 4: c.scale = -1.0 / std::sqrt(double(std::max<Index>(c.dk, 1))); break;
    case 5: c.scale = 1.0 / double(std::max<Index>(c.dk, 1)); break;
    case 6: c.scale = std::ldexp(1.0 + in.ConsumeIntegral<std::uint8_t>() / 64.0, in.ConsumeIntegralInRange<int>(-10, 6)); break;
    default: {  // any double, NaN and Inf included
      const std::uint64_t bits = in.ConsumeIntegral<std::uint64_t>();
      double s;
      std::memcpy(&s, &bits, sizeof s);
      c.scale = s;
    }
  }
  c.block_q = draw_block(in);
  c.block_k = draw_block(in);
  c.layout = draw_enum<Layout>(in);
  c.values = draw_enum<ValueMode>(in);
  c.exponent = in.ConsumeIntegralInRange<int>(-40, 40);
  const int perturb = in.ConsumeIntegralInRange<int>(0, 15);  // mostly none
  c.perturb = perturb < int(Perturb::kCount) ? Perturb(perturb) : Perturb::None;
  c.param = draw_positive(in);
  c.top_k = in.ConsumeIntegralInRange<Index>(-1, 70);
  c.heads = in.ConsumeIntegralInRange<Index>(0, 3);
  c.batch = in.ConsumeIntegralInRange<Index>(0, 3);
  if (c.entry == Entry::Decode) {
    const int steps = in.ConsumeIntegralInRange<int>(1, 8);
    for (int s = 0; s < steps; ++s) c.chunks.push_back(in.ConsumeIntegralInRange<Index>(0, 9));
  }
  // Fields added with the MultiHead .. Sinusoidal entries; seeds of the older entries end before
  // them and get the defaults (FuzzedDataProvider returns the minimum once the input runs out).
  c.threads = 1 + in.ConsumeIntegralInRange<int>(0, 3);
  c.eigen_threads = 1 + in.ConsumeIntegralInRange<int>(0, 1);
  if (c.entry == Entry::Merge) {
    const int chunks = in.ConsumeIntegralInRange<int>(1, 6);
    for (int s = 0; s < chunks; ++s) c.chunks.push_back(in.ConsumeIntegralInRange<Index>(0, 24));
  }
  if (c.entry == Entry::MultiHead || c.entry == Entry::Rotary) {
    Rope& r = c.rope;
    r.layout = in.ConsumeIntegralInRange<int>(-1, 1);
    r.rotary_dim = in.ConsumeIntegralInRange<Index>(0, 18);
    r.scaling = in.ConsumeIntegralInRange<int>(0, 4);
    switch (in.ConsumeIntegralInRange<int>(0, 7)) {
      case 0: r.factor = 0.5; break;  // invalid below 1
      case 1: r.factor = std::numeric_limits<double>::infinity(); break;
      case 2: r.factor = 1; break;
      default: r.factor = 1 + in.ConsumeIntegralInRange<int>(0, 255) / 8.0;
    }
    r.original_max_position = in.ConsumeIntegralInRange<Index>(-1, 64) * 64;
    r.beta_fast = in.ConsumeIntegralInRange<int>(-1, 64);
    r.beta_slow = in.ConsumeIntegralInRange<int>(0, 8) / 4.0;
    r.low_freq_factor = in.ConsumeIntegralInRange<int>(0, 8) / 2.0;
    r.high_freq_factor = in.ConsumeIntegralInRange<int>(0, 16) / 2.0;
    r.cache_length = in.ConsumeIntegralInRange<Index>(-1, 80);
    r.explicit_positions = in.ConsumeBool();
  }
  if (c.entry == Entry::Rotary || c.entry == Entry::Sinusoidal) {
    switch (in.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: c.position = in.ConsumeIntegralInRange<Index>(0, 100); break;
      case 1: c.position = -in.ConsumeIntegralInRange<Index>(0, 100); break;
      case 2: c.position = in.ConsumeIntegralInRange<Index>(0, 1 << 20) * 997; break;
      default: c.position = in.ConsumeIntegral<std::int64_t>(); break;  // INT64 extremes included
    }
    switch (in.ConsumeIntegralInRange<int>(0, 5)) {
      case 0: c.base = 0.5; break;  // valid for sinusoidal (> 0), invalid for rotary (<= 1)
      case 1: c.base = 1; break;
      case 2: c.base = std::numeric_limits<double>::quiet_NaN(); break;
      case 3: c.base = 500000; break;
      default: c.base = 10000; break;
    }
  }
  if (c.entry == Entry::MultiHead) {
    c.need_weights = in.ConsumeIntegralInRange<int>(0, 2);
    c.e_k = in.ConsumeIntegralInRange<Index>(0, 12);
    c.e_v = in.ConsumeIntegralInRange<Index>(0, 12);
    c.e_out = in.ConsumeIntegralInRange<Index>(0, 12);
    c.biases = in.ConsumeIntegralInRange<int>(0, 15);
  }
  // Added with the paged entry (seeds written before it read false here).
  if (c.entry == Entry::Decode) c.paged = in.ConsumeBool();
  return c;
}

/// One of 16 special values: non-finite, extreme, denormal, signed zero.
template <class T>
T special_value(unsigned which) {
  using L = std::numeric_limits<T>;
  const std::array<T, 16> values{L::quiet_NaN(), L::infinity(),  -L::infinity(), L::max(),
                                 L::lowest(),    L::min(),       L::denorm_min(), T(-0.0),
                                 T(1e4),         T(-1e4),        T(1e18),         T(-1e18),
                                 T(1) + L::epsilon(), T(88.5),   T(-745.5),       T(0.5)};
  return values[which % 16];
}

/// Values for the matrices, drawn from the front of the input.
template <class T>
class ValueSource {
 public:
  ValueSource(FuzzedDataProvider& in, ValueMode mode, int exponent) : in_(in), mode_(mode), exponent_(exponent) {}

  /// `clean`: no special values in SmallWithSpecials mode (used for V, so that NaN in Q or K
  /// leaves V finite and the NaN-propagation check applies).
  T next(bool clean = false) {
    if (in_.remaining_bytes() == 0) {  // a fixed pattern in [-1, 1]
      ++filled_;
      return T(filled_ * 7 % 17 - 8) / T(8);
    }
    switch (mode_) {
      case ValueMode::Raw: {
        unsigned char bytes[sizeof(T)] = {};
        in_.ConsumeData(bytes, sizeof(T));
        T x;
        std::memcpy(&x, bytes, sizeof(T));
        return x;
      }
      case ValueMode::Small: return T(signed_byte()) / T(16);
      case ValueMode::SmallWithSpecials: {
        const std::uint8_t b = byte();
        return b >= 0xF0 && !clean ? special_value<T>(b & 15u) : T(static_cast<std::int8_t>(b)) / T(16);
      }
      default: return std::ldexp(T(signed_byte()) / T(16), exponent_);
    }
  }

  /// An additive-mask entry: mostly small, sometimes -inf, lowest(), NaN, +inf or huge.
  T next_bias() {
    const std::uint8_t b = in_.remaining_bytes() == 0 ? std::uint8_t(++filled_ * 37) : byte();
    if (b < 0xE0) return T(static_cast<std::int8_t>(b)) / T(8);
    using L = std::numeric_limits<T>;
    const std::array<T, 8> specials{-L::infinity(), -L::infinity(), -L::infinity(), L::lowest(),
                                    L::quiet_NaN(), L::infinity(),  L::max(),       T(-1e30)};
    return specials[b & 7u];
  }

  bool next_bit(int density) {
    const std::uint8_t b = in_.remaining_bytes() == 0 ? std::uint8_t(++filled_ * 97) : byte();
    return b < density;
  }

  Matrix<T> matrix(Index rows, Index cols, bool clean = false) {
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = next(clean);
    return m;
  }

 private:
  std::uint8_t byte() {
    std::uint8_t b = 0;
    in_.ConsumeData(&b, 1);
    return b;
  }
  std::int8_t signed_byte() { return static_cast<std::int8_t>(byte()); }

  FuzzedDataProvider& in_;
  ValueMode mode_;
  int exponent_;
  Index filled_ = 0;
};

/// Strided read-only view: covers every non-contiguous layout with one type.
template <class T>
using StridedMap = Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

/// A matrix copied into a buffer with one of the layouts; the rest of the buffer is NaN.
template <class S>
class Placed {
 public:
  template <class M>
  Placed(const M& m, Layout layout) : rows_(m.rows()), cols_(m.cols()) {
    const Index n = rows_ * cols_;
    switch (layout) {
      case Layout::NanPadded:
        outer_ = cols_ + 3;
        offset_ = outer_ + 1;
        size_ = (rows_ + 2) * outer_ + 1;
        break;
      case Layout::ColumnMajor:
        outer_ = 1;
        inner_ = std::max<Index>(rows_, 1);
        size_ = n;
        break;
      case Layout::Unaligned:
        outer_ = cols_;
        offset_ = 1;
        size_ = n + 1;
        break;
      default:
        outer_ = cols_;
        size_ = n;
    }
    buffer_.reset(new S[std::size_t(size_ + 1)]);
    for (Index i = 0; i <= size_; ++i) buffer_[std::size_t(i)] = filler();
    for (Index i = 0; i < rows_; ++i)
      for (Index j = 0; j < cols_; ++j) buffer_[std::size_t(offset_ + i * outer_ + j * inner_)] = m(i, j);
  }

  Eigen::Map<const Matrix<S>, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>> view() const {
    return {buffer_.get() + offset_, rows_, cols_, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(outer_, inner_)};
  }

 private:
  static S filler() {
    if constexpr (std::is_same_v<S, bool>)
      return true;  // reading padding would make a hidden key visible
    else
      return std::numeric_limits<S>::quiet_NaN();
  }

  Index rows_, cols_, outer_ = 0, inner_ = 1, offset_ = 0, size_ = 0;
  std::unique_ptr<S[]> buffer_;
};

}  // namespace attend::fuzz
