// SPDX-License-Identifier: MIT
// Paged KV cache and batched decoding: the pool's bookkeeping (blocks, tables, reference counts,
// copy on write, truncation, windows, errors that leave it unchanged), and batched decode steps
// of many sequences checked against the long-double reference of each whole sequence, against
// each sequence decoded alone (bitwise), against the contiguous cache, and across thread counts;
// attention sinks against their formula.
#include <attend/attention/kv_cache.hpp>
#include <attend/attention/paged_kv_cache.hpp>
#include <attend/biases.hpp>
#include <attend/custom.hpp>

#include "support/baseline.hpp"
#include "support/expect.hpp"
#include "support/head_policy_reference.hpp"
#include "support/masks.hpp"
#include "support/multi_head_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/sinks_reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace attend::test {
namespace {

using attend::test::expect_invalid;

TEST(PagedKVCache, AppendFillsBlocksInOrderAndTheTableAddressesThem) {
  ATTEND_SEEDED_RNG(rng);
  PagedKVCache<double> cache(8, 2, 3, {4, -1, 5});
  EXPECT_EQ(cache.free_blocks(), 8);
  const Index s = cache.add_sequence(), t = cache.add_sequence();
  const Matrix<double> k = rng.normal<double>(11, 6), v = rng.normal<double>(11, 10);
  cache.append(s, k.topRows(3), v.topRows(3));
  cache.append(t, k.topRows(1), v.topRows(1));
  cache.append(s, k.middleRows(3, 8), v.middleRows(3, 8));  // crosses two block boundaries
  EXPECT_EQ(cache.length(s), 11);
  EXPECT_EQ(cache.block_table(s).size(), 3u);
  EXPECT_EQ(cache.free_blocks(), 4);
  EXPECT_EQ(cache.gather_keys(s), k);
  EXPECT_EQ(cache.gather_values(s), v);
  for (Index position = 0; position < 11; ++position) {  // vLLM's addressing
    const Index row = cache.block_table(s)[std::size_t(position / 4)] * 4 + position % 4;
    EXPECT_EQ(Matrix<double>(cache.keys().row(row)), Matrix<double>(k.row(position)));
  }
  cache.free_sequence(s);
  EXPECT_EQ(cache.free_blocks(), 7);
  EXPECT_FALSE(cache.contains(s));
  EXPECT_EQ(cache.add_sequence(), s) << "the lowest free id is reused";
}

TEST(PagedKVCache, ForksShareBlocksAndCopyOnlyTheSharedLastBlockOnAppend) {
  ATTEND_SEEDED_RNG(rng);
  PagedKVCache<float> cache(10, 1, 4, {4});
  const Matrix<float> k = rng.normal<float>(20, 4), v = rng.normal<float>(20, 4);
  const Index a = cache.add_sequence();
  cache.append(a, k.topRows(6), v.topRows(6));  // blocks: 4 full + 2 of 4
  const Index b = cache.fork(a);
  EXPECT_EQ(cache.free_blocks(), 8) << "a fork takes no block";
  for (Index p : cache.block_table(a)) EXPECT_EQ(cache.ref_count(p), 2);
  cache.append(b, k.middleRows(6, 1), v.middleRows(6, 1));  // copy on write of the last block
  EXPECT_EQ(cache.free_blocks(), 7);
  EXPECT_EQ(cache.block_table(a)[0], cache.block_table(b)[0]);
  EXPECT_NE(cache.block_table(a)[1], cache.block_table(b)[1]);
  EXPECT_EQ(cache.ref_count(cache.block_table(a)[1]), 1);
  cache.append(a, k.middleRows(10, 2), v.middleRows(10, 2));  // the original diverges in place
  EXPECT_EQ(cache.free_blocks(), 7);
  Matrix<float> expected_a(8, 4), expected_b(7, 4);
  expected_a << k.topRows(6), k.middleRows(10, 2);
  expected_b << k.topRows(7);
  EXPECT_EQ(cache.gather_keys(a), expected_a);
  EXPECT_EQ(cache.gather_keys(b), expected_b);
  // A fork at a block boundary copies nothing: the next append starts a new block.
  cache.truncate(b, 4);
  EXPECT_EQ(cache.free_blocks(), 8);
  const Index c = cache.fork(b);
  cache.append(c, k.middleRows(12, 3), v.middleRows(12, 3));
  EXPECT_EQ(cache.free_blocks(), 7);
  EXPECT_EQ(cache.ref_count(cache.block_table(c)[0]), 3);
  cache.free_sequence(a);
  cache.free_sequence(b);
  cache.free_sequence(c);
  EXPECT_EQ(cache.free_blocks(), 10);
}

TEST(PagedKVCache, FailedCallsLeaveThePoolUnchanged) {
  ATTEND_SEEDED_RNG(rng);
  PagedKVCache<double> cache(3, 2, 2, {4});
  const Matrix<double> k = rng.normal<double>(16, 4), v = rng.normal<double>(16, 4);
  const Index s = cache.add_sequence();
  cache.append(s, k.topRows(10), v.topRows(10));
  const Index f = cache.fork(s);
  expect_invalid([&] { cache.append(s, k.topRows(3), v.topRows(3)); },
                 {"exhausted", "appending 3 rows to sequence 0", "needs 2 blocks", "0 free of num_blocks=3"});
  EXPECT_EQ(cache.length(s), 10);
  EXPECT_EQ(cache.gather_keys(s), Matrix<double>(k.topRows(10)));
  EXPECT_EQ(cache.ref_count(cache.block_table(s)[2]), 2);
  expect_invalid([&] { cache.append(7, k.topRows(1), v.topRows(1)); }, {"sequence 7 is not in the paged KV cache"});
  expect_invalid([&] { cache.append(s, k.topRows(1).leftCols(3), v.topRows(1)); }, {"(1 x 3)", "(n x 4)"});
  expect_invalid([&] { cache.truncate(f, 11); }, {"truncate(sequence 1, 11)", "[0, length=10]"});
  expect_invalid([&] { cache.fork(5); }, {"sequence 5"});
  expect_invalid([&] { PagedKVCache<float>(4, 1, 8, {0}); }, {"block_size=0", "must be at least 1 key per block"});
  expect_invalid([&] { PagedKVCache<float>(4, 1, 8, {-16}); }, {"block_size=-16", "must be at least 1 key per block"});
  expect_invalid([&] { PagedKVCache<float>(4, 1, 8, {16, 0}); }, {"window=0"});
  cache.truncate(f, 2);
  EXPECT_EQ(cache.free_blocks(), 0) << "the truncated blocks are still held by the original";
  cache.free_sequence(s);
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_EQ(cache.gather_keys(f), Matrix<double>(k.topRows(2)));
}

// A windowed layer's sequences hold window-sized memory whatever their length.
TEST(PagedKVCache, WindowedSequencesHoldWindowSizedMemory) {
  ATTEND_SEEDED_RNG(rng);
  const Index window = 10, block = 4, len = 200;
  PagedKVCache<float> cache(2 * 5, 1, 4, {block, window});
  const Matrix<float> k = rng.normal<float>(len, 4), v = rng.normal<float>(len, 4);
  const Index a = cache.add_sequence(), b = cache.add_sequence();
  for (Index t = 0; t < len; ++t) {
    cache.append(a, k.row(t), v.row(t));
    cache.append(b, k.row(t), v.row(t));
    ASSERT_LE(cache.held_blocks(a), (window - 1 + 1 + block - 1) / block + 1);
    ASSERT_LE(cache.first_position(a), std::max(Index(0), t - window + 1));
  }
  const Matrix<float> held = cache.gather_keys(a);
  EXPECT_EQ(held, Matrix<float>(k.bottomRows(held.rows())));
  expect_invalid([&] { cache.truncate(a, len - 8); }, {"sees positions from 183", "holds positions from 188"});
  cache.truncate(a, len - 2);
  EXPECT_EQ(cache.length(a), len - 2);
}

/// A sequence of a serving test: its whole token rows, and the outputs decoded so far.
template <class T>
struct Stream {
  Matrix<T> q, k, v;  // (L, H d), (L, H_kv d), (L, H_kv d_v)
  Matrix<T> out;      // (L, H d_v)
  Index id = -1, done = 0;
};

template <class T>
Stream<T> make_stream(Rng& rng, Index length, Index heads, Index kv_heads, Index d, Index dv) {
  Stream<T> s;
  s.q = rng.normal<T>(length, heads * d);
  s.k = rng.normal<T>(length, kv_heads * d);
  s.v = rng.normal<T>(length, kv_heads * dv);
  s.out = Matrix<T>::Zero(length, heads * dv);
  return s;
}

/// Decodes every stream to its end in batched steps: in round r, stream i takes
/// steps(i, r) tokens (at least 1, at most what is left; none once finished), all in one
/// paged_decode_step_into.
template <class T, class Mask = NoMask>
void decode_batched(PagedKVCache<T>& cache, std::vector<Stream<T>*> streams, Index heads,
                    const std::function<Index(std::size_t, Index)>& steps, const AttentionOptions& options = {},
                    const Mask& mask = {}, const Vector<T>& sinks = Vector<T>()) {
  for (Stream<T>* s : streams)
    if (s->id < 0) s->id = cache.add_sequence();
  for (Index round = 0;; ++round) {
    // Every stream takes part in every call (finished ones with no query), so that stream i is
    // sequence i of each call (HeadIndex::batch).
    std::vector<Index> ids, offsets{0}, counts;
    std::vector<Stream<T>*> active;
    bool any = false;
    for (std::size_t i = 0; i < streams.size(); ++i) {
      Stream<T>& s = *streams[i];
      const Index left = s.q.rows() - s.done;
      const Index n = left == 0 ? 0 : std::min(std::max(Index(1), steps(i, round)), left);
      any = any || n > 0;
      ids.push_back(s.id);
      counts.push_back(n);
      offsets.push_back(offsets.back() + n);
      active.push_back(&s);
    }
    if (!any) return;
    const Index total = offsets.back(), dk = cache.kv_heads() * cache.head_dim();
    Matrix<T> q(total, active[0]->q.cols()), k(total, dk), v(total, cache.kv_heads() * cache.value_head_dim());
    for (std::size_t b = 0; b < active.size(); ++b) {
      q.middleRows(offsets[b], counts[b]) = active[b]->q.middleRows(active[b]->done, counts[b]);
      k.middleRows(offsets[b], counts[b]) = active[b]->k.middleRows(active[b]->done, counts[b]);
      v.middleRows(offsets[b], counts[b]) = active[b]->v.middleRows(active[b]->done, counts[b]);
    }
    Matrix<T> out(total, active[0]->out.cols());
    paged_decode_step_into(cache, ids, SequenceRows::packed(offsets), q, k, v, heads, out, mask, options, sinks);
    for (std::size_t b = 0; b < active.size(); ++b) {
      active[b]->out.middleRows(active[b]->done, counts[b]) = out.middleRows(offsets[b], counts[b]);
      active[b]->done += counts[b];
    }
  }
}

/// Every head of s.out against the long-double reference of the whole sequence with causal
/// attention within `window` keys (-1: unbounded), and the bias and extra visibility of `policy`.
template <class T>
void expect_stream_matches_reference(const Stream<T>& s, Index heads, Index window,
                                     const std::function<void(Index h, BoolMatrix&, RealMatrix&)>& policy = {}) {
  const Index len = s.q.rows();
  HeadPolicies expected;
  for (Index h = 0; h < heads; ++h) {
    BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
    RealMatrix bias = RealMatrix::Zero(len, len);
    if (policy) policy(h, visible, bias);
    expected.visible.push_back(visible);
    expected.bias.push_back(bias);
  }
  const Index d = s.q.cols() / heads;
  expect_heads_match_reference<T>(s.q, s.k, s.v, heads, s.out, expected, 1 / std::sqrt(Real(d)));
}

template <class T>
class PagedDecodeTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(PagedDecodeTest, Scalars);

// Sequences of different lengths decoded together, one token or a few (speculative
// verification, prefill chunks) per step, with block sizes that do and do not divide the
// lengths, with and without grouped-query heads, equal the reference of each whole sequence.
TYPED_TEST(PagedDecodeTest, BatchedStepsEqualFullCausalAttentionOfEachSequence) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const Index block : {Index(16), Index(5)})
    for (const Index kv_heads : {Index(2), Index(4)}) {
      SCOPED_TRACE("block " + std::to_string(block) + ", kv_heads " + std::to_string(kv_heads));
      const Index heads = 4, d = 8, dv = 6;
      PagedKVCache<T> cache(64, kv_heads, d, {block, -1, dv});
      std::vector<Stream<T>> streams;
      for (const Index len : {37, 1, 64, 80, 23}) streams.push_back(make_stream<T>(rng, len, heads, kv_heads, d, dv));
      std::vector<Stream<T>*> all;
      for (auto& s : streams) all.push_back(&s);
      AttentionOptions o;
      o.block_k = 2 * block;  // several splits per sequence
      decode_batched<T>(cache, all, heads, [](std::size_t i, Index r) { return r < 2 ? Index(7 + i) : Index(1 + (r + i) % 3); }, o);
      for (const auto& s : streams) expect_stream_matches_reference<T>(s, heads, -1);
    }
}

