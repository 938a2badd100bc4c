// SPDX-License-Identifier: MIT
/// \file attention/kv_cache.hpp
/// \brief A key/value cache for incremental decoding, with an optional sliding window, and the
/// decode step over it.
///
/// One `KVCache` holds one attention layer: a K buffer (capacity, H_kv d) and a V buffer
/// (capacity, H_kv d_v), one token per row. A model keeps one cache per layer. Decoding appends
/// each new token's K/V rows and attends with bottom-right causal alignment, so decoding token
/// by token gives the outputs of full causal attention over the whole sequence.
///
/// With a sliding window of w keys, the token at position t sees keys t - w + 1 .. t, i.e. full
/// attention with `Window(w - 1, 0)`. The cache then keeps only what the next tokens can see:
/// before an append of n rows it drops all but the last w - 1 rows, so after a one-token step
/// it holds at most w rows. Rows are kept contiguous and in order; when the buffer's end is
/// reached, the kept rows are moved to its front (O(w), once every capacity - w + 1 tokens, so
/// a capacity of 2w costs O(1) per token).
#pragma once

#include "../detail/checks.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "blocked.hpp"
#include "multi_head.hpp"
#include "split_kv.hpp"

#include <algorithm>
#include <optional>
#include <string>

namespace attend {

/// Scalars of a cache.
struct KVCacheOptions {
  Index window = -1;          ///< w >= 1 keys seen by each query (itself included); -1 = unbounded
  Index value_head_dim = 0;   ///< d_v; 0 = head_dim
};

namespace detail {
template <class S>
class UndoableAppend;
}  // namespace detail

/// The K/V rows of one layer (see the file comment), stored in format S: float, double,
/// Eigen::bfloat16, Eigen::half (rounded to nearest even on append) or attend::Q8_0 (quantized
/// on append, quantized.hpp). Rows are converted once, when appended; the decode step reads
/// them in their format (it never forms a converted copy of the cache). A float or double
/// cache takes queries, keys and values of its scalar; a bf16 or half cache takes float or its
/// own scalar, a q8_0 cache float.
template <class S>
class KVCache {
 public:
  static_assert(detail::kv_format<S>);
  /// The format: S.
  using storage_type = S;
  /// What rows read back as: S, or float for q8_0.
  using value_type = detail::kv_value_t<S>;
  /// What a step computes in, and a layer for this cache holds: double for double, else float.
  using compute_type = detail::kv_compute_t<S>;

  /// \param capacity rows of the buffers; with a window, at least w
  /// \param kv_heads H_kv
  /// \param head_dim d
  /// \throws attend::invalid_argument on a size below 1, a bad window, or buffers larger than any
  ///         array can be (more than PTRDIFF_MAX bytes); std::bad_alloc when memory runs out.
  KVCache(Index capacity, Index kv_heads, Index head_dim, const KVCacheOptions& options = {})
      : kv_heads_(kv_heads),
        head_dim_(head_dim),
        value_head_dim_(options.value_head_dim == 0 ? head_dim : options.value_head_dim),
        window_(options.window) {
    ATTEND_CHECK(capacity >= 1 && kv_heads >= 1 && head_dim >= 1 && value_head_dim_ >= 1,
                 "KV cache capacity=" + std::to_string(capacity) + ", kv_heads=" + std::to_string(kv_heads) +
                     ", head_dim=" + std::to_string(head_dim) + ", value_head_dim=" +
                     std::to_string(value_head_dim_) + " must all be at least 1");
    ATTEND_CHECK(window_ == -1 || (window_ >= 1 && window_ <= capacity),
                 "KV cache window=" + std::to_string(window_) + " must be -1 (unbounded) or in [1, capacity=" +
                     std::to_string(capacity) + "]");
    // A row of kv_heads * head_dim first, so that neither product overflows.
    detail::check_array_size<value_type>(kv_heads, head_dim, "KV cache key row (kv_heads x head_dim)");
    detail::check_array_size<value_type>(kv_heads, value_head_dim_, "KV cache value row (kv_heads x value_head_dim)");
    keys_ = detail::KVRows<S>(capacity, kv_heads, head_dim, "KV cache keys (capacity x kv_heads * head_dim)");
    values_ = detail::KVRows<S>(capacity, kv_heads, value_head_dim_,
                                "KV cache values (capacity x kv_heads * value_head_dim)");
  }

