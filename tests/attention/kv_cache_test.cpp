// SPDX-License-Identifier: MIT
// KV cache and incremental decoding: decoding token by token (or in chunks) gives the outputs of
// full causal (or sliding-window) multi-head attention over the whole sequence, checked against
// the long-double reference.
#include <attend/attention/kv_cache.hpp>
#include <attend/biases.hpp>
#include <attend/custom.hpp>

#include "support/expect.hpp"
#include "support/head_policy_reference.hpp"
#include "support/baseline.hpp"
#include "support/masks.hpp"
#include "support/multi_head_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/sinks_reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace attend::test {
namespace {

using attend::test::expect_invalid;

TEST(KVCache, AppendKeepsRowsInOrderAndViewsTheValidPart) {
  ATTEND_SEEDED_RNG(rng);
  KVCache<double> cache(10, 2, 4, {-1, 3});
  EXPECT_EQ(cache.capacity(), 10);
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.keys().rows(), 0);
  const Matrix<double> k = rng.normal<double>(10, 8), v = rng.normal<double>(10, 6);
  cache.append(k.topRows(3), v.topRows(3));
  cache.append(k.middleRows(3, 1), v.middleRows(3, 1));
  cache.append(k.bottomRows(6), v.bottomRows(6));
  EXPECT_EQ(cache.size(), 10);
  EXPECT_EQ(cache.position(), 10);
  EXPECT_EQ(Matrix<double>(cache.keys()), k);
  EXPECT_EQ(Matrix<double>(cache.values()), v);
  expect_invalid([&] { cache.append(k.topRows(1), v.topRows(1)); },
                 {"overflow", "appending 1 rows", "capacity=10"});
  EXPECT_EQ(cache.size(), 10) << "a failed append leaves the cache unchanged";
  expect_invalid([&] { cache.append(k.leftCols(7), v); }, {"(10 x 7)", "(n x 8)", "(n x 6)"});
  cache.clear();
  EXPECT_EQ(cache.size(), 0);
  EXPECT_EQ(cache.position(), 0);
}

TEST(KVCache, TruncateRollsBackAndAppendsContinue) {
  ATTEND_SEEDED_RNG(rng);
  KVCache<double> cache(12, 1, 2);
  const Matrix<double> k = rng.normal<double>(12, 2), v = rng.normal<double>(12, 2);
  cache.append(k.topRows(9), v.topRows(9));
  cache.truncate(5);
  EXPECT_EQ(cache.position(), 5);
  cache.append(k.bottomRows(3), v.bottomRows(3));
  Matrix<double> expected(8, 2);
  expected << k.topRows(5), k.bottomRows(3);
  EXPECT_EQ(Matrix<double>(cache.keys()), expected);
  expect_invalid([&] { cache.truncate(9); }, {"truncate(9)", "[0, position=8]"});
  KVCache<double> windowed(6, 1, 2, {3});
  windowed.append(k.topRows(5), v.topRows(5));  // holds positions 0..4
  windowed.append(k.topRows(1), v.topRows(1));  // holds 3..5
  windowed.truncate(5);                         // position 5 sees 3..5: still held
  EXPECT_EQ(windowed.size(), 2);
  expect_invalid([&] { windowed.truncate(4); }, {"sees positions from 2", "holds positions from 3"});
  EXPECT_EQ(windowed.position(), 5);
}

TEST(KVCache, SlidingWindowKeepsTheLastKeysAcrossMovesToTheFront) {
  ATTEND_SEEDED_RNG(rng);
  const Index window = 4, total = 23;
  KVCache<float> cache(window + 2, 1, 3, {window, 0});  // moves rows to the front every 3 tokens
  const Matrix<float> k = rng.normal<float>(total, 3), v = rng.normal<float>(total, 3);
  for (Index t = 0; t < total; ++t) {
    cache.append(k.row(t), v.row(t));
    const Index kept = std::min(t + 1, window);
    ASSERT_EQ(cache.size(), kept);
    EXPECT_EQ(Matrix<float>(cache.keys()), Matrix<float>(k.middleRows(t + 1 - kept, kept))) << "token " << t;
    EXPECT_EQ(Matrix<float>(cache.values()), Matrix<float>(v.middleRows(t + 1 - kept, kept))) << "token " << t;
  }
  // A multi-row append keeps the w - 1 rows its first token still sees.
  cache.append(k.topRows(3), v.topRows(3));
  EXPECT_EQ(cache.size(), window - 1 + 3);
  EXPECT_EQ(Matrix<float>(cache.keys().bottomRows(3)), Matrix<float>(k.topRows(3)));
  expect_invalid([&] { cache.append(k.topRows(4), v.topRows(4)); }, {"overflow", "4 rows", "3 kept", "window=4"});
  expect_invalid([&] { KVCache<float>(3, 1, 3, {4, 0}); }, {"window=4", "capacity=3"});
  expect_invalid([&] { KVCache<float>(8, 0, 3); }, {"kv_heads=0"});
}