// Any block size of at least one key: 1, vLLM's 16 and 256, with lengths that do not divide
// (300 = 18 blocks of 16 + 12, 256 + 44), causal and with a window (whose sequences hold
// window-sized memory), decoded in prefill chunks and single tokens, equal the reference.
TYPED_TEST(PagedDecodeTest, BlockSizesFromOneTo256KeysWork) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8;
  const std::vector<Index> lengths{300, 37, 5};
  for (const Index block : {Index(1), Index(16), Index(256)})
    for (const Index window : {Index(-1), Index(40)}) {
      SCOPED_TRACE("block " + std::to_string(block) + ", window " + std::to_string(window));
      Index blocks = 0;
      for (Index len : lengths) blocks += (len + block - 1) / block + 1;
      PagedKVCache<T> cache(blocks, kv_heads, d, {block, window});
      EXPECT_EQ(cache.block_size(), block);
      std::vector<Stream<T>> streams;
      for (Index len : lengths) streams.push_back(make_stream<T>(rng, len, heads, kv_heads, d, d));
      std::vector<Stream<T>*> all;
      for (auto& st : streams) all.push_back(&st);
      AttentionOptions o;
      o.block_k = 64;  // splits of max(1, 64 / B) blocks
      decode_batched<T>(cache, all, heads, [](std::size_t i, Index r) { return r == 0 ? Index(20 + i) : Index(1 + r % 3); },
                        o);
      for (const auto& st : streams) {
        expect_stream_matches_reference<T>(st, heads, window);
        if (window > 0) {
          EXPECT_LE(cache.held_blocks(st.id), (window - 1 + 3 + block - 1) / block + 1);
        }
        EXPECT_EQ(Index(cache.block_table(st.id).size()), (st.q.rows() + block - 1) / block);
      }
    }
}

