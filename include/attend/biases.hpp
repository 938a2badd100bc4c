// SPDX-License-Identifier: MIT
/// \file biases.hpp
/// \brief Position-dependent score biases: ALiBi and T5 relative position buckets.
///
/// Both are mask policies (masks.hpp) that hide no key and add b_h(j - a_i) to score s_ij of
/// head h, where a_i is the key aligned with query i (a_i = i top-left, a_i = i + Lk - Lq
/// bottom-right). They compose with masks and with each other through `&`, work with every
/// score policy, and bind per head (one slope or table column per head):
///   scaled_dot_product_attention(q, k, v, Causal() & Alibi(slope));          // one head
///   multi_head_attention(q, k, v, H, Causal() & Alibi::for_heads(H));       // H heads
#pragma once

#include "detail/checks.hpp"
#include "masks.hpp"
#include "options.hpp"
#include "types.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace attend {
namespace detail {

/// Adds bias.at<T>(j - a_i) to s_ij, with a_i = i + offset; like a dense additive mask, it
/// hides a key only where its bias is -inf.
template <class Bias>
struct PositionBias {
  Index num_keys;
  Index offset;
  Bias bias;

  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }

  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r) {
      const Index d0 = k0 - (q0 + r + offset);  // relative position of the tile's first key
      for (Index c = 0; c < s.cols(); ++c) s(r, c) += bias.template at<T>(d0 + c);
    }
  }

  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r) {
      const Index d0 = k0 - (q0 + r + offset);
      for (Index c = 0; c < s.cols(); ++c)
        if (bias.template at<T>(d0 + c) == -std::numeric_limits<T>::infinity())
          s(r, c) = -std::numeric_limits<T>::infinity();
    }
  }
};

/// ALiBi line: b(d) = -slope * |d|.
struct AlibiLine {
  double slope;
  template <class T>
  T at(Index d) const {
    return -static_cast<T>(slope) * static_cast<T>(std::abs(d));
  }
};

/// Bucketed bias looked up from b(d) = values[d - d_min], precomputed for every d of a problem.
template <class T>
struct BucketBias {
  std::vector<T> values;
  Index d_min;
  template <class S>
  S at(Index d) const {
    static_assert(std::is_same_v<S, T>, "attend: the relative position table must have the scalar type of the scores");
    return values[static_cast<std::size_t>(d - d_min)];
  }
};

}  // namespace detail

/// The ALiBi slopes of `num_heads` heads (Press et al. 2022; as in the authors' code and
/// Hugging Face BLOOM): with n = 2^floor(log2 num_heads), head h < n gets 2^(-8 (h + 1) / n);
/// when num_heads is not a power of two, the remaining heads take the odd-numbered slopes
/// 2^(-4 (2 m + 1) / n), m = 0, 1, ..., of the 2n-head sequence.
inline std::vector<double> alibi_slopes(Index num_heads) {
  ATTEND_CHECK(num_heads >= 1, "ALiBi needs at least one head, got num_heads=" + std::to_string(num_heads));
  detail::check_array_size<double>(num_heads, 1, "ALiBi slopes (num_heads x 1)");
  Index n = 1;
  while (n <= num_heads / 2) n *= 2;  // 2 n <= num_heads, without forming 2 n
  std::vector<double> slopes;
  slopes.reserve(static_cast<std::size_t>(num_heads));
  for (Index h = 0; h < n; ++h) slopes.push_back(std::exp2(-8.0 * double(h + 1) / double(n)));
  for (Index m = 0; n + m < num_heads; ++m) slopes.push_back(std::exp2(-4.0 * double(2 * m + 1) / double(n)));
  return slopes;
}