  /// A cache shaped for `layer` (its H_kv, d and d_v), for decode_step(layer, cache, x): a layer
  /// of compute_type, or a bf16 or half layer (detail::layer_query_t).
  template <class L>
  KVCache(const MultiHeadAttention<L>& layer, Index capacity, Index window = -1)
      : KVCache(capacity, layer.num_kv_heads(), layer.head_dim(), KVCacheOptions{window, layer.value_head_dim()}) {
    static_assert(detail::kv_query<S, detail::layer_query_t<S, L>>);
  }

  Index capacity() const { return keys_.rows(); }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  Index value_head_dim() const { return value_head_dim_; }
  Index window() const { return window_; }
  /// Rows held now (the valid part).
  Index size() const { return size_; }
  /// Tokens appended since construction or clear(): the position of the next token.
  Index position() const { return position_; }

  /// (size, H_kv d) the valid keys, oldest first: the last `size` tokens. A view of the buffer
  /// for a scalar format; for q8_0 a dequantized copy (for inspection: steps never form it).
  auto keys() const {
    if constexpr (std::is_same_v<S, Q8_0>)
      return keys_.read(begin_, size_);
    else
      return keys_.matrix().middleRows(begin_, size_);
  }
  /// (size, H_kv d_v) the valid values (a view, or for q8_0 a dequantized copy).
  auto values() const {
    if constexpr (std::is_same_v<S, Q8_0>)
      return values_.read(begin_, size_);
    else
      return values_.matrix().middleRows(begin_, size_);
  }

  /// The stored key and value rows (detail: what the decode kernel reads); row begin() + i holds
  /// the i-th valid token.
  const detail::KVRows<S>& key_rows() const { return keys_; }
  const detail::KVRows<S>& value_rows() const { return values_; }
  Index begin() const { return begin_; }

  /// Appends n tokens' keys (n, H_kv d) and values (n, H_kv d_v), converted to the cache's format
  /// once (rounded to nearest even, or quantized). With a window, first drops all but the last
  /// w - 1 rows. On error the cache is unchanged.
  /// \throws attend::invalid_argument on a width mismatch, when the rows do not fit, or when
  ///         k_rows or v_rows are views of the cache's own buffers (appending moves them).
  template <class DK, class DV>
  void append(const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows) {
    static_assert(detail::kv_query<S, typename DK::Scalar> && detail::kv_query<S, typename DV::Scalar>);
    const Index n = k_rows.rows();
    ATTEND_CHECK(k_rows.cols() == keys_.width() && v_rows.cols() == values_.width() && v_rows.rows() == n,
                 "appended k " + detail::shape_of(k_rows) + " and v " + detail::shape_of(v_rows) +
                     " must be (n x " + std::to_string(keys_.width()) + ") and (n x " +
                     std::to_string(values_.width()) + ") (kv_heads * head_dim columns)");
    const Index keep = window_ < 0 ? size_ : std::min(size_, window_ - 1);
    ATTEND_CHECK(keep + n <= capacity(),
                 "KV cache overflow: appending " + std::to_string(n) + " rows to " + std::to_string(keep) +
                     " kept rows exceeds capacity=" + std::to_string(capacity()) +
                     (window_ < 0 ? std::string() : " (window=" + std::to_string(window_) + ")"));
    if constexpr (!std::is_same_v<S, Q8_0>) {
      detail::check_no_alias(keys_.matrix(), "key buffer", k_rows, "appended k_rows");
      detail::check_no_alias(keys_.matrix(), "key buffer", v_rows, "appended v_rows");
      detail::check_no_alias(values_.matrix(), "value buffer", k_rows, "appended k_rows");
      detail::check_no_alias(values_.matrix(), "value buffer", v_rows, "appended v_rows");
    }
    begin_ += size_ - keep;
    size_ = keep;
    if (begin_ + size_ + n > capacity()) {  // move the kept rows to the front
      keys_.copy_rows(0, begin_, size_);
      values_.copy_rows(0, begin_, size_);
      begin_ = 0;
    }
    keys_.assign(begin_ + size_, k_rows);
    values_.assign(begin_ + size_, v_rows);
    size_ += n;
    position_ += n;
  }

