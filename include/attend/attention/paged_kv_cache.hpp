// SPDX-License-Identifier: MIT
/// \file attention/paged_kv_cache.hpp
/// \brief A paged key/value cache shared by many sequences (vLLM's layout): a pool of
/// fixed-size blocks, a block table per sequence, copy-on-write forks, truncation, and
/// sliding-window layers that hold window-sized memory.
///
/// One `PagedKVCache` holds one attention layer (a model keeps one per layer, as with KVCache).
/// Its pool is two buffers of num_blocks * B rows, B = block_size: block p is rows
/// [p B, (p + 1) B) of the keys (H_kv d columns) and of the values (H_kv d_v columns), one token
/// per row, all kv heads side by side, so a decode step reads each block's rows once for every
/// head. Sequence s holds its tokens' positions in order: position t lies in row t mod B of
/// block `block_table(s)[t / B]`.
///
/// Blocks carry reference counts. `fork` gives a new sequence the same blocks (beam search,
/// parallel sampling); appending to a sequence whose last, partly filled block is shared first
/// copies that block (copy on write), so forks diverge without copying their common prefix.
/// `truncate` rolls a sequence back (speculative decoding), `free_sequence` returns its blocks.
///
/// With a sliding window of w keys, the token at position t sees positions t - w + 1 .. t. Before
/// an append, a sequence releases the blocks whose positions all lie before P - w + 1 (P: its
/// length), which no later token can see; their table entries become -1. So a sequence holds at
/// most ceil((w - 1 + n) / B) + 1 blocks after appending n tokens, whatever its length.
///
/// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks"): with
/// `sink_tokens` = n and a window, the blocks of the first n positions are never released and
/// those positions stay visible to every later token, which sees the first n keys and the last w
/// (StreamingWindow). paged_decode_step(layer, ...) with a rotary layer gives positions within
/// the cache, as the paper does, by rotating the sink keys further for each query (one token or
/// a chunk of them: chunked prefill works once the window has left the sinks too); the
/// lower-level calls take keys as appended (absolute positions) unless given such sink keys.
///
/// Every member that can fail checks first: on error (attend::invalid_argument naming the
/// values) the cache is unchanged.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../sequences.hpp"
#include "../types.hpp"
#include "multi_head.hpp"
#include "sinks.hpp"
#include "split_kv.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace attend {

/// Scalars of a paged cache.
struct PagedKVCacheOptions {
  Index block_size = 16;     ///< B >= 1 keys per block, any size (vLLM uses 16; 16..256 are typical)
  Index window = -1;         ///< w >= 1 keys seen by each query (itself included); -1 = unbounded
  Index value_head_dim = 0;  ///< d_v; 0 = head_dim
  Index sink_tokens = 0;     ///< StreamingLLM: the first n positions stay held and visible (needs a window)
};

namespace detail {

/// Key j is visible to query i iff j < hi(i) and (j < sinks or j >= lo(i)), lo and hi those of
/// `band`: a band whose first `sinks` keys stay visible below it. sinks = 0 is the band.
struct SinkBand {
  Band band;
  Index sinks;

  // Row i sees [0, min(sinks, hi(i))) and [lo(i), hi(i)); hi is non-decreasing in i.
  KeyRange keys(Index q0, Index q1) const {
    if (sinks == 0 || q0 >= q1) return band.keys(q0, q1);
    const Index end = band.hi(q1 - 1);
    return end > 0 ? KeyRange{0, end} : KeyRange{0, 0};
  }

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    if (sinks == 0) return band.classify(q0, q1, k0, k1);
    const KeyRange r = keys(q0, q1);
    if (r.end <= k0 || r.begin >= k1) return TileKind::Empty;
    if (k0 >= sinks && k1 <= band.lo(q0)) return TileKind::Empty;  // in every row's gap
    if (k1 <= band.hi(q0) && (k1 <= sinks || std::max(k0, sinks) >= band.lo(q1 - 1))) return TileKind::Full;
    return TileKind::Partial;
  }

  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}

  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    const Index cols = s.cols();
    const auto column = [&](Index key) { return std::clamp(key - k0, Index(0), cols); };
    for (Index r = 0; r < s.rows(); ++r) {
      const Index lo = band.lo(q0 + r), hi = band.hi(q0 + r);
      const Index gap_begin = column(std::min(sinks, lo)), gap_end = column(lo), end = column(hi);
      s.row(r).segment(gap_begin, gap_end - gap_begin).setConstant(kNegInf);
      s.row(r).tail(cols - std::max(end, gap_end)).setConstant(kNegInf);
      if (end < gap_end) s.row(r).segment(end, gap_end - end).setConstant(kNegInf);
    }
  }
};

}  // namespace detail

/// StreamingLLM's visibility: query i sees the first `sink_tokens` keys and the keys of
/// Window(left, 0, alignment), never a key after its aligned key a (a = i top-left, i + Lk - Lq
/// bottom-right): key j is visible iff j <= a and (j < sink_tokens or j >= a - left). With
/// sink_tokens = 0 it is Window(left, 0, alignment).
struct StreamingWindow : MaskBase<StreamingWindow> {
  Index sink_tokens = 0;
  Index left = -1;
  Alignment alignment = Alignment::TopLeft;

  StreamingWindow(Index sink_tokens_, Index left_, Alignment alignment_ = Alignment::TopLeft)
      : sink_tokens(sink_tokens_), left(left_), alignment(alignment_) {}

  /// \throws attend::invalid_argument on a negative sink_tokens or a left side below -1.
  detail::SinkBand bind(Index num_queries, Index num_keys) const {
    ATTEND_CHECK(sink_tokens >= 0, "StreamingWindow sink_tokens=" + std::to_string(sink_tokens) + " must be >= 0");
    return {Window(left, 0, alignment).bind(num_queries, num_keys), std::min(sink_tokens, num_keys)};
  }
};

template <class S>
class PagedKVCache;

namespace detail {
template <class S>
class UndoablePagedAppend;
}  // namespace detail

/// The blocks and block tables of one layer (see the file comment), stored in format S: float,
/// double, Eigen::bfloat16, Eigen::half (rounded to nearest even on append) or attend::Q8_0
/// (quantized on append, quantized.hpp), as KVCache<S>: rows are converted once, when appended,
/// copied in their format (copy on write), and read by the decode step in their format.
template <class S>
class PagedKVCache {
 public:
  static_assert(detail::kv_format<S>);
  /// The format: S.
  using storage_type = S;
  /// What rows read back as: S, or float for q8_0.
  using value_type = detail::kv_value_t<S>;
  /// What a step computes in, and a layer for this cache holds: double for double, else float.
  using compute_type = detail::kv_compute_t<S>;