// Each sequence of a batched call gets bitwise what a call with it alone gets, for any thread
// count; with 256-key blocks the one-token step is bitwise the contiguous cache's.
TYPED_TEST(PagedDecodeTest, BatchIsBitwiseEachSequenceAloneAndThreadInvariant) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 8, kv_heads = 2, d = 16, block = 32;
  const std::vector<Index> lengths{300, 17, 129, 64};
  PagedKVCache<T> cache(40, kv_heads, d, {block});
  std::vector<Index> ids, offsets{0};
  for (Index len : lengths) {
    ids.push_back(cache.add_sequence());
    cache.append(ids.back(), rng.normal<T>(len, kv_heads * d), rng.normal<T>(len, kv_heads * d));
    offsets.push_back(offsets.back() + 2);  // two queries each: the last two positions
  }
  const Matrix<T> q = rng.normal<T>(offsets.back(), heads * d);
  const Vector<T> sinks = rng.normal<T>(heads, 1);
  const auto run = [&](int threads) {
    AttentionOptions o;
    o.num_threads = threads;
    o.block_k = 64;
    Matrix<T> out(q.rows(), heads * d), lse(q.rows(), heads);
    paged_attention_into(cache, ids, SequenceRows::packed(offsets), q, heads, out, Alibi::for_heads(heads), o, sinks, lse);
    return std::make_pair(out, lse);
  };
  const auto one = run(1);
  for (int threads : {2, 3}) {
    const auto many = run(threads);
    EXPECT_TRUE(identical(many.first, one.first)) << threads << " threads";
    EXPECT_TRUE(identical(many.second, one.second)) << threads << " threads";
  }
  for (std::size_t b = 0; b < ids.size(); ++b) {
    AttentionOptions o;
    o.block_k = 64;
    Matrix<T> out(2, heads * d), lse(2, heads);
    paged_attention_into(cache, {ids[b]}, SequenceRows::uniform(1, 2), q.middleRows(offsets[b], 2), heads, out,
                         Alibi::for_heads(heads), o, sinks, lse);
    EXPECT_TRUE(identical(out, one.first.middleRows(offsets[b], 2))) << "sequence " << b;
    EXPECT_TRUE(identical(lse, one.second.middleRows(offsets[b], 2))) << "sequence " << b;
  }
  // One token over 256-key blocks: the contiguous cache's splits, bitwise.
  PagedKVCache<T> paged(8, kv_heads, d, {256});
  KVCache<T> contiguous(700, kv_heads, d);
  const Matrix<T> k = rng.normal<T>(700, kv_heads * d), v = rng.normal<T>(700, kv_heads * d);
  const Index s = paged.add_sequence();
  paged.append(s, k.topRows(699), v.topRows(699));
  contiguous.append(k.topRows(699), v.topRows(699));
  Matrix<T> paged_out(1, heads * d);
  paged_decode_step_into(paged, {s}, SequenceRows::uniform(1, 1), q.topRows(1), k.bottomRows(1), v.bottomRows(1), heads,
                         paged_out);
  const Matrix<T> contiguous_out = decode_step(contiguous, q.topRows(1), k.bottomRows(1), v.bottomRows(1), heads);
  EXPECT_TRUE(identical(paged_out, contiguous_out));
}

