// SPDX-License-Identifier: MIT
/// \file masks.hpp
/// \brief Mask policies: which keys each query may attend to.
///
/// A mask is a small value that describes visibility. Kernels call `detail::bind_mask(mask, at,
/// Lq, Lk)`, which calls `mask.bind(at, Lq, Lk)` when the mask binds per head (`at` is the
/// HeadIndex: which sequence and head of the call, and how many there are) and `mask.bind(Lq,
/// Lk)` otherwise (one policy for every head). Either validates the mask against the problem
/// and returns a *bound policy* with four operations over a tile of query rows [q0, q1) and key
/// columns [k0, k1):
///  - `classify(q0, q1, k0, k1)`: `TileKind::Empty` (skip the tile), `Full` (no per-element
///    work) or `Partial` (call `detail::apply_mask`);
///  - `keys(q0, q1)`: a `KeyRange` holding every key that any of the rows may see, so kernels
///    never visit the rest (a window costs O(L w), not O(L^2));
///  - `add_bias(scores, q0, k0)`: adds the policy's bias, if it has one, to every score;
///  - `hide(scores, q0, k0)`: sets the scores of the keys the policy hides to -inf.
/// Kernels call `detail::apply_mask`, which runs the two phases in that order.
///
/// Masks compose: `a & b` sees a key only when both do, and adds both biases to it. Every bias
/// is added before any key is hidden, so a key that either operand hides is hidden whatever the
/// other adds there (+inf and NaN included), and `a & b` gives the results of `b & a`. A bias
/// of -inf hides its key. Conventions: boolean masks use true = may attend (PyTorch SDPA);
/// windows use -1 for unbounded; a query that sees no key gets a zero output row and
/// log-sum-exp -inf.
#pragma once

#include "options.hpp"
#include "types.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace attend {

/// What a mask policy says of one tile of scores.
enum class TileKind { Empty, Full, Partial };

/// Half-open range [begin, end) of key indices.
struct KeyRange {
  Index begin = 0;
  Index end = 0;
};

/// Which head a policy is bound for: head `head` of sequence `batch` in a call over
/// `batch_size` sequences of `num_heads` query heads each (FlexAttention's b and h). A
/// single-head call is head 0 of 1; multi-head entry points bind each head with its index.
struct HeadIndex {
  Index batch = 0;       ///< b, the sequence
  Index head = 0;        ///< h, the query head
  Index batch_size = 1;  ///< B
  Index num_heads = 1;   ///< H
};

/// CRTP base that marks a type as a mask, so that `a & b` composes masks and nothing else.
template <class Derived>
struct MaskBase {
  const Derived& derived() const { return static_cast<const Derived&>(*this); }
};

namespace detail {

/// Every key is visible.
struct AllVisible {
  Index num_keys;
  TileKind classify(Index, Index, Index, Index) const { return TileKind::Full; }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }
  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}
  template <class Scores>
  void hide(Scores&&, Index, Index) const {}
};

/// Key j is visible to query i iff lo(i) <= j < hi(i), where both bounds move one key per
/// query row (a band around the aligned diagonal i + offset):
///   lo(i) = i + offset - left        (0 when left  = -1, unbounded)
///   hi(i) = i + offset + right + 1   (key_end when right = -1, unbounded)
/// clamped to [0, key_end]. Causal masks, windows and key padding are all bands.
struct Band {
  Index key_end;  // keys at or past this index are never visible
  Index offset;   // aligned key of query 0
  Index left;     // keys visible before the aligned key, -1 = unbounded
  Index right;    // keys visible after the aligned key, -1 = unbounded

  Index lo(Index i) const { return left < 0 ? 0 : std::clamp(i + offset - left, Index(0), key_end); }
  Index hi(Index i) const { return right < 0 ? key_end : std::clamp(i + offset + right + 1, Index(0), key_end); }