  /// \param num_blocks blocks of the pool
  /// \param kv_heads   H_kv
  /// \param head_dim   d
  /// \throws attend::invalid_argument on a size below 1, a bad window or a pool larger than any
  ///         array can be; std::bad_alloc when memory runs out.
  PagedKVCache(Index num_blocks, Index kv_heads, Index head_dim, const PagedKVCacheOptions& options = {})
      : kv_heads_(kv_heads),
        head_dim_(head_dim),
        value_head_dim_(options.value_head_dim == 0 ? head_dim : options.value_head_dim),
        block_size_(options.block_size),
        window_(options.window),
        sink_tokens_(options.sink_tokens) {
    ATTEND_CHECK(block_size_ >= 1, "paged KV cache block_size=" + std::to_string(block_size_) +
                                       " must be at least 1 key per block (any size works; 16..256 are typical)");
    ATTEND_CHECK(num_blocks >= 1 && block_size_ >= 1 && kv_heads >= 1 && head_dim >= 1 && value_head_dim_ >= 1,
                 "paged KV cache num_blocks=" + std::to_string(num_blocks) + ", block_size=" +
                     std::to_string(block_size_) + ", kv_heads=" + std::to_string(kv_heads) + ", head_dim=" +
                     std::to_string(head_dim) + ", value_head_dim=" + std::to_string(value_head_dim_) +
                     " must all be at least 1");
    ATTEND_CHECK(window_ == -1 || window_ >= 1,
                 "paged KV cache window=" + std::to_string(window_) + " must be -1 (unbounded) or at least 1");
    ATTEND_CHECK(sink_tokens_ == 0 || (sink_tokens_ > 0 && window_ >= 1),
                 "paged KV cache sink_tokens=" + std::to_string(sink_tokens_) +
                     " must be 0, or positive with a window (window=" + std::to_string(window_) + ")");
    detail::check_array_size<value_type>(num_blocks, block_size_, "paged KV cache rows (num_blocks x block_size)");
    detail::check_array_size<value_type>(kv_heads, head_dim, "paged KV cache key row (kv_heads x head_dim)");
    detail::check_array_size<value_type>(kv_heads, value_head_dim_,
                                         "paged KV cache value row (kv_heads x value_head_dim)");
    keys_ = detail::KVRows<S>(num_blocks * block_size_, kv_heads, head_dim,
                              "paged KV cache keys (num_blocks * block_size x kv_heads * head_dim)");
    values_ = detail::KVRows<S>(num_blocks * block_size_, kv_heads, value_head_dim_,
                                "paged KV cache values (num_blocks * block_size x kv_heads * value_head_dim)");
    ref_counts_.assign(std::size_t(num_blocks), 0);
    free_.reserve(std::size_t(num_blocks));
    for (Index p = num_blocks - 1; p >= 0; --p) free_.push_back(p);  // block 0 is handed out first
  }

  /// A pool shaped for `layer` (its H_kv, d and d_v); options.value_head_dim is ignored. The
  /// layer is of compute_type, or bf16 or half (detail::layer_query_t).
  template <class L>
  PagedKVCache(const MultiHeadAttention<L>& layer, Index num_blocks, PagedKVCacheOptions options = {})
      : PagedKVCache(num_blocks, layer.num_kv_heads(), layer.head_dim(),
                     PagedKVCacheOptions{options.block_size, options.window, layer.value_head_dim(),
                                         options.sink_tokens}) {
    static_assert(detail::kv_query<S, detail::layer_query_t<S, L>>);
  }

  Index num_blocks() const { return Index(ref_counts_.size()); }
  Index block_size() const { return block_size_; }
  Index kv_heads() const { return kv_heads_; }
  Index head_dim() const { return head_dim_; }
  Index value_head_dim() const { return value_head_dim_; }
  Index window() const { return window_; }
  /// StreamingLLM's kept first positions (0: none).
  Index sink_tokens() const { return sink_tokens_; }
  /// Blocks no sequence holds.
  Index free_blocks() const { return Index(free_.size()); }
  /// Sequences that hold blocks or may append (added or forked, not freed).
  Index num_sequences() const {
    return Index(std::count_if(sequences_.begin(), sequences_.end(), [](const Sequence& s) { return s.live; }));
  }
  /// Whether `seq` names a live sequence.
  bool contains(Index seq) const { return seq >= 0 && seq < Index(sequences_.size()) && sequences_[std::size_t(seq)].live; }

  /// (num_blocks B, H_kv d) the whole key pool; block p is rows [p B, (p + 1) B). The buffer for
  /// a scalar format; for q8_0 a dequantized copy (for inspection: steps never form it).
  decltype(auto) keys() const {
    if constexpr (std::is_same_v<S, Q8_0>)
      return keys_.read(0, keys_.rows());
    else
      return keys_.matrix();
  }
  /// (num_blocks B, H_kv d_v) the whole value pool (the buffer, or for q8_0 a dequantized copy).
  decltype(auto) values() const {
    if constexpr (std::is_same_v<S, Q8_0>)
      return values_.read(0, values_.rows());
    else
      return values_.matrix();
  }
  /// The stored key and value rows of the pool (detail: what the decode kernel reads).
  const detail::KVRows<S>& key_rows() const { return keys_; }
  const detail::KVRows<S>& value_rows() const { return values_; }
  /// Sequences holding block p.
  Index ref_count(Index block) const {
    ATTEND_CHECK(block >= 0 && block < num_blocks(),
                 "block " + std::to_string(block) + " is not in [0, num_blocks=" + std::to_string(num_blocks()) + ")");
    return ref_counts_[std::size_t(block)];
  }

  /// Tokens appended to `seq` (less those truncated): the position of its next token.
  Index length(Index seq) const { return at(seq).length; }
  /// The first position of the window `seq` still holds: 0 without a window, a multiple of B
  /// with one. With sink_tokens, the blocks of positions [0, sink_tokens) are held as well.
  Index first_position(Index seq) const { return at(seq).first_block * block_size_; }
  /// The block table of `seq`: entry i holds positions [i B, (i + 1) B); -1 for a block a window
  /// released. ceil(length / B) entries.
  const std::vector<Index>& block_table(Index seq) const { return at(seq).blocks; }
  /// Blocks `seq` holds now.
  Index held_blocks(Index seq) const {
    const std::vector<Index>& blocks = at(seq).blocks;
    return Index(std::count_if(blocks.begin(), blocks.end(), [](Index p) { return p >= 0; }));
  }