// Forks that diverge (beam search), a sequence finishing early whose blocks are reused,
// rollbacks followed by new appends (speculative decoding), and a sliding-window layer, all
// against the reference of each final sequence.
TYPED_TEST(PagedDecodeTest, ForksRollbacksAndWindowsEqualTheReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 1, d = 8, block = 6;
  for (const Index window : {Index(-1), Index(9)}) {
    SCOPED_TRACE("window " + std::to_string(window));
    PagedKVCache<T> cache(window < 0 ? 40 : 14, kv_heads, d, {block, window});
    // A prompt, forked after 20 tokens into two continuations of 15 tokens.
    Stream<T> trunk = make_stream<T>(rng, 20, heads, kv_heads, d, d);
    decode_batched<T>(cache, {&trunk}, heads, [](std::size_t, Index) { return Index(7); });
    const Index branch_id = cache.fork(trunk.id);
    std::vector<Stream<T>> branches(2);
    for (Stream<T>& b : branches) {
      b = make_stream<T>(rng, 35, heads, kv_heads, d, d);
      b.q.topRows(20) = trunk.q;
      b.k.topRows(20) = trunk.k;
      b.v.topRows(20) = trunk.v;
      b.out.topRows(20) = trunk.out;
      b.done = 20;
    }
    branches[0].id = trunk.id;
    branches[1].id = branch_id;
    // Speculative decoding on branch 0: 4 drafted tokens, 2 accepted, rolled back, repeated.
    Stream<T>& spec = branches[0];
    for (int round = 0; round < 3; ++round) {
      const Index p = spec.done;
      const Matrix<T> draft_k = rng.normal<T>(4, kv_heads * d), draft_v = rng.normal<T>(4, kv_heads * d);
      Matrix<T> out(4, heads * d);
      paged_decode_step_into(cache, {spec.id}, SequenceRows::uniform(1, 4), rng.normal<T>(4, heads * d), draft_k,
                             draft_v, heads, out);
      cache.truncate(spec.id, p + 2);  // keep two: make them the stream's tokens
      spec.k.middleRows(p, 2) = draft_k.topRows(2);
      spec.v.middleRows(p, 2) = draft_v.topRows(2);
      cache.truncate(spec.id, p);  // and recompute them with the stream's queries below
      Matrix<T> again(2, heads * d);
      paged_decode_step_into(cache, {spec.id}, SequenceRows::uniform(1, 2), spec.q.middleRows(p, 2),
                             spec.k.middleRows(p, 2), spec.v.middleRows(p, 2), heads, again);
      spec.out.middleRows(p, 2) = again;
      spec.done += 2;
    }
    decode_batched<T>(cache, {&branches[0], &branches[1]}, heads, [](std::size_t i, Index) { return Index(1 + i); });
    for (const auto& b : branches) expect_stream_matches_reference<T>(b, heads, window);
    // A sequence that finished frees its blocks, and a new one reuses them.
    cache.free_sequence(branches[1].id);
    Stream<T> late = make_stream<T>(rng, 30, heads, kv_heads, d, d);
    decode_batched<T>(cache, {&late}, heads, [](std::size_t, Index r) { return r == 0 ? Index(11) : Index(1); });
    expect_stream_matches_reference<T>(late, heads, window);
  }
}