  // lo and hi are non-decreasing in i and consecutive rows' ranges touch, so the union over a
  // row range is [lo(first), hi(last)).
  KeyRange keys(Index q0, Index q1) const {
    if (q0 >= q1) return {0, 0};
    const Index begin = lo(q0), end = hi(q1 - 1);
    return begin < end ? KeyRange{begin, end} : KeyRange{0, 0};
  }

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    const KeyRange r = keys(q0, q1);
    if (r.end <= k0 || r.begin >= k1) return TileKind::Empty;
    if (lo(q1 - 1) <= k0 && hi(q0) >= k1) return TileKind::Full;
    return TileKind::Partial;
  }

  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}

  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    const Index cols = s.cols();
    for (Index r = 0; r < s.rows(); ++r) {
      const Index begin = std::clamp(lo(q0 + r) - k0, Index(0), cols);
      const Index end = std::clamp(hi(q0 + r) - k0, begin, cols);
      s.row(r).head(begin).setConstant(-std::numeric_limits<T>::infinity());
      s.row(r).tail(cols - end).setConstant(-std::numeric_limits<T>::infinity());
    }
  }
};

/// Aligned key of query 0 for an alignment.
inline Index diagonal_offset(Alignment alignment, Index num_queries, Index num_keys) {
  return alignment == Alignment::TopLeft ? 0 : num_keys - num_queries;
}

/// A strided read-only view of an (rows x cols) matrix of any storage order.
template <class T>
struct StridedView {
  const T* data;
  Index rows, cols, row_stride, col_stride;
  const T& operator()(Index i, Index j) const { return data[i * row_stride + j * col_stride]; }
};

template <class D>
StridedView<typename D::Scalar> strided_view(const Eigen::DenseBase<D>& m) {
  static_assert(bool(D::Flags & Eigen::DirectAccessBit),
                "attend: a dense mask needs direct access to its storage; evaluate the expression into "
                "a matrix (attend::BoolMatrix or attend::Matrix<T>) first");
  const D& d = m.derived();
  return {d.data(), d.rows(), d.cols(), d.rowStride(), d.colStride()};
}

/// Dense boolean visibility (true = may attend).
struct DenseBoolean {
  StridedView<bool> visible;
  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, visible.cols}; }
  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}
  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c)
        if (!visible(q0 + r, k0 + c)) s(r, c) = -std::numeric_limits<T>::infinity();
  }
};

/// Dense additive bias: s_ij += bias_ij; a bias of -inf hides its key.
template <class T>
struct DenseBias {
  StridedView<T> bias;
  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, bias.cols}; }
  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    static_assert(std::is_same_v<typename std::decay_t<Scores>::Scalar, T>,
                  "attend: the additive mask must have the scalar type of the scores");
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c) s(r, c) += bias(q0 + r, k0 + c);
  }
  // Runs after every bias is added: where bias_ij = -inf the sum is NaN if +inf or NaN was
  // added there too, and the key is hidden all the same.
  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c)
        if (bias(q0 + r, k0 + c) == -std::numeric_limits<T>::infinity()) s(r, c) = -std::numeric_limits<T>::infinity();
  }
};

/// Visible where both policies say so.
template <class A, class B>
struct BothVisible {
  A first;
  B second;

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    const TileKind a = first.classify(q0, q1, k0, k1), b = second.classify(q0, q1, k0, k1);
    if (a == TileKind::Empty || b == TileKind::Empty) return TileKind::Empty;
    return a == TileKind::Full && b == TileKind::Full ? TileKind::Full : TileKind::Partial;
  }
  KeyRange keys(Index q0, Index q1) const {
    const KeyRange a = first.keys(q0, q1), b = second.keys(q0, q1);
    const Index begin = std::max(a.begin, b.begin), end = std::min(a.end, b.end);
    return begin < end ? KeyRange{begin, end} : KeyRange{0, 0};
  }
  // An operand that calls the tile Full neither adds nor hides anything in it.
  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    const Index q1 = q0 + s.rows(), k1 = k0 + s.cols();
    if (first.classify(q0, q1, k0, k1) != TileKind::Full) first.add_bias(s, q0, k0);
    if (second.classify(q0, q1, k0, k1) != TileKind::Full) second.add_bias(s, q0, k0);
  }
  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    const Index q1 = q0 + s.rows(), k1 = k0 + s.cols();
    if (first.classify(q0, q1, k0, k1) != TileKind::Full) first.hide(s, q0, k0);
    if (second.classify(q0, q1, k0, k1) != TileKind::Full) second.hide(s, q0, k0);
  }
};