  /// (rows, H_kv d) the keys of the positions in the blocks `seq` holds, in order, copied out of
  /// the pool: positions [first_position, length), after those of the sink blocks if any.
  Matrix<value_type> gather_keys(Index seq) const { return gather(seq, keys_); }
  /// (rows, H_kv d_v) the values of the positions in the blocks `seq` holds, in order.
  Matrix<value_type> gather_values(Index seq) const { return gather(seq, values_); }

  /// A new empty sequence; returns its id (the lowest id not in use).
  Index add_sequence() {
    const auto free_slot = std::find_if(sequences_.begin(), sequences_.end(), [](const Sequence& s) { return !s.live; });
    if (free_slot == sequences_.end()) {
      sequences_.push_back(Sequence{});
      sequences_.back().live = true;
      return Index(sequences_.size()) - 1;
    }
    *free_slot = Sequence{};
    free_slot->live = true;
    return Index(free_slot - sequences_.begin());
  }

  /// A new sequence that shares every block of `seq` (copy on write); returns its id. Takes no
  /// block from the pool.
  /// \throws attend::invalid_argument when `seq` is not a live sequence.
  Index fork(Index seq) {
    const Sequence copy = at(seq);
    const Index id = add_sequence();
    sequences_[std::size_t(id)] = copy;
    for (Index p : copy.blocks)
      if (p >= 0) ++ref_counts_[std::size_t(p)];
    return id;
  }

  /// Releases the blocks of `seq` (those no other sequence holds return to the pool) and retires
  /// its id, which add_sequence may hand out again.
  /// \throws attend::invalid_argument when `seq` is not a live sequence.
  void free_sequence(Index seq) {
    Sequence& s = at(seq);
    for (Index p : s.blocks)
      if (p >= 0) release(p);
    s = Sequence{};
  }

  /// Appends n tokens' keys (n, H_kv d) and values (n, H_kv d_v) to `seq`. With a window, first
  /// releases the blocks no token from position length(seq) on can see. On error the cache is
  /// unchanged.
  /// \throws attend::invalid_argument on an unknown sequence, a width mismatch, or when the pool
  ///         has too few free blocks.
  template <class DK, class DV>
  void append(Index seq, const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows) {
    check_append(seq, k_rows, v_rows, releasable(seq));
    reserve_table(seq, k_rows.rows());  // the one allocation, before anything changes
    trim(seq, length(seq));
    write(seq, k_rows, v_rows);
  }

  /// Rolls `seq` back to its first `length` tokens: later positions are forgotten and blocks
  /// past ceil(length / B) released. With a window, the token at `length` sees positions from
  /// max(0, length - w + 1), which the sequence must still hold. On error the cache is unchanged.
  /// \throws attend::invalid_argument on an unknown sequence, a length outside [0, length(seq)],
  ///         or a windowed sequence that no longer holds the keys its next token would see.
  void truncate(Index seq, Index length) {
    Sequence& s = at(seq);
    ATTEND_CHECK(length >= 0 && length <= s.length, "paged KV cache truncate(sequence " + std::to_string(seq) + ", " +
                                                        std::to_string(length) + ") must be in [0, length=" +
                                                        std::to_string(s.length) + "]");
    const Index needed = window_ < 0 ? 0 : std::max(Index(0), length - window_ + 1);
    ATTEND_CHECK(s.first_block * block_size_ <= needed || s.first_block <= sink_blocks(),
                 "paged KV cache truncate(sequence " + std::to_string(seq) + ", " + std::to_string(length) +
                     "): the token at position " + std::to_string(length) + " sees positions from " +
                     std::to_string(needed) + " (window=" + std::to_string(window_) +
                     "), but the sequence holds positions from " + std::to_string(s.first_block * block_size_) +
                     " only");
    const Index keep = blocks_for(length);
    for (std::size_t i = std::size_t(keep); i < s.blocks.size(); ++i)
      if (s.blocks[i] >= 0) release(s.blocks[i]);
    s.blocks.resize(std::size_t(keep));
    s.first_block = std::min(s.first_block, keep);  // (below it, only sink blocks: all held)
    s.length = length;
  }

 private:
  friend class detail::UndoablePagedAppend<S>;

  struct Sequence {
    std::vector<Index> blocks;  // the block table; -1 for released blocks
    Index length = 0;           // positions appended
    Index first_block = 0;      // first held entry of `blocks`
    bool live = false;
  };

  Index blocks_for(Index positions) const { return (positions + block_size_ - 1) / block_size_; }
  // Entries of the block table that hold sink positions and are never released.
  Index sink_blocks() const { return blocks_for(sink_tokens_); }

  const Sequence& at(Index seq) const {
    ATTEND_CHECK(contains(seq), "sequence " + std::to_string(seq) + " is not in the paged KV cache (" +
                                    std::to_string(num_sequences()) + " live sequences of ids below " +
                                    std::to_string(sequences_.size()) + ")");
    return sequences_[std::size_t(seq)];
  }
  Sequence& at(Index seq) { return const_cast<Sequence&>(static_cast<const PagedKVCache&>(*this).at(seq)); }

  void release(Index block) {
    if (--ref_counts_[std::size_t(block)] == 0) free_.push_back(block);
  }
  Index take_block() {
    const Index p = free_.back();
    free_.pop_back();
    ref_counts_[std::size_t(p)] = 1;
    return p;
  }

  // The end of the entries [first_block, end) that a window lets go once no query before
  // position `next` remains: the blocks whose positions all lie before next - w + 1.
  Index trim_end(const Sequence& s, Index next) const {
    if (window_ < 0) return s.first_block;
    return std::max(s.first_block, std::max(Index(0), next - window_ + 1) / block_size_);
  }
  // Blocks that trim(seq, length(seq)) returns to the pool.
  Index releasable(Index seq) const {
    const Sequence& s = at(seq);
    Index count = 0;
    for (Index i = std::max(s.first_block, sink_blocks()); i < trim_end(s, s.length); ++i)
      count += ref_counts_[std::size_t(s.blocks[std::size_t(i)])] == 1;
    return count;
  }
  void trim(Index seq, Index next) {
    Sequence& s = at(seq);
    const Index end = trim_end(s, next);
    for (Index i = std::max(s.first_block, sink_blocks()); i < end; ++i) {
      release(s.blocks[std::size_t(i)]);
      s.blocks[std::size_t(i)] = -1;
    }
    s.first_block = end;
  }

  // Blocks an append of n rows to `seq` takes from the pool: new blocks, and a copy of a shared,
  // partly filled last block.
  Index blocks_needed(Index seq, Index n) const {
    const Sequence& s = at(seq);
    if (n == 0) return 0;
    const bool copy = s.length % block_size_ != 0 && ref_counts_[std::size_t(s.blocks.back())] > 1;
    return blocks_for(s.length + n) - blocks_for(s.length) + (copy ? 1 : 0);
  }