// StreamingLLM: the first n tokens stay held and visible, the rest is a sliding window; a
// sequence holds the sink blocks and window-sized memory, and decodes as the whole sequence with
// that visibility (absolute positions).
TYPED_TEST(PagedDecodeTest, StreamingLLMKeepsTheFirstTokensAndAWindow) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, block = 4, window = 8, sinks = 3;
  PagedKVCache<T> cache(16, kv_heads, d, {block, window, 0, sinks});
  std::vector<Stream<T>> streams;
  for (const Index len : {60, 41}) streams.push_back(make_stream<T>(rng, len, heads, kv_heads, d, d));
  std::vector<Stream<T>*> all;
  for (auto& s : streams) all.push_back(&s);
  AttentionOptions o;
  o.block_k = 8;
  decode_batched<T>(cache, all, heads, [](std::size_t i, Index r) { return r == 0 ? Index(5 + i) : Index(1 + r % 2); }, o);
  for (const auto& s : streams) {
    expect_stream_matches_reference<T>(s, heads, -1, [&](Index, BoolMatrix& visible, RealMatrix&) {
      for (Index i = 0; i < visible.rows(); ++i)
        for (Index j = 0; j <= i; ++j) visible(i, j) = j < sinks || i - j < window;
    });
    EXPECT_LE(cache.held_blocks(s.id), 1 + (window - 1 + 2 + block - 1) / block + 1);
    EXPECT_EQ(cache.block_table(s.id)[0] >= 0, true) << "the sink block stays";
  }
  // The mask alone, on both full paths (the blocked one skips and classifies 8 x 8 tiles with
  // it), gives the same visibility.
  const Stream<T>& s = streams[0];
  for (const Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
    AttentionOptions full_options;
    full_options.algorithm = algorithm;
    full_options.block_q = full_options.block_k = 8;
    const Matrix<T> full = multi_head_attention(s.q, s.k, s.v, heads, StreamingWindow(sinks, window - 1), full_options);
    EXPECT_LE(max_abs_error(full, s.out), 8 * hard_cap<T>());
  }
  expect_invalid([&] { PagedKVCache<T>(4, 1, 8, {16, -1, 0, 2}); }, {"sink_tokens=2", "with a window"});
}

// A layer with projections, rotary positions and grouped-query heads serving three sequences
// together through paged_decode_step (prompt chunks and single tokens in the same calls, each
// rotated at its own positions), causal and with a window, against the long-double reference of
// the layer over each whole sequence.
TYPED_TEST(PagedDecodeTest, LayerStepsEqualTheLayerOverEachWholeSequence) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{6, 2, 8, 8, 24, 24, 24, 20, true};
  const RotarySpec rotary{s.d, s.d, RotaryLayout::HalfSplit, 100.0};
  MultiHeadAttention<T> layer(s.heads, random_weights<T>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
  const std::vector<Index> lengths{23, 9, 30};
  std::vector<Matrix<T>> x;
  for (Index len : lengths) x.push_back(rng.normal<T>(len, s.eq));
  for (const Index window : {-1, 5}) {
    SCOPED_TRACE("window " + std::to_string(window));
    PagedKVCache<T> cache(layer, 40, {4, window});
    std::vector<Index> ids, done(lengths.size(), 0);
    std::vector<Matrix<T>> out;
    for (Index len : lengths) {
      ids.push_back(cache.add_sequence());
      out.push_back(Matrix<T>(len, s.eout));
    }
    for (Index call = 0;; ++call) {
      std::vector<Index> offsets{0};
      for (std::size_t b = 0; b < lengths.size(); ++b)
        offsets.push_back(offsets.back() + std::min(call == 0 ? Index(6) : Index(1 + (call + Index(b)) % 2),
                                                    lengths[b] - done[b]));
      if (offsets.back() == 0) break;
      Matrix<T> step(offsets.back(), s.eq);
      for (std::size_t b = 0; b < lengths.size(); ++b)
        step.middleRows(offsets[b], offsets[b + 1] - offsets[b]) = x[b].middleRows(done[b], offsets[b + 1] - offsets[b]);
      const Matrix<T> y = paged_decode_step(layer, cache, ids, SequenceRows::packed(offsets), step);
      for (std::size_t b = 0; b < lengths.size(); ++b) {
        out[b].middleRows(done[b], offsets[b + 1] - offsets[b]) = y.middleRows(offsets[b], offsets[b + 1] - offsets[b]);
        done[b] += offsets[b + 1] - offsets[b];
      }
    }
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      const Index len = lengths[b];
      const BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
      const Expected<T> ex = expected_mha<T>(s, layer.weights(), x[b], x[b], x[b], visible, &rotary);
      EXPECT_TRUE(within_tolerance<T>(out[b], ex.output, ex.base_output)) << "sequence " << b;
    }
  }
}