  /// Forgets every row; capacity and shapes stay.
  void clear() { begin_ = size_ = position_ = 0; }

  /// Rolls the cache back to its first `length` tokens (speculative decoding's rollback): the
  /// rows of positions [length, position()) are forgotten and the next token is at `length`.
  /// With a window of w, the token at `length` sees positions length - w + 1 .. length, so the
  /// cache must still hold them: the first held position, position() - size(), must be at most
  /// max(0, length - w + 1). On error the cache is unchanged.
  /// \throws attend::invalid_argument when length > position(), length < 0, or a windowed cache
  ///         no longer holds the keys the next token would see.
  void truncate(Index length) {
    const Index first = position_ - size_;  // first held position
    const Index needed = window_ < 0 ? 0 : std::max(Index(0), length - window_ + 1);
    ATTEND_CHECK(length >= 0 && length <= position_,
                 "KV cache truncate(" + std::to_string(length) + ") must be in [0, position=" +
                     std::to_string(position_) + "]");
    ATTEND_CHECK(first <= needed, "KV cache truncate(" + std::to_string(length) + "): the token at position " +
                                      std::to_string(length) + " sees positions from " + std::to_string(needed) +
                                      " (window=" + std::to_string(window_) +
                                      "), but the cache holds positions from " + std::to_string(first) + " only");
    size_ -= position_ - length;
    position_ = length;
  }

 private:
  friend class detail::UndoableAppend<S>;

  detail::KVRows<S> keys_;    // (capacity, H_kv d)
  detail::KVRows<S> values_;  // (capacity, H_kv d_v)
  Index kv_heads_, head_dim_, value_head_dim_, window_;
  Index begin_ = 0, size_ = 0, position_ = 0;
};

namespace detail {

/// cache.append(k_rows, v_rows), undone when this object is destroyed before commit(): what
/// gives decode_step its strong guarantee when the attention after the append throws
/// (std::bad_alloc included). It keeps the cache's state from before, and a copy of the rows
/// held then when the append moves the kept rows to the front, which may overwrite them (the
/// copy is taken before the cache changes; otherwise the append only writes past the rows held).
template <class S>
class UndoableAppend {
 public:
  template <class DK, class DV>
  UndoableAppend(KVCache<S>& cache, const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows)
      : cache_(cache), begin_(cache.begin_), size_(cache.size_), position_(cache.position_) {
    moves_ = k_rows.rows() > cache.capacity() - (cache.begin_ + cache.size_);
    if (moves_) {
      keys_ = cache.keys_.save(begin_, size_);
      values_ = cache.values_.save(begin_, size_);
    }
    cache.append(k_rows, v_rows);
  }
  UndoableAppend(const UndoableAppend&) = delete;
  UndoableAppend& operator=(const UndoableAppend&) = delete;

  ~UndoableAppend() {
    if (committed_) return;
    cache_.begin_ = begin_;
    cache_.size_ = size_;
    cache_.position_ = position_;
    if (moves_) {
      cache_.keys_.restore(begin_, keys_);
      cache_.values_.restore(begin_, values_);
    }
  }

  /// Keeps the append.
  void commit() { committed_ = true; }