  template <class DK, class DV>
  void check_append(Index seq, const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows,
                    Index released) const {
    at(seq);
    const Index n = k_rows.rows();
    static_assert(detail::kv_query<S, typename DK::Scalar> && detail::kv_query<S, typename DV::Scalar>);
    ATTEND_CHECK(k_rows.cols() == keys_.width() && v_rows.cols() == values_.width() && v_rows.rows() == n,
                 "appended k " + detail::shape_of(k_rows) + " and v " + detail::shape_of(v_rows) + " must be (n x " +
                     std::to_string(keys_.width()) + ") and (n x " + std::to_string(values_.width()) +
                     ") (kv_heads * head_dim columns)");
    const Index needed = blocks_needed(seq, n);
    ATTEND_CHECK(needed <= free_blocks() + released,
                 "paged KV cache exhausted: appending " + std::to_string(n) + " rows to sequence " +
                     std::to_string(seq) + " (length " + std::to_string(length(seq)) + ") needs " +
                     std::to_string(needed) + " blocks of " + std::to_string(block_size_) + ", " +
                     std::to_string(free_blocks() + released) + " free of num_blocks=" +
                     std::to_string(num_blocks()));
  }

  // Room in the block table of `seq` for n more positions, so that write() allocates nothing.
  void reserve_table(Index seq, Index n) {
    Sequence& s = at(seq);
    s.blocks.reserve(std::size_t(blocks_for(s.length + n)));
  }

  // Appends without releasing anything: takes blocks_needed(seq, n) blocks from the pool. After
  // reserve_table(seq, n) it allocates nothing.
  template <class DK, class DV>
  void write(Index seq, const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows) {
    Sequence& s = at(seq);
    const Index n = k_rows.rows(), B = block_size_;
    if (n == 0) return;
    if (s.length % B != 0 && ref_counts_[std::size_t(s.blocks.back())] > 1) {  // copy on write
      const Index shared = s.blocks.back(), copy = take_block(), rows = s.length % B;
      keys_.copy_rows(copy * B, shared * B, rows);  // in the format: no second rounding
      values_.copy_rows(copy * B, shared * B, rows);
      release(shared);
      s.blocks.back() = copy;
    }
    for (Index t = 0; t < n;) {
      const Index position = s.length + t, offset = position % B, count = std::min(B - offset, n - t);
      if (offset == 0) s.blocks.push_back(take_block());
      const Index row = s.blocks.back() * B + offset;
      keys_.assign(row, k_rows.middleRows(t, count));
      values_.assign(row, v_rows.middleRows(t, count));
      t += count;
    }
    s.length += n;
  }

  Matrix<value_type> gather(Index seq, const detail::KVRows<S>& pool) const {
    const Sequence& s = at(seq);
    const auto rows_of = [&](Index i) { return std::min(block_size_, s.length - i * block_size_); };
    Index count = 0;
    for (Index i = 0; i < Index(s.blocks.size()); ++i) count += s.blocks[std::size_t(i)] >= 0 ? rows_of(i) : 0;
    Matrix<value_type> rows(count, pool.width());
    Index row = 0;
    for (Index i = 0; i < Index(s.blocks.size()); ++i) {
      if (s.blocks[std::size_t(i)] < 0) continue;
      rows.middleRows(row, rows_of(i)) = pool.read(s.blocks[std::size_t(i)] * block_size_, rows_of(i));
      row += rows_of(i);
    }
    return rows;
  }

  detail::KVRows<S> keys_;    // (num_blocks B, H_kv d)
  detail::KVRows<S> values_;  // (num_blocks B, H_kv d_v)
  Index kv_heads_, head_dim_, value_head_dim_, block_size_, window_, sink_tokens_;
  std::vector<Index> ref_counts_;  // per block
  std::vector<Index> free_;        // blocks with count 0; the last is handed out next
  std::vector<Sequence> sequences_;
};

namespace detail {

/// Appends to several sequences of a paged cache, undone when this object is destroyed before
/// commit(): what gives paged_decode_step_into its strong guarantee. The appends release nothing
/// (windows release their blocks at commit), so a block taken here was free before, and the undo
/// restores the sequences' entries, the reference counts of copied blocks and the free list.
template <class S>
class UndoablePagedAppend {
 public:
  explicit UndoablePagedAppend(PagedKVCache<S>& cache) : cache_(cache), free_(cache.free_) {}
  UndoablePagedAppend(const UndoablePagedAppend&) = delete;
  UndoablePagedAppend& operator=(const UndoablePagedAppend&) = delete;

  /// Appends the rows to `seq` (checked first), without releasing window blocks.
  template <class DK, class DV>
  void append(Index seq, const Eigen::MatrixBase<DK>& k_rows, const Eigen::MatrixBase<DV>& v_rows) {
    cache_.check_append(seq, k_rows, v_rows, 0);
    const auto& s = cache_.sequences_[std::size_t(seq)];
    saved_.push_back({seq, s.blocks, s.length});
    cache_.reserve_table(seq, k_rows.rows());
    cache_.write(seq, k_rows, v_rows);
  }

  ~UndoablePagedAppend() {
    if (committed_) return;
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      auto& s = cache_.sequences_[std::size_t(it->seq)];
      for (Index p : s.blocks)  // what this append took, and what it copied from
        if (p >= 0) --cache_.ref_counts_[std::size_t(p)];
      s.blocks = std::move(it->blocks);
      s.length = it->length;
      for (Index p : s.blocks)
        if (p >= 0) ++cache_.ref_counts_[std::size_t(p)];
    }
    cache_.free_ = std::move(free_);
  }

  /// Keeps the appends, then lets each windowed sequence release what no token from its
  /// length before the appends on can see (as append does before appending), so that the step
  /// can still be rolled back whole.
  void commit() {
    committed_ = true;
    for (const Saved& s : saved_) cache_.trim(s.seq, s.length);
  }

 private:
  struct Saved {
    Index seq;
    std::vector<Index> blocks;
    Index length;
  };
  PagedKVCache<S>& cache_;
  std::vector<Index> free_;  // the free list before the appends
  std::vector<Saved> saved_;
  bool committed_ = false;
};

}  // namespace detail