/// Applies a bound policy to a tile of scores whose first element is (q0, k0): every bias
/// first, then -inf at every hidden key, so that what a policy hides stays hidden whatever is
/// added there (by another operand of `&`, or by a bias of +inf or NaN).
template <class BoundMask, class Scores>
void apply_mask(const BoundMask& mask, Scores&& s, Index q0, Index k0) {
  mask.add_bias(s, q0, k0);
  mask.hide(s, q0, k0);
}

/// Whether Mask binds per head, i.e. has `bind(const HeadIndex&, Index, Index)`.
template <class Mask, class = void>
struct binds_per_head : std::false_type {};

template <class Mask>
struct binds_per_head<Mask, std::void_t<decltype(std::declval<const Mask&>().bind(
                                std::declval<const HeadIndex&>(), Index(0), Index(0)))>> : std::true_type {};

/// Binds `mask` for head `at` of an (Lq, Lk) problem: `mask.bind(at, Lq, Lk)` when the mask
/// binds per head, `mask.bind(Lq, Lk)` (the same policy for every head) otherwise.
template <class Mask>
auto bind_mask(const Mask& mask, const HeadIndex& at, Index num_queries, Index num_keys) {
  if constexpr (binds_per_head<Mask>::value)
    return mask.bind(at, num_queries, num_keys);
  else
    return mask.bind(num_queries, num_keys);
}

/// The (Lq, Lk) slice of a dense mask for head `at`. The mask is one (Lq, Lk) matrix for every
/// head, or slices stacked along rows as torch lays out a 3-D mask: (H Lq, Lk), slice h for
/// head h, or (B H Lq, Lk), slice b H + h for head h of sequence b (nn.MultiheadAttention's
/// (N * num_heads, L, S) attn_mask).
template <class T>
StridedView<T> mask_slice(StridedView<T> m, const char* what, const HeadIndex& at, Index num_queries,
                          Index num_keys) {
  Index slice = -1;
  if (m.rows == num_queries)
    slice = 0;
  else if (m.rows == at.num_heads * num_queries)
    slice = at.head;
  else if (m.rows == at.batch_size * at.num_heads * num_queries)
    slice = at.batch * at.num_heads + at.head;
  const auto shape = [](Index r, Index c) { return "(" + std::to_string(r) + " x " + std::to_string(c) + ")"; };
  ATTEND_CHECK(slice >= 0 && m.cols == num_keys,
               std::string(what) + " of shape " + shape(m.rows, m.cols) + " does not match the scores (Lq x Lk) = " +
                   shape(num_queries, num_keys) + ", nor stacked per head (H Lq x Lk) = " +
                   shape(at.num_heads * num_queries, num_keys) + " or per sequence and head (B H Lq x Lk) = " +
                   shape(at.batch_size * at.num_heads * num_queries, num_keys) + " (H=" +
                   std::to_string(at.num_heads) + ", B=" + std::to_string(at.batch_size) + ")");
  m.data += slice * num_queries * m.row_stride;
  m.rows = num_queries;
  return m;
}

}  // namespace detail

/// Every query sees every key.
struct NoMask : MaskBase<NoMask> {
  detail::AllVisible bind(Index /*num_queries*/, Index num_keys) const { return {num_keys}; }
};

/// Query i sees keys up to its aligned key: j <= i (top-left) or j <= i + Lk - Lq (bottom-right).
struct Causal : MaskBase<Causal> {
  Alignment alignment = Alignment::TopLeft;

  Causal() = default;
  explicit Causal(Alignment a) : alignment(a) {}

  detail::Band bind(Index num_queries, Index num_keys) const {
    return {num_keys, detail::diagonal_offset(alignment, num_queries, num_keys), -1, 0};
  }
};