// StreamingLLM through a rotary layer uses positions within the cache, as the paper does: the
// query at position i > s + w - 1 sees the s sink tokens at positions 0..s-1 and its window at
// s..s+w-1, itself last. Checked against that recomputation written out (the cache's tokens
// projected and rotated at those positions), which differs from absolute positions; for token by
// token steps and for chunked prefill (a first chunk longer than s + w, then chunks whose window
// has left the sinks), in the same calls as another sequence.
TEST(PagedDecode, StreamingLLMRotaryLayerUsesPositionsWithinTheCache) {
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 8, 8, 16, 16, 16, 16, false};
  MultiHeadAttention<double> layer(s.heads, random_weights<double>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<double>(s.d));
  const Index sinks = 2, window = 5, len = 40;
  const Matrix<double> x = rng.normal<double>(len, s.eq), other = rng.normal<double>(len, s.eq);
  // (chunk sizes of sequence a and of the other sequence, cycled)
  const std::vector<std::pair<std::vector<Index>, std::vector<Index>>> schedules{
      {{6, 1}, {6, 1}},                 // a chunk while the window covers the sinks, then tokens
      {{1}, {3}},                       // token by token, beside chunks
      {{9, 4, 1, 3, 7, 2}, {2, 5, 1}},  // chunks from the start (9 > s + w) and across the window
  };
  for (const auto& [steps_a, steps_b] : schedules) {
    SCOPED_TRACE("first chunk of " + std::to_string(steps_a[0]) + " tokens");
    PagedKVCache<double> cache(layer, 24, {4, window, 0, sinks});
    const Index a = cache.add_sequence(), b = cache.add_sequence();
    Matrix<double> out(len, s.eout), out_other(len, s.eout);
    for (Index t = 0, u = 0, call = 0; t < len || u < len; ++call) {
      const Index n = std::min(steps_a[std::size_t(call) % steps_a.size()], len - t);
      const Index m = std::min(steps_b[std::size_t(call) % steps_b.size()], len - u);
      Matrix<double> step(n + m, s.eq);
      step << x.middleRows(t, n), other.middleRows(u, m);
      const Matrix<double> y =
          paged_decode_step(layer, cache, {a, b}, SequenceRows::packed(std::vector<Index>{0, n, n + m}), step);
      out.middleRows(t, n) = y.topRows(n);
      out_other.middleRows(u, m) = y.bottomRows(m);
      t += n;
      u += m;
    }
    double worst_absolute = 0;
    for (const bool first : {true, false}) {
      const Matrix<double>& tokens_x = first ? x : other;
      const Matrix<double>& decoded = first ? out : out_other;
      for (Index i = 0; i < len; ++i) {
        std::vector<Index> tokens, positions;  // the cache's tokens for query i, and their positions in it
        for (Index j = 0; j <= i; ++j)
          if (j < sinks || i - j < window) tokens.push_back(j);
        for (std::size_t c = 0; c < tokens.size(); ++c)
          positions.push_back(i < sinks + window ? tokens[c] : Index(c));
        Matrix<double> k(Index(tokens.size()), s.kv_heads * s.d), v(Index(tokens.size()), s.kv_heads * s.dv),
            k_absolute(Index(tokens.size()), s.kv_heads * s.d);
        for (std::size_t c = 0; c < tokens.size(); ++c) {
          k.row(Index(c)) = layer.project_key(tokens_x.row(tokens[c]), positions[c]);
          k_absolute.row(Index(c)) = layer.project_key(tokens_x.row(tokens[c]), tokens[c]);
          v.row(Index(c)) = layer.project_value(tokens_x.row(tokens[c]));
        }
        const Matrix<double> q = layer.project_query(tokens_x.row(i), positions.back());
        const Matrix<double> expected = layer.project_output(multi_head_attention(q, k, v, s.heads));
        const Matrix<double> absolute = layer.project_output(
            multi_head_attention(layer.project_query(tokens_x.row(i), i), k_absolute, v, s.heads));
        EXPECT_LE(max_abs_error(decoded.row(i), expected), 1e-12) << (first ? "a" : "b") << ", query " << i;
        worst_absolute = std::max(worst_absolute, double(max_abs_error(absolute, expected)));
      }
    }
    EXPECT_GT(worst_absolute, 1e-6) << "absolute positions would give other results";
  }
}

// Chunked prefill of StreamingLLM sequences with rotary positions in a float pool: chunks equal
// the same tokens decoded one per step (each query sees its own rotation of the sink keys), with
// learned sinks as well; and the sink keys' replacement per query row is checked on its shape.
TEST(PagedDecode, StreamingLLMChunksEqualTokenByTokenSteps) {
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 1, 8, 8, 16, 16, 16, 16, true};
  MultiHeadAttention<float> layer(s.heads, random_weights<float>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<float>(s.d));
  const Index sinks = 3, window = 6, len = 45;
  Vector<float> learned(s.heads);
  learned << 0.5f, -1.0f, 2.0f, 0.0f;
  const Matrix<float> x = rng.normal<float>(len, s.eq);
  const auto decode = [&](const std::vector<Index>& steps) {
    PagedKVCache<float> cache(layer, 12, {4, window, 0, sinks});
    const Index a = cache.add_sequence();
    Matrix<float> out(len, s.eout);
    for (Index t = 0, call = 0; t < len; ++call) {
      const Index n = std::min(steps[std::size_t(call) % steps.size()], len - t);
      out.middleRows(t, n) = paged_decode_step(layer, cache, {a}, SequenceRows::uniform(1, n), x.middleRows(t, n),
                                               NoMask{}, {}, learned);
      t += n;
    }
    EXPECT_LE(cache.held_blocks(a), 1 + (window - 1 + 11 + 3) / 4 + 1);
    return out;
  };
  const Matrix<float> one = decode({1});
  for (const std::vector<Index>& steps : {std::vector<Index>{11, 3, 1, 8}, std::vector<Index>{2, 9}}) {
    SCOPED_TRACE("first chunk of " + std::to_string(steps[0]));
    EXPECT_LE(double(max_abs_error(decode(steps), one)), 2e-6);
  }
  // paged_attention_into checks a replacement's shape: n s rows for n queries.
  PagedKVCache<float> cache(8, 1, 8, {4, window, 0, sinks});
  const Index a = cache.add_sequence();
  cache.append(a, rng.normal<float>(20, 8), rng.normal<float>(20, 8));
  const std::vector<Matrix<float>> wrong{Matrix<float>::Zero(5, 8)};
  Matrix<float> out(2, 32);
  expect_invalid([&] { paged_attention_into(cache, {a}, SequenceRows::uniform(1, 2), rng.normal<float>(2, 32), 4, out,
                                            NoMask{}, {}, Vector<float>(), detail::no_matrix<float>(), &wrong); },
                 {"sink_keys[0] (5 x 8)", "s <= sink_tokens=3", "n = 2 queries"});
}