/// Batched decoding from a paged cache: for each sequence b of the call, the last n_b =
/// rows.length(b) tokens of sequence `sequences[b]` (already appended) attend with queries
/// q.middleRows(rows.begin(b), n_b) over the keys the sequence holds. They are positions
/// [P - n_b, P) of the sequence, P = cache.length(sequences[b]), and see the keys bottom-right
/// causally (new token i sees every earlier position and the new tokens up to itself), within
/// the cache's window. `mask` (any mask, bias, score modifier or custom policy) applies at
/// absolute positions, as in decode_step_into: the step computes rows P - n_b .. P - 1 of
/// `forward(sequence, Causal() & mask)` over the whole (P, P) sequence; a per-head policy binds
/// for head h as HeadIndex{b, h, B, H}, b the sequence's index in this call.
///
/// Work items are (sequence, split of key blocks): each split is `block_k` keys rounded down to
/// whole blocks (at least one; default detail::kDecodeSplitKeys), reads its K and V rows once
/// for all heads and query rows (GQA-aware, decode_split_runs), and the partials of a sequence
/// are merged in split order, then with each head's sink. So the result is bitwise the same for
/// any thread count, and each sequence's rows are bitwise those of a call with it alone. Only
/// the keys some head of some query row may see are read.
///
/// \param cache     the pool; every sequence holds the keys its queries see (a windowed sequence
///                  must have appended the n_b tokens in one call: appending releases blocks)
/// \param sequences B sequence ids (repeats allowed)
/// \param rows      where each sequence's queries lie in q and out (SequenceRows)
/// \param q         (rows, H d) queries
/// \param out       (rows, H d_v); rows in no sequence are left as they are
/// \param sinks     (H) learned sink logits, or empty (attention/sinks.hpp)
/// \param lse       (rows, H) log-sum-exp of each query row and head (including the sink), or empty
/// \param sink_keys null, or per sequence of the call the keys that replace its first s positions
///                  for each of its n_b queries: (n_b s, H_kv d), query row r's s keys at rows
///                  [r s, (r + 1) s), s <= sink_tokens (StreamingLLM's sink keys rotated to their
///                  positions within the cache for that query, as paged_decode_step(layer, ...)
///                  passes them; empty: the pool's). Each query row reads its own in the splits of
///                  keys [0, s); the other splits serve every row at once.
/// \throws attend::invalid_argument on an unknown sequence, n_b greater than the sequence's
///         length, rows outside q, mismatched shapes, a mask that does not fit, a windowed
///         sequence that released keys its queries see, or `out` or `lse` aliasing q.
template <class S, class DQ, class Mask>
void paged_attention_into(const PagedKVCache<S>& cache, const std::vector<Index>& sequences, const SequenceRows& rows,
                          const Eigen::MatrixBase<DQ>& q, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                          const MaskBase<Mask>& mask, const AttentionOptions& options = {},
                          const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>(),
                          MatrixRef<typename DQ::Scalar> lse = detail::no_matrix<typename DQ::Scalar>(),
                          const std::vector<Matrix<typename DQ::Scalar>>* sink_keys = nullptr) {
  using T = typename DQ::Scalar;
  static_assert(detail::supported_scalars<DQ> && detail::kv_query<S, T>);
  using C = detail::kv_compute_t<S>;
  using E = detail::kv_element_t<S>;
  const detail::ThreadScope threads(options.num_threads);
  const Index batch = Index(sequences.size()), B = cache.block_size();
  detail::check_head_counts(num_heads, cache.kv_heads());
  const detail::HeadLayout layout{num_heads, cache.kv_heads(), cache.head_dim(), cache.value_head_dim()};
  const Index heads = num_heads, d = layout.key_dim, dv = layout.value_dim;
  ATTEND_CHECK(rows.size() == batch, "rows of " + std::to_string(rows.size()) + " sequences for " +
                                         std::to_string(batch) + " sequence ids");
  ATTEND_CHECK(q.cols() == heads * d && rows.rows_used() <= q.rows(),
               "q " + detail::shape_of(q) + " must have num_heads * head_dim = " + std::to_string(heads) + " * " +
                   std::to_string(d) + " columns and at least the " + std::to_string(rows.rows_used()) +
                   " rows the sequences use");
  detail::check_shape(out, q.rows(), heads * dv, "output");
  detail::check_sinks(sinks.size(), heads);
  ATTEND_CHECK(lse.size() == 0 || (lse.rows() == q.rows() && lse.cols() == heads),
               "log-sum-exp " + detail::shape_of(lse) + " must be empty or (" + std::to_string(q.rows()) + " x " +
                   std::to_string(heads) + ")");
  ATTEND_CHECK(options.block_k >= 0, "block_k=" + std::to_string(options.block_k) + " must be positive, or 0");
  ATTEND_CHECK(sink_keys == nullptr || Index(sink_keys->size()) == batch,
               "sink_keys for " + std::to_string(sink_keys ? sink_keys->size() : 0) + " of " + std::to_string(batch) +
                   " sequences");
  const auto replaced = [&](Index b) -> const Matrix<T>* {  // sequence b's replaced sink keys, or null
    return sink_keys != nullptr && (*sink_keys)[std::size_t(b)].size() != 0 ? &(*sink_keys)[std::size_t(b)] : nullptr;
  };
  // Replaced sink keys of sequence b per query row: s of them, at rows [r s, (r + 1) s) for row r.
  const auto replaced_count = [&](Index b) {
    const Matrix<T>* keys = replaced(b);
    return keys == nullptr ? Index(0) : keys->rows() / rows.length(b);
  };
  for (Index b = 0; b < batch; ++b)
    if (const Matrix<T>* keys = replaced(b))
      ATTEND_CHECK(keys->cols() == cache.kv_heads() * cache.head_dim() && rows.length(b) >= 1 &&
                       keys->rows() % rows.length(b) == 0 && keys->rows() / rows.length(b) <= cache.sink_tokens(),
                   "sink_keys[" + std::to_string(b) + "] " + detail::shape_of(*keys) + " must have n s rows of " +
                       std::to_string(cache.kv_heads() * cache.head_dim()) + " columns, s <= sink_tokens=" +
                       std::to_string(cache.sink_tokens()) + " keys for each of the sequence's n = " +
                       std::to_string(rows.length(b)) + " queries");
  detail::check_no_alias(out, "output", q, "input q");
  detail::check_no_alias(lse, "log-sum-exp", q, "input q");
  detail::check_no_alias(lse, "log-sum-exp", out, "output");
  const C scale = detail::resolve_scale<C>(options, d);
  // Replaced sink keys in the cache's format (the kernel reads one format; a float or double
  // cache stores them as given).
  std::vector<detail::KVRows<S>> replaced_rows(static_cast<std::size_t>(batch));
  for (Index b = 0; b < batch; ++b)
    if (const Matrix<T>* keys = replaced(b)) {
      replaced_rows[std::size_t(b)] = detail::KVRows<S>(keys->rows(), cache.kv_heads(), d, "sink keys");
      replaced_rows[std::size_t(b)].assign(0, *keys);
    }

  // Each sequence's policies (one per head) on its (n_b, P) problem, and the keys they may see.
  const Index left = cache.window() < 0 ? -1 : cache.window() - 1;
  const Index sink_tokens = cache.sink_tokens(), sink_end = (sink_tokens + B - 1) / B * B;
  using Bound = decltype(detail::bind_mask(StreamingWindow(sink_tokens, left, Alignment::BottomRight) &
                                               OffsetMask<Mask>(mask, 0, 0, 0, 0),
                                           HeadIndex{}, 0, 0));
  std::vector<std::vector<Bound>> masks(static_cast<std::size_t>(batch));
  std::vector<KeyRange> seen(static_cast<std::size_t>(batch));
  Index max_queries = 0;
  for (Index b = 0; b < batch; ++b) {
    const Index seq = sequences[std::size_t(b)], n = rows.length(b);
    ATTEND_CHECK(cache.contains(seq), "sequences[" + std::to_string(b) + "] = " + std::to_string(seq) +
                                          " is not in the paged KV cache");
    const Index length = cache.length(seq), first = cache.first_position(seq);
    ATTEND_CHECK(n <= length, "sequence " + std::to_string(seq) + " has " + std::to_string(n) +
                                  " queries but holds only " + std::to_string(length) + " positions");
    ATTEND_CHECK(left < 0 || first <= std::max(Index(0), length - n - left) || first <= sink_end,
                 "sequence " + std::to_string(seq) + " holds positions from " + std::to_string(first) + ", but its " +
                     std::to_string(n) + " queries at [" + std::to_string(length - n) + ", " + std::to_string(length) +
                     ") see positions from " + std::to_string(std::max(Index(0), length - n - left)) +
                     " (window=" + std::to_string(cache.window()) + "): append a step's tokens in one call");
    max_queries = std::max(max_queries, n);
    const auto absolute = StreamingWindow(sink_tokens, left, Alignment::BottomRight) &
                          OffsetMask<Mask>(mask, length - n, 0, length, length);
    KeyRange r{length, 0};
    for (Index h = 0; h < heads; ++h) {
      masks[std::size_t(b)].push_back(detail::bind_mask(absolute, HeadIndex{b, h, batch, heads}, n, length));
      const KeyRange k = masks[std::size_t(b)].back().keys(0, n);
      if (k.begin < k.end) r = {std::min(r.begin, k.begin), std::max(r.end, k.end)};
    }
    seen[std::size_t(b)] = r.begin < r.end ? r : KeyRange{0, 0};
  }

  // Work items: splits of whole blocks of each sequence's visible keys, in (sequence, split)
  // order, skipping released blocks (a StreamingLLM sequence's gap; the masks hide it).
  const Index split_blocks = std::max(Index(1), (options.block_k > 0 ? options.block_k : detail::kDecodeSplitKeys) / B);
  struct Item {
    Index b, k0, n, part;  // sequence of the call, first key, keys, first row of its partial
  };
  std::vector<Item> items;
  std::vector<Index> first_item(std::size_t(batch) + 1, 0);
  Index part_rows = 0;
  for (Index b = 0; b < batch; ++b) {
    const KeyRange r = seen[std::size_t(b)];
    const std::vector<Index>& table = cache.block_table(sequences[std::size_t(b)]);
    for (Index k0 = r.begin; k0 < r.end;) {
      if (table[std::size_t(k0 / B)] < 0) {  // released: on to the next block
        k0 = (k0 / B + 1) * B;
        continue;
      }
      Index k1 = std::min(r.end, (k0 / B / split_blocks + 1) * split_blocks * B);
      for (Index block = k0 / B + 1; block * B < k1; ++block)
        if (table[std::size_t(block)] < 0) k1 = block * B;
      if (k0 < replaced_count(b)) k1 = std::min(k1, replaced_count(b));
      items.push_back({b, k0, k1 - k0, part_rows});
      part_rows += rows.length(b) * heads;
      k0 = k1;
    }
    first_item[std::size_t(b) + 1] = Index(items.size());
  }
  Matrix<C> q_scaled(q.rows(), heads * d);  // (rows, H d): the sequences' rows, scaled
  for (Index b = 0; b < batch; ++b)
    if (rows.length(b) > 0)
      q_scaled.middleRows(rows.begin(b), rows.length(b)) =
          scale * q.middleRows(rows.begin(b), rows.length(b)).template cast<C>();
  std::optional<detail::RoundedQueries> rounded;  // options.quantize_queries over a q8_0 cache
  if constexpr (std::is_same_v<S, Q8_0>)
    if (options.quantize_queries) rounded.emplace(q_scaled, heads, d);
  const detail::Q8Queries rounded_rows = rounded ? rounded->kernel_view() : detail::Q8Queries{};
  Matrix<C> part_out(part_rows, dv);
  Vector<C> part_lse(part_rows);
  const detail::KVRows<S>&pool_keys = cache.key_rows(), &pool_values = cache.value_rows();
  const Index k_stride = pool_keys.stride(), v_stride = pool_values.stride();
  detail::parallel_for_with_scratch(
      Index(items.size()), [&] { return Matrix<C>(max_queries * heads, split_blocks * B); },
      [&](Index c, Matrix<C>& scores) {
        const Item& item = items[std::size_t(c)];
        const Index seq = sequences[std::size_t(item.b)], n = rows.length(item.b);
        const std::vector<Index>& table = cache.block_table(seq);
        const detail::KVRows<S>& keys = replaced_rows[std::size_t(item.b)];
        const Index replaced_keys = replaced_count(item.b);  // s: query row r's at rows [r s, (r + 1) s) of keys
        // The runs of the item for query rows whose replaced keys start at row `first` of keys.
        const auto runs_from = [&](Index first) {
          return [&, first](Index j) {
            const Index position = item.k0 + j, offset = position % B;
            const Index row = table[std::size_t(position / B)] * B + offset;
            if (position < replaced_keys)  // an item ends where the replaced keys do
              return detail::KeyRun<E>{keys.row(first + position), pool_values.row(row),
                                       std::min(B - offset, replaced_keys - position)};
            return detail::KeyRun<E>{pool_keys.row(row), pool_values.row(row), B - offset};
          };
        };
        const Index q0 = rows.begin(item.b);
        if (item.k0 < replaced_keys) {  // replaced sink keys: each query row reads its own
          for (Index r = 0; r < n; ++r)
            detail::decode_split_runs<C, E>(
                q_scaled.row(q0 + r).data(), 1, k_stride, v_stride, layout, masks[std::size_t(item.b)], r, item.k0,
                item.n, runs_from(r * replaced_keys), scores, part_out.middleRows(item.part + r * heads, heads),
                part_lse.segment(item.part + r * heads, heads), rounded_rows.from((q0 + r) * heads));
        } else {
          detail::decode_split_runs<C, E>(q_scaled.row(q0).data(), n, k_stride, v_stride, layout,
                                          masks[std::size_t(item.b)], 0, item.k0, item.n, runs_from(0), scores,
                                          part_out.middleRows(item.part, n * heads),
                                          part_lse.segment(item.part, n * heads), rounded_rows.from(q0 * heads));
        }
      });
  // Per sequence: merge its splits in order, then the sinks, and write its rows.
  detail::parallel_for(batch, [&](Index b) {
    const Index n = rows.length(b), begin = rows.begin(b), count = n * heads;
    const Index i0 = first_item[std::size_t(b)], i1 = first_item[std::size_t(b) + 1];
    constexpr C kNegInf = -std::numeric_limits<C>::infinity();
    Matrix<C> merged(count, dv);  // (n H, d_v): no split is no key seen, zeros and lse -inf
    Vector<C> merged_lse(count);
    if (i0 == i1) {
      merged.setZero();
      merged_lse.setConstant(kNegInf);
    } else {
      merged = part_out.middleRows(items[std::size_t(i0)].part, count);
      merged_lse = part_lse.segment(items[std::size_t(i0)].part, count);
    }
    for (Index i = i0 + 1; i < i1; ++i)
      merge_partial_into<C>(merged, merged_lse, part_out.middleRows(items[std::size_t(i)].part, count),
                            part_lse.segment(items[std::size_t(i)].part, count));
    for (Index r = 0; r < n; ++r)
      for (Index h = 0; h < heads; ++h) {
        const Index row = r * heads + h;
        if (sinks.size() != 0)
          detail::merge_sink_into<C>(merged.middleRows(row, 1), merged_lse.segment(row, 1), C(sinks(h)));
        out.row(begin + r).segment(h * dv, dv) = merged.row(row).template cast<T>();
        if (lse.size() != 0) lse(begin + r, h) = T(merged_lse(row));
      }
  });
}

