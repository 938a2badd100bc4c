// SPDX-License-Identifier: MIT
// Sequences of more than 100000 tokens, so that Lq * Lk > 2^32 and any 32-bit index product
// would overflow (xformers#719: NaN past 32768 tokens from an int16 cast). Windows keep the
// blocked path linear in the length; sampled rows (the ends, tile edges, rows around 2^16 and
// around i * L = 2^31 and 2^32) are checked against the long-double reference over the keys
// each row sees, and every row's log-sum-exp must be finite.
#include "support/attention_case.hpp"
#include "support/scalars.hpp"

#include <attend/attention/kv_cache.hpp>
#include <attend/attention/local_window.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class LongSequenceTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(LongSequenceTest, Scalars);

constexpr Index kLength = 100003;  // prime, so no tile size divides it
constexpr Index kDim = 8;

/// Rows to check against the reference: both ends, the first tile edges, 2^16 +- 1, and the
/// rows i where i * L crosses 2^31 and 2^32.
std::vector<Index> sampled_rows(Index lq, Index lk) {
  std::vector<Index> rows{0, 1, 63, 64, 65, 255, 256, 257, lq / 2, lq - 65, lq - 64, lq - 2, lq - 1};
  for (const Index center : {Index(1) << 16, (Index(1) << 31) / lk, (Index(1) << 32) / lk})
    for (Index delta : {-1, 0, 1}) rows.push_back(center + delta);
  rows.erase(std::remove_if(rows.begin(), rows.end(), [&](Index i) { return i < 0 || i >= lq; }), rows.end());
  return rows;
}

/// Checks row i of (out, lse) against the reference over keys [lo, hi] alone (the row's window).
template <class T>
void expect_row_matches(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, const Matrix<T>& out,
                        const Vector<T>& lse, Index i, Index lo, Index hi) {
  SCOPED_TRACE("row " + std::to_string(i) + ", keys [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  const Index n = hi - lo + 1;
  ASSERT_GE(n, 1) << "every sampled row must see a key";
  const auto q_row = q.middleRows(i, 1);
  const auto k_seen = k.middleRows(lo, n), v_seen = v.middleRows(lo, n);
  const Real scale = 1 / std::sqrt(Real(q.cols()));
  const Reference ref = reference_attention(q_row, k_seen, v_seen, scale, all_visible(1, n));
  const Baseline<T> base =
      baseline_attention<T>(q_row, k_seen, v_seen, T(1) / std::sqrt(T(q.cols())), all_visible(1, n));
  expect_matches_reference<T>(Matrix<T>(out.middleRows(i, 1)), Vector<T>(lse.segment(i, 1)), ref, base);
}

/// Window(left, right) around key a_i = i + offset: keys [a_i - left, a_i + right] within [0, Lk).
template <class T>
void check_window(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, const Matrix<T>& out,
                  const Vector<T>& lse, Index left, Index right, Index offset) {
  ASSERT_GT(double(q.rows()) * double(k.rows()), std::ldexp(1.0, 32));
  ASSERT_TRUE(lse.allFinite()) << "a row lost its keys";
  ASSERT_TRUE(out.allFinite());
  for (const Index i : sampled_rows(q.rows(), k.rows()))
    expect_row_matches<T>(q, k, v, out, lse, i, std::max<Index>(0, i + offset - left),
                          std::min<Index>(k.rows() - 1, i + offset + right));
}

TYPED_TEST(LongSequenceTest, BlockedWindowOverMoreThan100000Tokens) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Matrix<T> q = rng.normal<T>(kLength, kDim), k = rng.normal<T>(kLength, kDim), v = rng.normal<T>(kLength, kDim);
  const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, Window(8, 8), blocked_path());
  check_window<T>(q, k, v, r.output, r.lse, 8, 8, 0);
}

// local_window_attention picks the blocked path by itself (Auto); bottom-right alignment with
// Lk > Lq puts the aligned key 16 rows further on.
TYPED_TEST(LongSequenceTest, LocalWindowAttentionOverMoreThan100000Tokens) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lk = kLength + 16;
  const Matrix<T> q = rng.normal<T>(kLength, kDim), k = rng.normal<T>(lk, kDim), v = rng.normal<T>(lk, kDim);
  Matrix<T> out(kLength, kDim);
  Vector<T> lse(kLength);
  local_window_attention_into(q, k, v, sliding_window(24, Alignment::BottomRight), out, NoMask{}, {}, lse);
  check_window<T>(q, k, v, out, lse, 23, 0, lk - kLength);
}

// One decoding step over a KV cache holding more than 100000 tokens (the split-KV kernel).
TYPED_TEST(LongSequenceTest, DecodeStepOverMoreThan100000CachedTokens) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2;
  const Matrix<T> k = rng.normal<T>(kLength, kDim), v = rng.normal<T>(kLength, kDim);
  const Matrix<T> q = rng.normal<T>(1, heads * kDim);
  KVCache<T> cache(kLength, 1, kDim);
  cache.append(k.topRows(kLength - 1), v.topRows(kLength - 1));
  const Matrix<T> out = decode_step(cache, q, k.bottomRows(1), v.bottomRows(1), heads);
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Matrix<T> q_head = q.middleCols(h * kDim, kDim), out_head = out.middleCols(h * kDim, kDim);
    const Real scale = 1 / std::sqrt(Real(kDim));
    const Reference ref = reference_attention(q_head, k, v, scale, all_visible(1, kLength));
    const Baseline<T> base = baseline_attention<T>(q_head, k, v, T(1) / std::sqrt(T(kDim)), all_visible(1, kLength));
    expect_matches_reference<T>(out_head, Vector<T>(), ref, base);
  }
}

}  // namespace