/// Problem of one decoding test: heads, widths and the window (-1 = unbounded).
struct DecodeCase {
  Index heads, kv_heads, d, dv, window;
};

/// The full-sequence reference: query t of head h sees keys j <= t (and j >= t - w + 1).
template <class T>
void expect_matches_full_attention(const DecodeCase& c, const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                                   const Matrix<T>& out) {
  const Index len = q.rows();
  const BoolMatrix visible =
      window_visibility(len, len, c.window < 0 ? -1 : c.window - 1, 0, Alignment::TopLeft);
  for (Index h = 0; h < c.heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (c.heads / c.kv_heads);
    const auto qh = q.middleCols(h * c.d, c.d);
    const auto kg = k.middleCols(g * c.d, c.d);
    const auto vg = v.middleCols(g * c.dv, c.dv);
    const Reference ref = reference_attention(qh, kg, vg, 1 / std::sqrt(Real(c.d)), visible);
    const Baseline<T> base = baseline_attention<T>(qh, kg, vg, T(1) / std::sqrt(T(c.d)), visible);
    EXPECT_TRUE(within_tolerance<T>(out.middleCols(h * c.dv, c.dv), ref.output, base.output));
  }
}

template <class T>
class DecodeTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(DecodeTest, Scalars);

/// Decodes the sequence in steps of the given sizes (cycled) and returns the stacked outputs.
template <class T>
Matrix<T> decode_in_steps(const DecodeCase& c, Index capacity, const std::vector<Index>& steps, const Matrix<T>& q,
                          const Matrix<T>& k, const Matrix<T>& v, Index block_k) {
  KVCache<T> cache(capacity, c.kv_heads, c.d, {c.window, c.dv});
  AttentionOptions o;
  o.block_k = block_k;
  Matrix<T> out(q.rows(), c.heads * c.dv);
  for (Index t = 0, s = 0; t < q.rows(); ++s) {
    const Index n = std::min(steps[std::size_t(s) % steps.size()], q.rows() - t);
    decode_step_into(cache, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), c.heads,
                     out.middleRows(t, n), o);
    t += n;
    EXPECT_EQ(cache.position(), t);
  }
  return out;
}

TYPED_TEST(DecodeTest, TokenByTokenEqualsFullCausalAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 70;
  for (const DecodeCase c : {DecodeCase{8, 2, 16, 16, -1}, DecodeCase{4, 4, 8, 12, -1}, DecodeCase{6, 1, 8, 8, -1}}) {
    SCOPED_TRACE("H=" + std::to_string(c.heads) + " H_kv=" + std::to_string(c.kv_heads));
    const Matrix<T> q = rng.normal<T>(len, c.heads * c.d), k = rng.normal<T>(len, c.kv_heads * c.d),
                    v = rng.normal<T>(len, c.kv_heads * c.dv);
    const Matrix<T> out = decode_in_steps<T>(c, len, {1}, q, k, v, 16);  // several splits per step
    expect_matches_full_attention<T>(c, q, k, v, out);
  }
}

TYPED_TEST(DecodeTest, SlidingWindowEqualsFullWindowedAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 50;
  for (const Index window : {1, 5, 16}) {
    SCOPED_TRACE("window " + std::to_string(window));
    const DecodeCase c{4, 2, 8, 8, window};
    const Matrix<T> q = rng.normal<T>(len, c.heads * c.d), k = rng.normal<T>(len, c.kv_heads * c.d),
                    v = rng.normal<T>(len, c.kv_heads * c.dv);
    const Matrix<T> out = decode_in_steps<T>(c, window + 3, {1}, q, k, v, 4);
    expect_matches_full_attention<T>(c, q, k, v, out);
  }
}