// A layer's learned sinks through paged steps (prompt chunks and tokens of two sequences in
// the same calls) equal the long-double layer with its sinks over each whole sequence.
TYPED_TEST(PagedDecodeTest, LayerStepsWithSinksEqualTheLayerWithSinks) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 8, 8, 16, 16, 16, 16, true};
  const RotarySpec rotary{s.d, s.d, RotaryLayout::HalfSplit, 100.0};
  MultiHeadAttention<T> layer(s.heads, random_weights<T>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
  Vector<T> sinks(s.heads);
  sinks << T(2), T(-1), T(0.5), T(1);
  const std::vector<Index> lengths{19, 26};
  const std::vector<Matrix<T>> x{rng.normal<T>(lengths[0], s.eq), rng.normal<T>(lengths[1], s.eq)};
  PagedKVCache<T> cache(layer, 16, {4});
  const std::vector<Index> ids{cache.add_sequence(), cache.add_sequence()};
  std::vector<Matrix<T>> out{Matrix<T>(lengths[0], s.eout), Matrix<T>(lengths[1], s.eout)};
  for (Index call = 0, t0 = 0, t1 = 0; t0 < lengths[0] || t1 < lengths[1]; ++call) {
    const Index n0 = std::min(call == 0 ? Index(7) : Index(1), lengths[0] - t0);
    const Index n1 = std::min(call == 0 ? Index(4) : Index(2), lengths[1] - t1);
    Matrix<T> step(n0 + n1, s.eq);
    step << x[0].middleRows(t0, n0), x[1].middleRows(t1, n1);
    const Matrix<T> y = paged_decode_step(layer, cache, ids, SequenceRows::packed(std::vector<Index>{0, n0, n0 + n1}),
                                          step, NoMask{}, {}, sinks);
    out[0].middleRows(t0, n0) = y.topRows(n0);
    out[1].middleRows(t1, n1) = y.bottomRows(n1);
    t0 += n0;
    t1 += n1;
  }
  for (std::size_t b = 0; b < 2; ++b) {
    const Index len = lengths[b];
    const Expected<T> ex = expected_mha_with_sinks<T>(s, layer.weights(), x[b], x[b], x[b],
                                                      causal_visibility(len, len, Alignment::TopLeft), sinks, &rotary);
    EXPECT_TRUE(within_tolerance<T>(out[b], ex.output, ex.base_output)) << "sequence " << b;
  }
}

// What was refused before chunked prefill of StreamingLLM sequences: two tokens in a step once
// the window has left the sink token.
TEST(PagedDecode, StreamingLLMTakesChunksOnceTheWindowLeftTheSinks) {
  ATTEND_SEEDED_RNG(rng);
  const Shape s{2, 1, 4, 4, 8, 8, 8, 8, false};
  MultiHeadAttention<double> layer(s.heads, random_weights<double>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<double>(s.d));
  PagedKVCache<double> cache(layer, 8, {4, 3, 0, 1});
  const Index a = cache.add_sequence();
  paged_decode_step(layer, cache, {a}, SequenceRows::uniform(1, 10), rng.normal<double>(10, 8));
  EXPECT_NO_THROW(paged_decode_step(layer, cache, {a}, SequenceRows::uniform(1, 2), rng.normal<double>(2, 8)));
  EXPECT_EQ(cache.length(a), 12);
}


// Masks and score modifiers at absolute positions, per head and per sequence of the call
// (HeadIndex::batch), as the whole sequences compute them.
TYPED_TEST(PagedDecodeTest, PoliciesApplyAtAbsolutePositionsPerHeadAndSequence) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, block = 16;
  const std::vector<double> slopes = alibi_slopes(heads);
  const auto custom = [](Index b, Index h, Index q_pos, Index k_pos) { return (q_pos - k_pos) % (h + b + 2) != 1; };
  for (int policy = 0; policy < 2; ++policy) {
    SCOPED_TRACE("policy " + std::to_string(policy));
    PagedKVCache<T> cache(16, kv_heads, d, {block});
    std::vector<Stream<T>> streams;
    for (const Index len : {40, 21, 33}) streams.push_back(make_stream<T>(rng, len, heads, kv_heads, d, d));
    std::vector<Stream<T>*> all;
    for (auto& s : streams) all.push_back(&s);
    const auto steps = [](std::size_t i, Index r) { return r == 0 ? Index(5 + 3 * i) : Index(1 + r % 2); };
    if (policy == 0)
      decode_batched<T>(cache, all, heads, steps, {}, Alibi::for_heads(heads));
    else
      decode_batched<T>(cache, all, heads, steps, {}, MaskMod(custom));
    for (std::size_t b = 0; b < streams.size(); ++b)
      expect_stream_matches_reference<T>(streams[b], heads, -1, [&](Index h, BoolMatrix& visible, RealMatrix& bias) {
        for (Index i = 0; i < visible.rows(); ++i)
          for (Index j = 0; j <= i; ++j) {
            if (policy == 0) bias(i, j) = -Real(slopes[std::size_t(h)]) * Real(i - j);
            if (policy == 1) visible(i, j) = visible(i, j) && custom(Index(b), h, i, j);
          }
      });
  }
}