/// Query i sees keys in [a - left, a + right] around its aligned key a (a = i top-left,
/// a = i + Lk - Lq bottom-right); -1 leaves a side unbounded. `Window(w, 0)` is a causal
/// sliding window of w + 1 keys; `Window(0, 0)` sees only the aligned key.
struct Window : MaskBase<Window> {
  Index left = -1;
  Index right = -1;
  Alignment alignment = Alignment::TopLeft;

  Window() = default;
  Window(Index left_, Index right_, Alignment alignment_ = Alignment::TopLeft)
      : left(left_), right(right_), alignment(alignment_) {}

  detail::Band bind(Index num_queries, Index num_keys) const {
    ATTEND_CHECK(left >= -1 && right >= -1, "window (left=" + std::to_string(left) + ", right=" +
                                                std::to_string(right) + ") must have sides >= 0 or -1 (unbounded)");
    // A side reaching past every key is unbounded; so i + offset +- side never overflows.
    const auto side = [&](Index s) { return s >= num_queries + num_keys ? Index(-1) : s; };
    return {num_keys, detail::diagonal_offset(alignment, num_queries, num_keys), side(left), side(right)};
  }
};

namespace detail {

/// The integers of `values` (any integer type, any container with begin and end) as Indexes.
/// \throws attend::invalid_argument naming `what` and the entry when one is negative or beyond
///         an Index.
template <class Integers>
std::vector<Index> index_vector(const Integers& values, const char* what) {
  std::vector<Index> result;
  for (const auto& value : values) {
    using V = std::decay_t<decltype(value)>;
    static_assert(std::is_integral_v<V> && !std::is_same_v<V, bool>, "attend: lengths and offsets are integers");
    const bool fits = (std::is_signed_v<V> ? value >= 0 : true) &&
                      static_cast<std::make_unsigned_t<V>>(value) <= static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
    ATTEND_CHECK(fits, std::string(what) + "[" + std::to_string(result.size()) + "] = " + std::to_string(value) +
                           " is negative or beyond the index range");
    result.push_back(static_cast<Index>(value));
  }
  return result;
}

}  // namespace detail

/// Only the first `valid_length` keys are visible (trailing padding, never read). One length
/// for every sequence, or one per sequence of a batched call (sequence b sees its first
/// lengths[b] keys; PyTorch's key_padding_mask with trailing True entries).
struct KeyPadding : MaskBase<KeyPadding> {
  std::vector<Index> valid_lengths;  ///< one, or one per sequence

  explicit KeyPadding(Index valid) : valid_lengths{valid} {}
  /// \param per_sequence the valid length of each sequence, of any integer type
  template <class Lengths, class = std::enable_if_t<!std::is_arithmetic_v<Lengths>>>
  explicit KeyPadding(const Lengths& per_sequence)
      : valid_lengths(detail::index_vector(per_sequence, "key padding lengths")) {}

  detail::Band bind(const HeadIndex& at, Index /*num_queries*/, Index num_keys) const {
    const Index count = Index(valid_lengths.size());
    ATTEND_CHECK(count == 1 || count == at.batch_size,
                 "key padding of " + std::to_string(count) + " lengths in a call of " +
                     std::to_string(at.batch_size) + " sequences");
    const Index valid = valid_lengths[std::size_t(count == 1 ? 0 : at.batch)];
    ATTEND_CHECK(valid >= 0 && valid <= num_keys, "key padding valid length " + std::to_string(valid) +
                                                      " is outside [0, Lk=" + std::to_string(num_keys) + "]" +
                                                      (count == 1 ? "" : " for sequence " + std::to_string(at.batch)));
    return {valid, 0, -1, -1};
  }
  detail::Band bind(Index num_queries, Index num_keys) const { return bind(HeadIndex{}, num_queries, num_keys); }
};

namespace detail {

/// Keys whose entry of one row of a key padding mask is true are hidden from every query.
struct PaddedKeys {
  StridedView<bool> padding;  // (1, Lk)
  KeyRange valid;             // the first and one past the last key that is not padding

