// SPDX-License-Identifier: MIT
// Policies written by users (custom.hpp): MaskMod, ScoreMod and SoftCap against the long-double
// reference on both paths, per head and per sequence, and a block classification that skips
// work without changing the result.
#include <attend/attention/batched.hpp>
#include <attend/attention/dot_family.hpp>
#include <attend/attention/multi_head.hpp>
#include <attend/attention/scaled_dot_product.hpp>
#include <attend/custom.hpp>

#include "support/expect.hpp"
#include "support/head_policy_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <string>
#include <vector>

namespace attend::test {
namespace {

template <class T>
class CustomTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(CustomTest, Scalars);

/// Both paths, the blocked one with tiles that do not divide the lengths.
std::vector<AttentionOptions> both_paths() {
  AttentionOptions materialized, blocked;
  materialized.algorithm = Algorithm::Materialized;
  blocked.algorithm = Algorithm::Blocked;
  blocked.block_q = 5;
  blocked.block_k = 7;
  return {materialized, blocked};
}

/// Document ids of `len` tokens in runs of random lengths.
std::vector<Index> documents(Index len, Rng& rng) {
  std::vector<Index> doc;
  for (Index id = 0; Index(doc.size()) < len; ++id)
    for (Index n = rng.uniform(1, 9); n > 0 && Index(doc.size()) < len; --n) doc.push_back(id);
  return doc;
}

// A head-dependent predicate through the multi-head entry point: head h hides every key whose
// index is a multiple of h + 2, on top of a document mask and causality.
TYPED_TEST(CustomTest, MaskModPerHeadMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 3, kv_heads = 1, d = 8, len = 37;
  const std::vector<Index> doc = documents(len, rng);
  const auto visible = [&](Index h, Index q, Index k) { return doc[std::size_t(q)] == doc[std::size_t(k)] && k % (h + 2) != 0; };
  HeadPolicies expected;
  for (Index h = 0; h < heads; ++h) {
    BoolMatrix m = causal_visibility(len, len, Alignment::TopLeft);
    for (Index i = 0; i < len; ++i)
      for (Index j = 0; j < len; ++j) m(i, j) = m(i, j) && visible(h, i, j);
    expected.visible.push_back(m);
  }
  const Matrix<T> q = rng.normal<T>(len, heads * d), k = rng.normal<T>(len, kv_heads * d),
                  v = rng.normal<T>(len, kv_heads * d);
  for (const AttentionOptions& o : both_paths()) {
    const Matrix<T> out = multi_head_attention(q, k, v, heads, Causal() & MaskMod(visible), o);
    expect_heads_match_reference<T>(q, k, v, heads, out, expected, 1 / std::sqrt(Real(d)));
  }
}

// A score modifier that is ALiBi written by hand, per head, and one that uses the sequence
// index in a batched call.
TYPED_TEST(CustomTest, ScoreModPerHeadAndPerSequenceMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, d = 6, len = 23, batch = 3;
  const std::vector<double> slopes{0.5, 0.125};
  const auto modify = [&](T s, Index b, Index h, Index q, Index k) {
    return s - T(slopes[std::size_t(h)]) * T(std::abs(q - k)) + T(0.25) * T(b);
  };
  const Matrix<T> q = rng.normal<T>(batch * len, heads * d), k = rng.normal<T>(batch * len, heads * d),
                  v = rng.normal<T>(batch * len, heads * d);
  for (const AttentionOptions& o : both_paths()) {
    const Matrix<T> out = batched_attention(q, k, v, BatchLayout{heads, batch}, ScoreMod(modify) & Causal(), o);
    for (Index b = 0; b < batch; ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      HeadPolicies expected;
      for (Index h = 0; h < heads; ++h) {
        expected.visible.push_back(causal_visibility(len, len, Alignment::TopLeft));
        RealMatrix bias(len, len);
        for (Index i = 0; i < len; ++i)
          for (Index j = 0; j < len; ++j) bias(i, j) = -Real(slopes[std::size_t(h)]) * Real(std::abs(i - j)) + Real(0.25) * Real(b);
        expected.bias.push_back(bias);
      }
      expect_heads_match_reference<T>(q.middleRows(b * len, len), k.middleRows(b * len, len), v.middleRows(b * len, len),
                                      heads, out.middleRows(b * len, len), expected, 1 / std::sqrt(Real(d)));
    }
  }
}

// A prefix-LM mask (the first `prefix` tokens see each other, the rest are causal) with an exact
// block classification: same results as without it, and the predicate runs on fewer scores.
TYPED_TEST(CustomTest, BlockClassificationSkipsWorkWithoutChangingResults) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 96, d = 16, prefix = 30;
  std::atomic<long> calls{0};
  const auto visible = [&](Index, Index q, Index k) {
    calls.fetch_add(1, std::memory_order_relaxed);
    return k <= q || k < prefix;
  };
  const auto classify = [&](Index, Index q0, Index q1, Index k0, Index k1) {
    if (k1 <= prefix || k1 - 1 <= q0) return TileKind::Full;     // every key is in the prefix or behind every query
    if (k0 >= prefix && k0 > q1 - 1) return TileKind::Empty;     // every key is past the prefix and every query
    return TileKind::Partial;
  };
  BoolMatrix m(len, len);
  for (Index i = 0; i < len; ++i)
    for (Index j = 0; j < len; ++j) m(i, j) = j <= i || j < prefix;
  const Matrix<T> q = rng.normal<T>(len, d), k = rng.normal<T>(len, d), v = rng.normal<T>(len, d);
  AttentionOptions blocked;
  blocked.algorithm = Algorithm::Blocked;
  blocked.block_q = 16;
  blocked.block_k = 16;
  const Matrix<T> plain = scaled_dot_product_attention(q, k, v, MaskMod(visible), blocked);
  const long plain_calls = calls.exchange(0);
  const Matrix<T> classified = scaled_dot_product_attention(q, k, v, MaskMod(visible, classify), blocked);
  const long classified_calls = calls.load();
  EXPECT_EQ(plain_calls, len * len);
  EXPECT_LT(classified_calls, plain_calls / 3) << "the classification lets the kernel skip Full and Empty tiles";
  expect_heads_match_reference<T>(q, k, v, 1, plain, {{m}, {}}, 1 / std::sqrt(Real(d)));
  expect_heads_match_reference<T>(q, k, v, 1, classified, {{m}, {}}, 1 / std::sqrt(Real(d)));
}

// SoftCap as a modifier gives soft_capped_attention's scores, before masks and biases written
// after it, on both paths.
TYPED_TEST(CustomTest, SoftCapModifierMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 19, lk = 41, d = 8;
  const double cap = 1.5, slope = 0.25;
  const Matrix<T> q = rng.normal<T>(lq, d, 2), k = rng.normal<T>(lk, d, 2), v = rng.normal<T>(lk, d);
  const Real scale = 1 / std::sqrt(Real(d));
  RealMatrix bias(lq, lk);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      Real s = 0;
      for (Index c = 0; c < d; ++c) s += Real(q(i, c)) * Real(k(j, c));
      const Real capped = Real(cap) * std::tanh(scale * s / Real(cap));
      bias(i, j) = capped - scale * s - Real(slope) * Real(std::abs(j - aligned_key(i, lq, lk, Alignment::BottomRight)));
    }
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  for (const AttentionOptions& o : both_paths()) {
    const Matrix<T> out = scaled_dot_product_attention(
        q, k, v, SoftCap(cap) & Causal(Alignment::BottomRight) & Alibi(slope, Alignment::BottomRight), o);
    expect_heads_match_reference<T>(q, k, v, 1, out, {{visible}, {bias}}, scale);
    const Matrix<T> capped = soft_capped_attention(q, k, v, cap, Causal(Alignment::BottomRight), o);
    const Matrix<T> modified = scaled_dot_product_attention(q, k, v, SoftCap(cap) & Causal(Alignment::BottomRight), o);
    EXPECT_LE((capped - modified).cwiseAbs().maxCoeff(), 8 * std::numeric_limits<T>::epsilon());
  }
  expect_invalid([&] { scaled_dot_product_attention(q, k, v, SoftCap(0.0)); }, {"soft cap 0", "positive finite"});
  expect_invalid([&] { scaled_dot_product_attention(q, k, v, SoftCap(1e39)); }, {"soft cap 1e+39"});
}

}  // namespace
}  // namespace attend::test