/// ALiBi bias: s_ij += -m_h * |j - a_i| for head h, a_i the key aligned with query i. With a
/// causal mask this is the paper's -m_h (i - j); without one it is the symmetric form.
/// `Alibi(m)` is one head's slope, for single-head calls; `Alibi(slopes)` (or
/// `Alibi::for_heads(H)`, the standard slopes alibi_slopes(H)) gives head h of a multi-head call
/// the slope slopes[h]. One slope in a call of several heads is rejected: it would silently give
/// every head the same bias, which is almost surely a mistake.
/// Each slope must be finite as a float, the narrowest scalar: a mask holds no scalar type of its
/// own (binding it does not know the scores'), so one Alibi means the same for float and double,
/// and a slope that overflows float (1e39) is rejected rather than turning every score into NaN.
struct Alibi : MaskBase<Alibi> {
  std::vector<double> slopes;  ///< m_h, one per head (one for a single-head call)
  Alignment alignment = Alignment::TopLeft;

  explicit Alibi(double slope, Alignment alignment_ = Alignment::TopLeft) : slopes{slope}, alignment(alignment_) {}
  explicit Alibi(std::vector<double> slopes_, Alignment alignment_ = Alignment::TopLeft)
      : slopes(std::move(slopes_)), alignment(alignment_) {}

  /// The standard slopes of `num_heads` heads, alibi_slopes(num_heads).
  static Alibi for_heads(Index num_heads, Alignment alignment = Alignment::TopLeft) {
    return Alibi(alibi_slopes(num_heads), alignment);
  }

  detail::PositionBias<detail::AlibiLine> bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    const Index count = Index(slopes.size());
    ATTEND_CHECK(count != 1 || at.num_heads == 1,
                 "Alibi(slope) gives one slope to all " + std::to_string(at.num_heads) +
                     " heads of a multi-head call; pass one slope per head: Alibi(attend::alibi_slopes(" +
                     std::to_string(at.num_heads) + ")) or Alibi::for_heads(" + std::to_string(at.num_heads) + ")");
    ATTEND_CHECK(count == 1 || count == at.num_heads, "Alibi of " + std::to_string(count) + " slopes in a call of " +
                                                          std::to_string(at.num_heads) + " heads");
    const double slope = slopes[std::size_t(count == 1 ? 0 : at.head)];
    ATTEND_CHECK(std::abs(slope) <= std::numeric_limits<float>::max(),
                 "ALiBi slope " + detail::number_string(slope) + " must be finite as a float (|slope| <= " +
                     detail::number_string(std::numeric_limits<float>::max()) + ")");
    return {num_keys, detail::diagonal_offset(alignment, num_queries, num_keys), {slope}};
  }
  detail::PositionBias<detail::AlibiLine> bind(Index num_queries, Index num_keys) const {
    return bind(HeadIndex{}, num_queries, num_keys);
  }
};

/// T5's bucket of a relative position d = j - a_i (key minus query position), exactly as
/// Hugging Face `T5Attention._relative_position_bucket` computes it, float32 logarithm included:
/// bidirectional splits the buckets in halves for d <= 0 and d > 0; otherwise d > 0 all fall in
/// bucket 0. In each half of n buckets, |d| < n/2 has its own bucket and larger |d| fall into
/// logarithmic bins up to max_distance, beyond which they share the last bucket.
inline Index relative_position_bucket(Index relative_position, bool bidirectional = true, Index num_buckets = 32,
                                      Index max_distance = 128) {
  // Beyond max_distance every position shares the last bucket, so -INT64_MAX stands for
  // INT64_MIN (whose magnitude is no Index).
  Index bucket = 0, n = num_buckets, distance = std::max(relative_position, -std::numeric_limits<Index>::max());
  if (bidirectional) {
    n /= 2;
    if (distance > 0) bucket += n;
    distance = std::abs(distance);
  } else {
    distance = distance < 0 ? -distance : 0;
  }
  const Index max_exact = n / 2;
  ATTEND_CHECK(max_exact >= 1 && max_distance > max_exact,
               "relative position buckets need num_buckets >= " + std::string(bidirectional ? "4" : "2") +
                   " and max_distance > the exact range, got num_buckets=" + std::to_string(num_buckets) +
                   ", max_distance=" + std::to_string(max_distance));
  if (distance < max_exact) return bucket + distance;
  // float32 throughout, as torch computes log(d.float() / max_exact) / math.log(...) * (n - max_exact).
  const float log_ratio = std::log(static_cast<float>(distance) / static_cast<float>(max_exact));
  const float log_range = static_cast<float>(std::log(double(max_distance) / double(max_exact)));
  const double bins = log_ratio / log_range * static_cast<float>(n - max_exact);
  // Bins past the last bucket's, inf and NaN included (log_range is 0 when max_distance /
  // max_exact rounds to 1), go to the last bucket; what remains fits an Index.
  const Index room = n - 1 - max_exact;
  if (!(bins < static_cast<double>(room))) return bucket + n - 1;
  return bucket + max_exact + std::min(static_cast<Index>(bins), room);
}