  TileKind classify(Index, Index, Index k0, Index k1) const {
    return k1 <= valid.begin || k0 >= valid.end ? TileKind::Empty : TileKind::Partial;
  }
  KeyRange keys(Index, Index) const { return valid; }
  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}
  template <class Scores>
  void hide(Scores&& s, Index, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index c = 0; c < s.cols(); ++c)
      if (padding(0, k0 + c)) s.col(c).setConstant(-std::numeric_limits<T>::infinity());
  }
};

}  // namespace detail

/// PyTorch's `key_padding_mask`: a (B, Lk) boolean matrix, or (1, Lk) for every sequence, where
/// **true marks a padding key** that no query of sequence b may see (the opposite of
/// BooleanMask's true = may attend, as torch's convention). Keys before the first and after the
/// last non-padding key are never read. A view: the matrix must outlive the call.
class KeyPaddingMask : public MaskBase<KeyPaddingMask> {
 public:
  template <class D>
  explicit KeyPaddingMask(const Eigen::DenseBase<D>& padding) : padding_(detail::strided_view(padding)) {
    static_assert(std::is_same_v<typename D::Scalar, bool>, "attend: KeyPaddingMask takes a matrix of bool");
  }

  detail::PaddedKeys bind(const HeadIndex& at, Index /*num_queries*/, Index num_keys) const {
    ATTEND_CHECK((padding_.rows == 1 || padding_.rows == at.batch_size) && padding_.cols == num_keys,
                 "key padding mask of shape (" + std::to_string(padding_.rows) + " x " + std::to_string(padding_.cols) +
                     ") must be (B x Lk) = (" + std::to_string(at.batch_size) + " x " + std::to_string(num_keys) +
                     ") or (1 x Lk)");
    detail::StridedView<bool> row = padding_;
    row.data += (padding_.rows == 1 ? 0 : at.batch) * padding_.row_stride;
    row.rows = 1;
    KeyRange valid{0, 0};
    Index first = 0, last = num_keys;
    while (first < num_keys && row(0, first)) ++first;
    while (last > first && row(0, last - 1)) --last;
    if (first < last) valid = {first, last};
    return {row, valid};
  }

 private:
  detail::StridedView<bool> padding_;
};

/// Dense boolean mask of shape (Lq, Lk), true = may attend; or one such slice per head, stacked
/// along rows: (H Lq, Lk) or (B H Lq, Lk) as torch's 3-D masks (detail::mask_slice). A view:
/// the matrix must outlive the call. Any storage order or stride with direct access is accepted.
class BooleanMask : public MaskBase<BooleanMask> {
 public:
  template <class D>
  explicit BooleanMask(const Eigen::DenseBase<D>& visible) : visible_(detail::strided_view(visible)) {
    static_assert(std::is_same_v<typename D::Scalar, bool>, "attend: BooleanMask takes a matrix of bool");
  }

  detail::DenseBoolean bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    return {detail::mask_slice(visible_, "boolean mask", at, num_queries, num_keys)};
  }
  detail::DenseBoolean bind(Index num_queries, Index num_keys) const { return bind(HeadIndex{}, num_queries, num_keys); }

 private:
  detail::StridedView<bool> visible_;
};

/// Dense additive mask of shape (Lq, Lk) added to the scaled scores; -inf hides a key and a
/// row of `lowest()` stays finite (a uniform average). Per-head slices stack along rows as for
/// BooleanMask. A view: the matrix must outlive the call.
template <class T>
class AdditiveMask : public MaskBase<AdditiveMask<T>> {
 public:
  template <class D>
  explicit AdditiveMask(const Eigen::DenseBase<D>& bias) : bias_(detail::strided_view(bias)) {}

  detail::DenseBias<T> bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    return {detail::mask_slice(bias_, "additive mask", at, num_queries, num_keys)};
  }
  detail::DenseBias<T> bind(Index num_queries, Index num_keys) const { return bind(HeadIndex{}, num_queries, num_keys); }

 private:
  detail::StridedView<T> bias_;
};

template <class D>
AdditiveMask(const Eigen::DenseBase<D>&) -> AdditiveMask<typename D::Scalar>;