 private:
  KVCache<S>& cache_;
  Index begin_, size_, position_;  // the cache's state before the append
  bool moves_ = false;
  bool committed_ = false;
  std::vector<kv_element_t<S>> keys_, values_;  // the rows held before a moving append
};

/// Decode of the n query rows q (n, H d) over the valid rows of `cache` (key j of the problem
/// is its j-th valid row), with `masks` bound per head on the (n, size) problem: the cache's
/// kernel, which reads the rows in their format. out (n, H d_v) and lse (n H) as
/// write_decode_rows writes them.
template <class S, class DQ, class BoundMask, class O>
void cache_decode_into(const KVCache<S>& cache, const Eigen::MatrixBase<DQ>& q, const HeadLayout& layout,
                       const std::vector<BoundMask>& masks, const AttentionOptions& options,
                       const Eigen::Ref<const Vector<O>>& sinks, MatrixRef<O> out) {
  using C = kv_compute_t<S>;
  KeyRange seen{cache.size(), 0};
  for (const BoundMask& m : masks) {
    const KeyRange r = m.keys(0, q.rows());
    if (r.begin < r.end) seen = {std::min(seen.begin, r.begin), std::max(seen.end, r.end)};
  }
  Matrix<C> q_scaled = resolve_scale<C>(options, layout.key_dim) * q.template cast<C>();  // (n, H d)
  std::optional<RoundedQueries> rounded;  // options.quantize_queries over a q8_0 cache
  if constexpr (std::is_same_v<S, Q8_0>)
    if (options.quantize_queries) rounded.emplace(q_scaled, layout.heads, layout.key_dim);
  const KVRows<S>&keys = cache.key_rows(), &values = cache.value_rows();
  const Index begin = cache.begin(), size = cache.size();
  const auto runs = [&](Index j) {
    return KeyRun<kv_element_t<S>>{keys.row(begin + j), values.row(begin + j), size - j};
  };
  Matrix<C> rows;
  Vector<C> rows_lse;
  decode_rows<C, kv_element_t<S>>(q_scaled, keys.stride(), values.stride(), layout, masks, seen,
                                  options.block_k > 0 ? options.block_k : kDecodeSplitKeys, runs, rows, rows_lse,
                                  rounded ? rounded->kernel_view() : Q8Queries{});
  write_decode_rows<C, O, O, O>(rows, rows_lse, layout.heads, sinks, out, no_vector<O>());
}

}  // namespace detail

/// One decoding step: appends the new tokens' K/V rows to `cache`, then attends from their
/// queries over the cache with bottom-right causal alignment (and the cache's window), so new
/// token i sees every earlier token and the new tokens up to itself. One new token goes through
/// the split-KV kernel (as decode_attention_into); several (a prefill chunk) through the
/// multi-head engine with the mask Window(w - 1, 0, BottomRight), -1 left side when unbounded,
/// or, for a bf16, half or q8_0 cache, through the split-KV kernel with that mask, which reads
/// the cache in its format (no converted copy of it is formed).
///
/// Precision: q, k_new, v_new and out are of the cache's scalar, or float for a bf16, half or
/// q8_0 cache; the step computes in float (double for a double cache), see decode_attention_into.
///
/// `mask` (any mask, bias, score modifier or custom policy; per-head policies bind per head)
/// applies at absolute positions: after the append the cache holds positions [P - size, P),
/// P = cache.position(), and the new queries are positions [P - n, P), so the step computes rows
/// P - n .. P - 1 of `forward(sequence, Causal() & mask)` over the whole (P, P) sequence, where
/// a dense mask is (P, P) and a bias sees the relative position of each key to its query. It is
/// OffsetMask(mask, P - n, P - size, P, P) intersected with the cache's own causality and window.
///
/// Learned sinks (attention/sinks.hpp), one logit per head, enter every softmax of the step.
///
/// \param q     (n, H d) queries of the new tokens
/// \param k_new (n, H_kv d) their keys, v_new (n, H_kv d_v) their values
/// \param out   (n, H d_v), not sharing memory with q, k_new or v_new
/// \throws attend::invalid_argument on mismatched shapes, H not divisible by H_kv, overflow, a mask
///         that does not fit, or `out` aliasing an input; std::bad_alloc when memory runs out. The
///         cache is then unchanged, whatever throws and wherever (the append is undone).
template <class S, class DQ, class DK, class DV, class Mask>
void decode_step_into(KVCache<S>& cache, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k_new,
                      const Eigen::MatrixBase<DV>& v_new, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                      const MaskBase<Mask>& mask, const AttentionOptions& options = {},
                      const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  using T = typename DQ::Scalar;
  static_assert(detail::supported_scalars<DQ> && detail::kv_query<S, T>);
  const detail::ThreadScope threads(options.num_threads);
  detail::check_head_counts(num_heads, cache.kv_heads());
  detail::resolve_tiles(options);  // throws on a negative block size before the cache changes
  ATTEND_CHECK(q.cols() == num_heads * cache.head_dim(),
               "q " + detail::shape_of(q) + " must have num_heads * head_dim = " + std::to_string(num_heads) +
                   " * " + std::to_string(cache.head_dim()) + " columns");
  ATTEND_CHECK(k_new.rows() == q.rows(), "k_new " + detail::shape_of(k_new) + " must have a row per query of q " +
                                             detail::shape_of(q));
  detail::check_shape(out, q.rows(), num_heads * cache.value_head_dim(), "output");
  detail::check_no_alias(out, "output", q, "input q");
  detail::check_no_alias(out, "output", k_new, "input k_new");
  detail::check_no_alias(out, "output", v_new, "input v_new");
  detail::resolve_scale<detail::kv_compute_t<S>>(options, cache.head_dim());  // throws before the cache changes
  detail::check_sinks(sinks.size(), num_heads);
  detail::UndoableAppend<S> appended(cache, k_new, v_new);  // undone if the attention throws
  const Index n = q.rows(), position = cache.position(), size = cache.size();
  const OffsetMask<Mask> absolute(mask, position - n, position - size, position, position);
  const detail::HeadLayout layout{num_heads, cache.kv_heads(), cache.head_dim(), cache.value_head_dim()};
  const Index left = cache.window() < 0 ? -1 : cache.window() - 1;
  const auto visible = Window(left, 0, Alignment::BottomRight) & absolute;
  if (n == 1) {  // after a one-row append, every kept key is causally visible
    std::vector<decltype(detail::bind_mask(absolute, HeadIndex{}, 1, size))> masks;
    for (Index h = 0; h < num_heads; ++h)
      masks.push_back(detail::bind_mask(absolute, HeadIndex{0, h, 1, num_heads}, 1, size));
    detail::cache_decode_into(cache, q, layout, masks, options, sinks, out);
  } else if constexpr (std::is_same_v<S, T> && !detail::is_reduced_precision<S>) {  // a full-precision chunk: the multi-head engine
    multi_head_attention_into(q, cache.keys(), cache.values(), num_heads, out, visible, options,
                              detail::no_matrix<T>(), sinks);
  } else {  // a chunk over a reduced or 8-bit cache: the decode kernel, reading it in its format
    std::vector<decltype(detail::bind_mask(visible, HeadIndex{}, n, size))> masks;
    for (Index h = 0; h < num_heads; ++h)
      masks.push_back(detail::bind_mask(visible, HeadIndex{0, h, 1, num_heads}, n, size));
    detail::cache_decode_into(cache, q, layout, masks, options, sinks, out);
  }
  appended.commit();
}

/// A decoding step without a mask beyond the cache's causality and window. See the overload
/// with a mask.
template <class S, class DQ, class DK, class DV>
void decode_step_into(KVCache<S>& cache, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k_new,
                      const Eigen::MatrixBase<DV>& v_new, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                      const AttentionOptions& options = {}) {
  decode_step_into(cache, q, k_new, v_new, num_heads, out, NoMask{}, options);
}

/// Returns the outputs (n, H d_v) of a decoding step with a mask. See decode_step_into.
template <class S, class DQ, class DK, class DV, class Mask>
Matrix<typename DQ::Scalar> decode_step(KVCache<S>& cache, const Eigen::MatrixBase<DQ>& q,
                                        const Eigen::MatrixBase<DK>& k_new, const Eigen::MatrixBase<DV>& v_new,
                                        Index num_heads, const MaskBase<Mask>& mask,
                                        const AttentionOptions& options = {},
                                        const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks =
                                            Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ> && detail::kv_query<S, typename DQ::Scalar>);
  Matrix<typename DQ::Scalar> out(q.rows(), num_heads * cache.value_head_dim());
  decode_step_into(cache, q, k_new, v_new, num_heads, out, mask, options, sinks);
  return out;
}