// A learned sink per head adds e^(s_h) to each softmax's denominator and nothing to its
// numerator: out = sum_j e^(s_ij) v_j / (e^(s_h) + sum_j e^(s_ij)), lse = log(e^(s_h) + sum_j e^(s_ij)),
// computed here in long double from the reference's scores.
TYPED_TEST(PagedDecodeTest, SinksEnterTheDenominatorAndTheLogSumExp) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, len = 50, block = 16;
  PagedKVCache<T> cache(8, kv_heads, d, {block});
  const Matrix<T> q = rng.normal<T>(2, heads * d), k = rng.normal<T>(len, kv_heads * d), v = rng.normal<T>(len, kv_heads * d);
  Vector<T> sinks(heads);
  sinks << T(-1), T(0.5), T(4), T(-std::numeric_limits<T>::infinity());  // the last: no sink
  const Index s = cache.add_sequence();
  cache.append(s, k, v);
  AttentionOptions o;
  o.block_k = block;
  Matrix<T> out(2, heads * d), lse(2, heads);
  paged_attention_into(cache, {s}, SequenceRows::uniform(1, 2), q, heads, out, NoMask{}, o, sinks, lse);
  const Real scale = 1 / std::sqrt(Real(d));
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const Matrix<T> qh = q.middleCols(h * d, d), kg = k.middleCols(g * d, d), vg = v.middleCols(g * d, d);
    const BoolMatrix visible = window_visibility(2, len, -1, 0, Alignment::BottomRight);
    RealMatrix expected = RealMatrix::Zero(2, d);
    RealVector expected_lse(2);
    for (Index i = 0; i < 2; ++i) {
      Real denominator = std::exp(Real(sinks(h)));
      std::vector<Real> e(std::size_t(len), 0);
      for (Index j = 0; j < len; ++j) {
        if (!visible(i, j)) continue;
        Real dot = 0;
        for (Index c = 0; c < d; ++c) dot += Real(qh(i, c)) * Real(kg(j, c));
        e[std::size_t(j)] = std::exp(scale * dot);
        denominator += e[std::size_t(j)];
      }
      for (Index j = 0; j < len; ++j)
        for (Index c = 0; c < d; ++c) expected(i, c) += e[std::size_t(j)] / denominator * Real(vg(j, c));
      expected_lse(i) = std::log(denominator);
    }
    // Baseline: the plain same-precision attention, merged with its sink in T.
    Baseline<T> base = baseline_attention<T>(qh, kg, vg, T(scale), visible);
    for (Index i = 0; i < 2; ++i) base.output.row(i) *= T(1) / (T(1) + std::exp(sinks(h) - base.lse(i)));
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(out.middleCols(h * d, d)), expected, base.output));
    for (Index i = 0; i < 2; ++i)
      EXPECT_NEAR(double(lse(i, h)), double(expected_lse(i)), 8 * std::numeric_limits<T>::epsilon() * 8);
  }
  // The same sinks on a full path's result (add_attention_sinks_into) give the same outputs.
  Matrix<T> full(2, heads * d), full_lse(2, heads);
  for (Index h = 0; h < heads; ++h) {
    const Index g = h / (heads / kv_heads);
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(
        q.middleCols(h * d, d), k.middleCols(g * d, d), v.middleCols(g * d, d), Window(-1, 0, Alignment::BottomRight));
    full.middleCols(h * d, d) = r.output;
    full_lse.col(h) = r.lse;
  }
  add_attention_sinks_into<T>(full, full_lse, sinks);
  EXPECT_LE(max_abs_error(full, out), 4 * hard_cap<T>());
  EXPECT_LE(max_abs_error(full_lse, lse), 4 * hard_cap<T>() * 10);
}

TEST(PagedDecode, BadArgumentsThrowAndLeaveTheCacheUnchanged) {
  ATTEND_SEEDED_RNG(rng);
  PagedKVCache<double> cache(4, 2, 4, {4, 5});
  const Index a = cache.add_sequence(), b = cache.add_sequence();
  cache.append(a, rng.normal<double>(7, 8), rng.normal<double>(7, 8));
  const Matrix<double> q = rng.normal<double>(2, 16), k = rng.normal<double>(2, 8), v = rng.normal<double>(2, 8);
  Matrix<double> out(2, 16);
  const auto packed = SequenceRows::packed(std::vector<Index>{0, 1, 2});
  expect_invalid([&] { paged_decode_step_into(cache, {a, a}, packed, q, k, v, 4, out); }, {"sequence 0 is listed twice"});
  expect_invalid([&] { paged_decode_step_into(cache, {a, 9}, packed, q, k, v, 4, out); }, {"sequence 9 is not in the paged KV cache"});
  expect_invalid([&] { paged_decode_step_into(cache, {a, b}, packed, q, k, v, 3, out); }, {"num_heads=3"});
  // The second append exhausts the pool: the first is undone.
  cache.append(b, rng.normal<double>(4, 8), rng.normal<double>(4, 8));
  const Matrix<double> keys_a = cache.gather_keys(a);
  EXPECT_EQ(cache.free_blocks(), 1);
  const auto two = SequenceRows::packed(std::vector<Index>{0, 2, 3});
  const Matrix<double> q3 = rng.normal<double>(3, 16), k3 = rng.normal<double>(3, 8), v3 = rng.normal<double>(3, 8);
  Matrix<double> out3(3, 16);
  expect_invalid([&] { paged_decode_step_into(cache, {a, b}, two, q3, k3, v3, 4, out3); }, {"exhausted", "sequence 1"});
  EXPECT_EQ(cache.length(a), 7);
  EXPECT_EQ(cache.length(b), 4);
  EXPECT_EQ(cache.free_blocks(), 1);
  EXPECT_EQ(cache.gather_keys(a), keys_a);
  // Queries beyond what a windowed sequence holds.
  cache.append(a, rng.normal<double>(1, 8), rng.normal<double>(1, 8));
  cache.append(a, rng.normal<double>(1, 8), rng.normal<double>(1, 8));  // releases block 0
  EXPECT_EQ(cache.first_position(a), 4);
  Matrix<double> out4(4, 16);
  expect_invalid([&] { paged_attention_into(cache, {a}, SequenceRows::uniform(1, 4), rng.normal<double>(4, 16), 4, out4); },
                 {"holds positions from 4", "see positions from 1", "append a step's tokens in one call"});
  Matrix<double> out10(10, 16);
  expect_invalid([&] { paged_attention_into(cache, {a}, SequenceRows::uniform(1, 10), rng.normal<double>(10, 16), 4, out10); },
                 {"10 queries", "holds only 9"});
}

}  // namespace
}  // namespace attend::test