namespace detail {

/// A bound policy of a larger problem applied to the block whose first query and key are
/// query `query_offset` and key `key_offset` of it: every call is forwarded with the block's
/// coordinates moved by the offsets, and `keys` is clipped to the block's `num_keys` keys.
template <class Bound>
struct OffsetPolicy {
  Bound inner;
  Index query_offset, key_offset, num_keys;

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    return inner.classify(q0 + query_offset, q1 + query_offset, k0 + key_offset, k1 + key_offset);
  }
  KeyRange keys(Index q0, Index q1) const {
    const KeyRange r = inner.keys(q0 + query_offset, q1 + query_offset);
    const Index begin = std::clamp(r.begin - key_offset, Index(0), num_keys);
    const Index end = std::clamp(r.end - key_offset, Index(0), num_keys);
    return begin < end ? KeyRange{begin, end} : KeyRange{0, 0};
  }
  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    inner.add_bias(s, q0 + query_offset, k0 + key_offset);
  }
  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    inner.hide(s, q0 + query_offset, k0 + key_offset);
  }
};

}  // namespace detail

/// `mask` as it applies to a (total_queries, total_keys) problem, seen from the block of it
/// whose first query is query `query_offset` and first key is key `key_offset`: what the block's
/// entries get in the whole problem. Decoding uses it to apply a mask at the cache's absolute
/// positions (attention/kv_cache.hpp), so that a step over a cache equals the corresponding rows
/// of the whole computation; a split of the keys can use it to keep the whole problem's mask.
template <class Mask>
struct OffsetMask : MaskBase<OffsetMask<Mask>> {
  Mask mask;
  Index query_offset = 0, key_offset = 0;  ///< where the block starts in the whole problem
  Index total_queries = 0, total_keys = 0;  ///< the whole problem's (Lq, Lk)

  OffsetMask(const MaskBase<Mask>& mask_, Index query_offset_, Index key_offset_, Index total_queries_,
             Index total_keys_)
      : mask(mask_.derived()),
        query_offset(query_offset_),
        key_offset(key_offset_),
        total_queries(total_queries_),
        total_keys(total_keys_) {}

  /// \throws attend::invalid_argument when the (Lq, Lk) block does not lie inside the whole problem.
  auto bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    ATTEND_CHECK(query_offset >= 0 && key_offset >= 0 && query_offset <= total_queries - num_queries &&
                     key_offset <= total_keys - num_keys,
                 "a block of (" + std::to_string(num_queries) + " x " + std::to_string(num_keys) + ") at (" +
                     std::to_string(query_offset) + ", " + std::to_string(key_offset) +
                     ") does not lie inside the whole problem (" + std::to_string(total_queries) + " x " +
                     std::to_string(total_keys) + ")");
    auto inner = detail::bind_mask(mask, at, total_queries, total_keys);
    return detail::OffsetPolicy<decltype(inner)>{std::move(inner), query_offset, key_offset, num_keys};
  }
  auto bind(Index num_queries, Index num_keys) const { return bind(HeadIndex{}, num_queries, num_keys); }
};

template <class Mask>
OffsetMask(const MaskBase<Mask>&, Index, Index, Index, Index) -> OffsetMask<Mask>;

/// The intersection of two masks; build it with `a & b`.
template <class A, class B>
struct Intersection : MaskBase<Intersection<A, B>> {
  A first;
  B second;

  Intersection(const A& a, const B& b) : first(a), second(b) {}

  auto bind(const HeadIndex& at, Index num_queries, Index num_keys) const {
    auto a = detail::bind_mask(first, at, num_queries, num_keys);
    auto b = detail::bind_mask(second, at, num_queries, num_keys);
    return detail::BothVisible<decltype(a), decltype(b)>{std::move(a), std::move(b)};
  }
  auto bind(Index num_queries, Index num_keys) const { return bind(HeadIndex{}, num_queries, num_keys); }
};

/// A key is visible when both masks let it through.
template <class A, class B>
Intersection<A, B> operator&(const MaskBase<A>& a, const MaskBase<B>& b) {
  return {a.derived(), b.derived()};
}

}  // namespace attend