TYPED_TEST(DecodeTest, ChunkedPrefillThenDecodeEqualsFullAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 61;
  for (const Index window : {-1, 6}) {
    SCOPED_TRACE("window " + std::to_string(window));
    const DecodeCase c{6, 3, 8, 4, window};
    const Matrix<T> q = rng.normal<T>(len, c.heads * c.d), k = rng.normal<T>(len, c.kv_heads * c.d),
                    v = rng.normal<T>(len, c.kv_heads * c.dv);
    const Index capacity = window < 0 ? len : window - 1 + 9 + 4;
    const Matrix<T> out = decode_in_steps<T>(c, capacity, {9, 1, 3, 1, 1, 5}, q, k, v, 0);
    expect_matches_full_attention<T>(c, q, k, v, out);
  }
}

// A layer with projections, rotary positions and grouped-query heads, decoded through
// decode_step(layer, cache, x) token by token and in chunks, against the long-double reference of
// the whole sequence: causal, and with a sliding window of w keys (Window(w - 1, 0)).
TYPED_TEST(DecodeTest, LayerDecodeEqualsTheLayerOverTheWholeSequence) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 23;
  const Shape s{6, 2, 8, 8, 24, 24, 24, 20, true};
  const RotarySpec rotary{s.d, s.d, RotaryLayout::HalfSplit, 100.0};
  MultiHeadAttention<T> layer(s.heads, random_weights<T>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
  const Matrix<T> x = rng.normal<T>(len, s.eq);
  for (const Index window : {-1, 5}) {
    const BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
    const Expected<T> ex = expected_mha<T>(s, layer.weights(), x, x, x, visible, &rotary);
    for (const std::vector<Index>& steps : {std::vector<Index>{1}, std::vector<Index>{4, 1, 3}}) {
      SCOPED_TRACE("window " + std::to_string(window) + ", first step of " + std::to_string(steps[0]));
      KVCache<T> cache(layer, window < 0 ? len : window - 1 + 4, window);
      Matrix<T> out(len, s.eout);
      for (Index t = 0, i = 0; t < len; ++i) {
        const Index n = std::min(steps[std::size_t(i) % steps.size()], len - t);
        out.middleRows(t, n) = decode_step(layer, cache, x.middleRows(t, n));
        t += n;
      }
      EXPECT_TRUE(within_tolerance<T>(out, ex.output, ex.base_output));
    }
  }
}

/// Decodes the sequence in steps of the given sizes (cycled) with the mask mask_at(P) in the step
/// that ends at position P, and returns the stacked outputs.
template <class T, class MaskAt>
Matrix<T> decode_with_mask(const DecodeCase& c, Index capacity, const std::vector<Index>& steps, const Matrix<T>& q,
                           const Matrix<T>& k, const Matrix<T>& v, const MaskAt& mask_at) {
  KVCache<T> cache(capacity, c.kv_heads, c.d, {c.window, c.dv});
  AttentionOptions o;
  o.block_k = 4;  // several splits per step
  Matrix<T> out(q.rows(), c.heads * c.dv);
  for (Index t = 0, s = 0; t < q.rows(); ++s) {
    const Index n = std::min(steps[std::size_t(s) % steps.size()], q.rows() - t);
    decode_step_into(cache, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), c.heads,
                     out.middleRows(t, n), mask_at(t + n), o);
    t += n;
  }
  return out;
}