/// T5 relative position bias: s_ij += table(bucket(j - a_i), h) for head h. `table` is the
/// learned (num_buckets, num_heads) embedding, PyTorch's `relative_attention_bias.weight`, whose
/// column h serves head h of a multi-head call; a vector (either orientation) is one table for
/// every head. A view: the table must outlive the call.
template <class T>
class RelativePositionBias : public MaskBase<RelativePositionBias<T>> {
 public:
  /// \param table (num_buckets, num_heads) matrix, or a (num_buckets) vector for every head; any
  ///              storage order and stride
  template <class D>
  RelativePositionBias(const Eigen::DenseBase<D>& table, bool bidirectional = true, Index max_distance = 128,
                       Alignment alignment = Alignment::TopLeft)
      : table_(detail::strided_view(table)),
        bidirectional_(bidirectional),
        max_distance_(max_distance),
        alignment_(alignment) {
    if (table_.rows == 1) {  // a row vector: read it as a column
      std::swap(table_.rows, table_.cols);
      std::swap(table_.row_stride, table_.col_stride);
    }
  }

  Index num_buckets() const { return table_.rows; }
  /// Heads with a table of their own; 1 = one table for every head.
  Index num_heads() const { return table_.cols; }

  /// Looks head at.head's bias up once for every relative position of an (Lq, Lk) problem: O(Lq + Lk).
  detail::PositionBias<detail::BucketBias<T>> bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    ATTEND_CHECK(num_heads() == 1 || num_heads() == at.num_heads,
                 "relative position bias table of " + std::to_string(num_heads()) + " heads (num_buckets x num_heads = " +
                     std::to_string(num_buckets()) + " x " + std::to_string(num_heads()) + ") in a call of " +
                     std::to_string(at.num_heads) + " heads");
    const Index column = num_heads() == 1 ? 0 : at.head;
    const Index offset = detail::diagonal_offset(alignment_, num_queries, num_keys);
    const Index d_min = -(num_queries - 1 + offset), d_max = num_keys - 1 - offset;
    detail::BucketBias<T> bias{{}, d_min};
    relative_position_bucket(0, bidirectional_, num_buckets(), max_distance_);  // validates the configuration
    if (num_queries > 0 && num_keys > 0) {
      bias.values.reserve(static_cast<std::size_t>(d_max - d_min + 1));
      for (Index d = d_min; d <= d_max; ++d) {
        const Index b = relative_position_bucket(d, bidirectional_, num_buckets(), max_distance_);
        bias.values.push_back(table_(b, column));
      }
    }
    return {num_keys, offset, std::move(bias)};
  }
  detail::PositionBias<detail::BucketBias<T>> bind(Index num_queries, Index num_keys) const {
    return bind(HeadIndex{}, num_queries, num_keys);
  }

 private:
  detail::StridedView<T> table_;
  bool bidirectional_;
  Index max_distance_;
  Alignment alignment_;
};

template <class D>
RelativePositionBias(const Eigen::DenseBase<D>&, bool = true, Index = 128, Alignment = Alignment::TopLeft)
    -> RelativePositionBias<typename D::Scalar>;

}  // namespace attend