/// Returns the outputs (n, H d_v) of a decoding step. See decode_step_into.
template <class S, class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> decode_step(KVCache<S>& cache, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k_new,
                      const Eigen::MatrixBase<DV>& v_new, Index num_heads, const AttentionOptions& options = {}) {
  return decode_step(cache, q, k_new, v_new, num_heads, NoMask{}, options);
}

/// One decoding step of a MultiHeadAttention layer with its projections (self attention over
/// the tokens decoded so far): the n new tokens x (n, E_q) are projected, their queries and keys
/// rotated at positions cache.position() + i when the layer has a rotary embedding, their K/V
/// rows appended to `cache`, and the step attends as decode_step_into does, with `mask` at
/// absolute positions; the output is projected by W_o. Decoding a sequence token by token (or in
/// chunks) equals layer.forward(sequence, Causal() & mask), or Window(w - 1, 0) & mask for a
/// cache of window w, row by row.
///
/// \param cache shaped for the layer, e.g. KVCache<T>(layer, capacity), or KVCache<Eigen::bfloat16>
///              or KVCache<Q8_0> for a float layer (its K/V rows are stored in that format). A
///              bf16 or half layer queries a cache of its own scalar in it, and one of another
///              format (float, half/bf16, q8_0) in float: its projections (rounded to T) widened
///              exactly, the heads' output rounded to T once before W_o.
/// \param x     (n, E_q) the new tokens
/// \param mask  any mask, bias, score modifier or custom policy (per-head ones bind per head)
/// \param sinks (H) learned sink logits (attention/sinks.hpp), or empty
/// \return (n, E_out)
/// \throws attend::invalid_argument when the cache's heads or widths do not match the layer's,
///         on a wrong input width, a mask that does not fit, or on overflow; std::bad_alloc when
///         memory runs out (the cache is then unchanged).
template <class T, class S, class DX, class Mask>
Matrix<T> decode_step(const MultiHeadAttention<T>& layer, KVCache<S>& cache, const Eigen::MatrixBase<DX>& x,
                      const MaskBase<Mask>& mask, const AttentionOptions& options = {},
                      const Eigen::Ref<const Vector<typename DX::Scalar>>& sinks = Vector<typename DX::Scalar>()) {
  using Q = detail::layer_query_t<S, T>;
  static_assert(detail::supported_scalars<T, DX> && detail::kv_query<S, Q>);
  ATTEND_CHECK(cache.kv_heads() == layer.num_kv_heads() && cache.head_dim() == layer.head_dim() &&
                   cache.value_head_dim() == layer.value_head_dim(),
               "a cache of kv_heads=" + std::to_string(cache.kv_heads()) + ", head_dim=" +
                   std::to_string(cache.head_dim()) + ", value_head_dim=" + std::to_string(cache.value_head_dim()) +
                   " for a layer of num_kv_heads=" + std::to_string(layer.num_kv_heads()) + ", head_dim=" +
                   std::to_string(layer.head_dim()) + ", value_head_dim=" + std::to_string(layer.value_head_dim()));
  const detail::ThreadScope threads(options.num_threads);  // for the projections too
  const Index position = cache.position();
  const Matrix<T> q = layer.project_query(x, position), k = layer.project_key(x, position), v = layer.project_value(x);
  const Matrix<Q> heads = decode_step(cache, detail::in_scalar<Q>(q), detail::in_scalar<Q>(k), detail::in_scalar<Q>(v),
                                      layer.num_heads(), mask, options, detail::in_scalar<Q>(sinks));
  return layer.project_output(detail::in_scalar<T>(heads));
}

/// A decoding step of a layer without a mask beyond the cache's. See the overload with a mask.
template <class T, class S, class DX>
Matrix<T> decode_step(const MultiHeadAttention<T>& layer, KVCache<S>& cache, const Eigen::MatrixBase<DX>& x,
                      const AttentionOptions& options = {}) {
  return decode_step(layer, cache, x, NoMask{}, options);
}

}  // namespace attend