// Masks while decoding: per-head ALiBi, a per-head T5 table, soft-capping, a window narrower than
// the cache, a custom predicate with the head index and a dense (P, P) mask, each decoded token
// by token and in chunks, with and without a sliding-window cache, equal the long-double
// reference of the whole sequence with Causal() & policy (and the cache's window).
TYPED_TEST(DecodeTest, EveryPolicyDecodesAsTheWholeSequenceComputes) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 34, heads = 4, kv_heads = 2, d = 8, buckets = 16, max_distance = 20;
  const double cap = 1.5;
  const Real scale = 1 / std::sqrt(Real(d));
  const Matrix<T> q = rng.normal<T>(len, heads * d, 1.5), k = rng.normal<T>(len, kv_heads * d, 1.5),
                  v = rng.normal<T>(len, kv_heads * d);
  const std::vector<double> slopes = alibi_slopes(heads);
  const Matrix<T> table = rng.normal<T>(buckets, heads);
  const BoolMatrix dense = rng.bernoulli(len, len, 0.75);
  const auto custom = [](Index h, Index q_pos, Index k_pos) { return (q_pos - k_pos) % (h + 2) != 1; };
  // The raw scaled score of head h, query i, key j, for the soft cap's expected bias.
  const auto raw = [&](Index h, Index i, Index j) {
    const Index g = h / (heads / kv_heads);
    Real dot = 0;
    for (Index c = 0; c < d; ++c) dot += Real(q(i, h * d + c)) * Real(k(j, g * d + c));
    return scale * dot;
  };
  enum Policy { AlibiHeads, T5Heads, SoftCapped, NarrowWindow, Custom, Dense };
  for (const Policy policy : {AlibiHeads, T5Heads, SoftCapped, NarrowWindow, Custom, Dense})
    for (const Index window : {-1, 9})
      for (const std::vector<Index>& steps : {std::vector<Index>{1}, std::vector<Index>{5, 1, 3}}) {
        SCOPED_TRACE("policy " + std::to_string(int(policy)) + ", cache window " + std::to_string(window) +
                     ", first step of " + std::to_string(steps[0]));
        const DecodeCase c{heads, kv_heads, d, d, window};
        const Index capacity = window < 0 ? len : window - 1 + 5;
        HeadPolicies expected;
        for (Index h = 0; h < heads; ++h) {
          BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
          RealMatrix bias = RealMatrix::Zero(len, len);
          for (Index i = 0; i < len; ++i)
            for (Index j = 0; j <= i; ++j) {
              if (policy == AlibiHeads) bias(i, j) = -Real(slopes[std::size_t(h)]) * Real(i - j);
              if (policy == T5Heads) bias(i, j) = Real(table(relative_position_bucket(j - i, false, buckets, max_distance), h));
              if (policy == SoftCapped) bias(i, j) = Real(cap) * std::tanh(raw(h, i, j) / Real(cap)) - raw(h, i, j);
              if (policy == NarrowWindow) visible(i, j) = visible(i, j) && i - j <= 3;
              if (policy == Custom) visible(i, j) = visible(i, j) && custom(h, i, j);
              if (policy == Dense) visible(i, j) = visible(i, j) && dense(i, j);
            }
          expected.visible.push_back(visible);
          expected.bias.push_back(bias);
        }
        Matrix<T> out;
        switch (policy) {
          case AlibiHeads: out = decode_with_mask<T>(c, capacity, steps, q, k, v, [&](Index) { return Alibi::for_heads(heads); }); break;
          case T5Heads:
            out = decode_with_mask<T>(c, capacity, steps, q, k, v,
                                      [&](Index) { return RelativePositionBias(table, false, max_distance); });
            break;
          case SoftCapped: out = decode_with_mask<T>(c, capacity, steps, q, k, v, [&](Index) { return SoftCap(cap); }); break;
          case NarrowWindow: out = decode_with_mask<T>(c, capacity, steps, q, k, v, [&](Index) { return Window(3, 0); }); break;
          case Custom: out = decode_with_mask<T>(c, capacity, steps, q, k, v, [&](Index) { return MaskMod(custom); }); break;
          case Dense:
            out = decode_with_mask<T>(c, capacity, steps, q, k, v,
                                      [&](Index p) { return BooleanMask(dense.topLeftCorner(p, p)); });
            break;
        }
        expect_heads_match_reference<T>(q, k, v, heads, out, expected, scale);
      }
}

// The layer decodes with a policy as its forward over the whole sequence computes.
TYPED_TEST(DecodeTest, LayerDecodeWithAPolicyEqualsTheLayerForward) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 21;
  const Shape s{4, 2, 8, 8, 32, 32, 32, 32, true};
  MultiHeadAttention<T> layer(s.heads, random_weights<T>(s, rng), s.kv_heads);
  const Matrix<T> x = rng.normal<T>(len, s.eq);
  const auto policy = SoftCap(2.0) & Alibi::for_heads(s.heads);
  const Matrix<T> whole = layer.forward(x, Causal() & policy).output;
  KVCache<T> cache(layer, len);
  Matrix<T> out(len, s.eout);
  for (Index t = 0; t < len; t += 3) {
    const Index n = std::min(Index(3), len - t);
    out.middleRows(t, n) = decode_step(layer, cache, x.middleRows(t, n), policy);
  }
  EXPECT_LE((out - whole).cwiseAbs().maxCoeff(), 64 * std::numeric_limits<T>::epsilon());
}