/// Batched decoding without a mask beyond the cache's causality and window. See the overload
/// with a mask.
template <class S, class DQ>
void paged_attention_into(const PagedKVCache<S>& cache, const std::vector<Index>& sequences, const SequenceRows& rows,
                          const Eigen::MatrixBase<DQ>& q, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                          const AttentionOptions& options = {}) {
  paged_attention_into(cache, sequences, rows, q, num_heads, out, NoMask{}, options);
}

/// One decoding step of many sequences: appends each sequence's new K/V rows
/// (k_new.middleRows(rows.begin(b), n_b), likewise v_new) to `cache`, then runs
/// paged_attention_into. A sequence may appear once. With a window, each sequence then releases
/// the blocks no later token can see. Chunked prefill is a step whose n_b is the chunk's length.
///
/// \param k_new (rows, H_kv d), v_new (rows, H_kv d_v) the new tokens' keys and values
/// \throws attend::invalid_argument as paged_attention_into and append, on a sequence listed
///         twice, or when the pool cannot hold every append; std::bad_alloc when memory runs out.
///         The cache is then unchanged, whatever throws and wherever (the appends are undone).
template <class S, class DQ, class DK, class DV, class Mask>
void paged_decode_step_into(PagedKVCache<S>& cache, const std::vector<Index>& sequences, const SequenceRows& rows,
                            const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k_new,
                            const Eigen::MatrixBase<DV>& v_new, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                            const MaskBase<Mask>& mask, const AttentionOptions& options = {},
                            const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>(),
                            const std::vector<Matrix<typename DQ::Scalar>>* sink_keys = nullptr) {
  static_assert(detail::supported_scalars<DQ, DK, DV> && detail::kv_query<S, typename DQ::Scalar>);
  const Index batch = Index(sequences.size());
  ATTEND_CHECK(rows.size() == batch && rows.rows_used() <= k_new.rows() && k_new.rows() == v_new.rows(),
               "k_new " + detail::shape_of(k_new) + " and v_new " + detail::shape_of(v_new) + " must hold the rows of " +
                   std::to_string(batch) + " sequences (" + std::to_string(rows.rows_used()) + " rows)");
  std::vector<Index> sorted = sequences;
  std::sort(sorted.begin(), sorted.end());
  const auto repeated = std::adjacent_find(sorted.begin(), sorted.end());
  ATTEND_CHECK(repeated == sorted.end(), "sequence " + std::to_string(repeated == sorted.end() ? 0 : *repeated) +
                                             " is listed twice in a decode step");
  detail::UndoablePagedAppend<S> appended(cache);
  for (Index b = 0; b < batch; ++b)
    appended.append(sequences[std::size_t(b)], k_new.middleRows(rows.begin(b), rows.length(b)),
                    v_new.middleRows(rows.begin(b), rows.length(b)));
  paged_attention_into(cache, sequences, rows, q, num_heads, out, mask, options, sinks,
                       detail::no_matrix<typename DQ::Scalar>(), sink_keys);
  appended.commit();
}