// A layer with learned sinks decodes (token by token and in chunks, with and without a window,
// with rotary positions) as the long-double layer with the sinks over the whole sequence, and as
// its own forward with the same sinks.
TYPED_TEST(DecodeTest, LayerDecodeWithSinksEqualsTheLayerForwardWithSinks) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 23;
  const Shape s{4, 2, 8, 8, 24, 24, 24, 20, true};
  const RotarySpec rotary{s.d, s.d, RotaryLayout::HalfSplit, 100.0};
  MultiHeadAttention<T> layer(s.heads, random_weights<T>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
  Vector<T> sinks(s.heads);
  sinks << T(1), T(-0.5), T(2.5), T(0);
  const Matrix<T> x = rng.normal<T>(len, s.eq);
  for (const Index window : {-1, 5}) {
    const BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
    const Expected<T> ex = expected_mha_with_sinks<T>(s, layer.weights(), x, x, x, visible, sinks, &rotary);
    const Matrix<T> whole = window < 0 ? layer.forward(x, Causal(), {}, sinks).output
                                       : layer.forward(x, Window(window - 1, 0), {}, sinks).output;
    EXPECT_TRUE(within_tolerance<T>(whole, ex.output, ex.base_output));
    for (const std::vector<Index>& steps : {std::vector<Index>{1}, std::vector<Index>{4, 1, 3}}) {
      SCOPED_TRACE("window " + std::to_string(window) + ", first step of " + std::to_string(steps[0]));
      KVCache<T> cache(layer, window < 0 ? len : window - 1 + 4, window);
      Matrix<T> out(len, s.eout);
      for (Index t = 0, i = 0; t < len; ++i) {
        const Index n = std::min(steps[std::size_t(i) % steps.size()], len - t);
        out.middleRows(t, n) = decode_step(layer, cache, x.middleRows(t, n), NoMask{}, {}, sinks);
        t += n;
      }
      EXPECT_TRUE(within_tolerance<T>(out, ex.output, ex.base_output));
    }
  }
}

TEST(DecodeErrors, ClearMessagesAndUnchangedCache) {
  ATTEND_SEEDED_RNG(rng);
  KVCache<double> cache(4, 2, 8);
  const Matrix<double> q = rng.normal<double>(1, 48), k = rng.normal<double>(5, 16), v = rng.normal<double>(5, 16);
  expect_invalid([&] { decode_step(cache, q, k.topRows(1), v.topRows(1), 4); }, {"q (1 x 48)", "4 * 8"});
  expect_invalid([&] { decode_step(cache, q.leftCols(40), k.topRows(1), v.topRows(1), 5); },
                 {"num_heads=5", "num_kv_heads=2"});
  expect_invalid([&] { decode_step(cache, q.leftCols(32), k.topRows(2), v.topRows(2), 4); }, {"k_new (2 x 16)"});
  expect_invalid([&] { decode_step(cache, q.leftCols(32), k.topRows(1), v.topRows(1).leftCols(12), 4); },
                 {"(1 x 12)"});
  EXPECT_EQ(cache.size(), 0);
  cache.append(k.topRows(4), v.topRows(4));
  expect_invalid([&] { decode_step(cache, q.leftCols(32), k.topRows(1), v.topRows(1), 4); },
                 {"overflow", "capacity=4"});
  EXPECT_EQ(cache.size(), 4);
  EXPECT_EQ(cache.position(), 4);
  // A layer whose heads do not match the cache's.
  const Shape shape{4, 2, 8, 8, 16, 16, 16, 16, false};
  const MultiHeadAttention<double> layer(4, random_weights<double>(shape, rng), 2);
  KVCache<double> other(4, 2, 6);
  expect_invalid([&] { decode_step(layer, other, rng.normal<double>(1, 16)); },
                 {"kv_heads=2, head_dim=6", "num_kv_heads=2, head_dim=8"});
  // A mask that does not fit the heads throws after the append, which is then undone.
  KVCache<double> kept(8, 2, 8);
  kept.append(k.topRows(2), v.topRows(2));
  const Matrix<double> keys_before = kept.keys(), values_before = kept.values();
  for (const Index n : {1, 2})
    expect_invalid([&] { decode_step(kept, q.topRows(1).leftCols(32).replicate(n, 1), k.topRows(n), v.topRows(n), 4, Alibi(0.5)); },
                   {"one slope to all 4 heads"});
  EXPECT_EQ(kept.position(), 2);
  EXPECT_EQ(Matrix<double>(kept.keys()), keys_before);
  EXPECT_EQ(Matrix<double>(kept.values()), values_before);
  KVCache<double> fitted(layer, 4);
  expect_invalid([&] { decode_step(layer, fitted, rng.normal<double>(1, 15)); }, {"q_proj input (1 x 15)"});
  EXPECT_EQ(fitted.size(), 0);
}

}  // namespace
}  // namespace attend::test