/// One decoding step of many sequences without a mask beyond the cache's. See the overload with
/// a mask.
template <class S, class DQ, class DK, class DV>
void paged_decode_step_into(PagedKVCache<S>& cache, const std::vector<Index>& sequences, const SequenceRows& rows,
                            const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k_new,
                            const Eigen::MatrixBase<DV>& v_new, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                            const AttentionOptions& options = {}) {
  paged_decode_step_into(cache, sequences, rows, q, k_new, v_new, num_heads, out, NoMask{}, options);
}

/// One decoding step of a MultiHeadAttention layer for many sequences: sequence b's new tokens
/// x.middleRows(rows.begin(b), n_b) (n_b = rows.length(b); a prompt chunk or generated tokens)
/// are projected, their queries and keys rotated at positions cache.length(sequences[b]) + i when
/// the layer has a rotary embedding, appended, and attend as paged_decode_step_into does; the
/// outputs are projected by W_o. Each sequence's rows equal layer.forward(sequence, Causal() &
/// mask) (Window(w - 1, 0) & mask for a cache of window w) at its positions.
///
/// StreamingLLM with rotary positions (a cache with sink_tokens s and window w): positions are
/// those within the cache, as the paper assigns them. The query at position i has s sink keys and
/// the window [i - w + 1, i]; within the cache those are positions 0..s-1 and then consecutive,
/// so window keys keep their distances i - j (their stored rotation is right) and the sink keys
/// are rotated by delta = i - w + 1 - s more (to j + delta) for the query at i, once the window
/// has left them (delta > 0). A chunk of n tokens (chunked prefill) works the same way: each of
/// its queries gets its own rotated copy of the s sink keys (n s keys, read only in the splits of
/// the sink blocks; paged_attention_into's sink_keys), the window keys and the chunk's own keys
/// serving every query at once, so a chunk equals its tokens decoded one per step.
///
/// A bf16 or half layer queries the pool as decode_step(layer, cache, x) does: in its own scalar,
/// or in float for a pool of another format.
///
/// \param x (rows, E_q) the new tokens of every sequence
/// \return (rows, E_out); rows in no sequence hold W_o 0 + b_o
/// \throws attend::invalid_argument when the cache's heads or widths do not match the layer's, and
///         as paged_decode_step_into (the cache is then unchanged).
template <class T, class S, class DX, class Mask>
Matrix<T> paged_decode_step(const MultiHeadAttention<T>& layer, PagedKVCache<S>& cache,
                            const std::vector<Index>& sequences, const SequenceRows& rows,
                            const Eigen::MatrixBase<DX>& x, const MaskBase<Mask>& mask,
                            const AttentionOptions& options = {},
                            const Eigen::Ref<const Vector<typename DX::Scalar>>& sinks = Vector<typename DX::Scalar>()) {
  using Q = detail::layer_query_t<S, T>;
  static_assert(detail::supported_scalars<T, DX> && detail::kv_query<S, Q>);
  ATTEND_CHECK(cache.kv_heads() == layer.num_kv_heads() && cache.head_dim() == layer.head_dim() &&
                   cache.value_head_dim() == layer.value_head_dim(),
               "a paged cache of kv_heads=" + std::to_string(cache.kv_heads()) + ", head_dim=" +
                   std::to_string(cache.head_dim()) + ", value_head_dim=" + std::to_string(cache.value_head_dim()) +
                   " for a layer of num_kv_heads=" + std::to_string(layer.num_kv_heads()) + ", head_dim=" +
                   std::to_string(layer.head_dim()) + ", value_head_dim=" + std::to_string(layer.value_head_dim()));
  ATTEND_CHECK(rows.size() == Index(sequences.size()) && rows.rows_used() <= x.rows(),
               "x " + detail::shape_of(x) + " must hold the rows of " + std::to_string(sequences.size()) +
                   " sequences (" + std::to_string(rows.rows_used()) + " rows)");
  const detail::ThreadScope threads(options.num_threads);  // for the projections too
  const Index heads = layer.num_heads();
  Matrix<T> q = Matrix<T>::Zero(x.rows(), heads * layer.head_dim());
  Matrix<T> k = Matrix<T>::Zero(x.rows(), layer.num_kv_heads() * layer.head_dim());
  Matrix<T> v = layer.project_value(x);
  for (Index b = 0; b < rows.size(); ++b) {
    const Index seq = sequences[std::size_t(b)], begin = rows.begin(b), n = rows.length(b);
    ATTEND_CHECK(cache.contains(seq), "sequences[" + std::to_string(b) + "] = " + std::to_string(seq) +
                                          " is not in the paged KV cache");
    q.middleRows(begin, n) = layer.project_query(x.middleRows(begin, n), cache.length(seq));
    k.middleRows(begin, n) = layer.project_key(x.middleRows(begin, n), cache.length(seq));
  }
  // StreamingLLM: the sink keys at their positions within the cache (see above).
  std::vector<Matrix<Q>> sink_keys;
  const auto* rope = layer.rotary();
  if (cache.sink_tokens() > 0 && rope != nullptr) {
    ATTEND_CHECK(rope->attention_factor() == 1.0,
                 "StreamingLLM positions within the cache re-rotate the sink keys, which YaRN's attention factor " +
                     detail::number_string(rope->attention_factor()) + " would scale twice");
    sink_keys.resize(sequences.size());
    const Index sinks_held = cache.sink_tokens(), w = cache.window(), B = cache.block_size();
    const Index width = cache.kv_heads() * cache.head_dim();
    for (Index b = 0; b < rows.size(); ++b) {
      const Index seq = sequences[std::size_t(b)], begin = rows.begin(b), n = rows.length(b);
      const Index length = cache.length(seq);  // the position of the step's first token
      const auto delta = [&](Index r) { return length + r - w + 1 - sinks_held; };  // of query row r
      if (n == 0 || delta(n - 1) <= 0) continue;  // no query's window has left the sinks: none moves
      // The sink keys as the pool stores them (dequantized): from the pool, or, for positions of
      // this step's chunk (a prompt longer than s + w), as the append will store them. (Every
      // sink position is held: delta(n - 1) > 0 puts the last token at or past s + w - 1.)
      Matrix<Q> stored(sinks_held, width);
      const std::vector<Index>& table = cache.block_table(seq);
      const Index held = std::min(length, sinks_held);
      for (Index t = 0; t < held; ++t)
        stored.row(t) = cache.key_rows().read(table[std::size_t(t / B)] * B + t % B, 1).template cast<Q>();
      if (held < sinks_held) {
        detail::KVRows<S> chunk(sinks_held - held, cache.kv_heads(), cache.head_dim(), "sink keys");
        chunk.assign(0, k.middleRows(begin, sinks_held - held).template cast<Q>());
        stored.bottomRows(sinks_held - held) = chunk.read(0, sinks_held - held).template cast<Q>();
      }
      // Query row r's: rotated by delta(r) more once its window has left them (stored in the
      // pool's format again by paged_attention_into).
      Matrix<Q>& keys = sink_keys[std::size_t(b)];
      keys.resize(n * sinks_held, width);
      for (Index r = 0; r < n; ++r) {
        keys.middleRows(r * sinks_held, sinks_held) = stored;
        if (delta(r) > 0)
          rope->apply(keys.middleRows(r * sinks_held, sinks_held), Vector<Index>::Constant(sinks_held, delta(r)));
      }
    }
  }
  Matrix<Q> heads_out = Matrix<Q>::Zero(x.rows(), heads * layer.value_head_dim());
  paged_decode_step_into(cache, sequences, rows, detail::in_scalar<Q>(q), detail::in_scalar<Q>(k),
                         detail::in_scalar<Q>(v), heads, heads_out, mask, options, detail::in_scalar<Q>(sinks),
                         sink_keys.empty() ? nullptr : &sink_keys);
  return layer.project_output(detail::in_scalar<T>(heads_out));
}

/// A decoding step of a layer for many sequences without a mask beyond the cache's. See the
/// overload with a mask.
template <class T, class S, class DX>
Matrix<T> paged_decode_step(const MultiHeadAttention<T>& layer, PagedKVCache<S>& cache,
                            const std::vector<Index>& sequences, const SequenceRows& rows,
                            const Eigen::MatrixBase<DX>& x, const AttentionOptions& options = {}) {
  return paged_decode_step(layer, cache, sequences, rows, x, NoMask{}, options);
}

}  // namespace attend
