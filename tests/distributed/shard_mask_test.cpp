// SPDX-License-Identifier: MIT
// The global band masks seen from a segment pair (distributed/shard_mask.hpp): for random
// problems and segment pairs, key j' of the pair is visible to query i' exactly where the
// reference visibility of the whole problem shows (q_begin + i', k_begin + j'), through the
// bound policy's keys() and hide() (what the blocked kernel uses).
#include <attend/distributed.hpp>

#include "support/masks.hpp"
#include "support/random.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <string>

namespace attend::test {
namespace {

namespace ad = attend::distributed;

/// Visibility of the (lq, lk) pair at (q_begin, k_begin) according to the local policy: hide()
/// on a zero tile, and keys() must contain every visible key of each row.
template <class Mask>
BoolMatrix local_visibility(const Mask& mask, Index num_queries, Index num_keys, Index q_begin, Index k_begin,
                            Index lq, Index lk) {
  const auto bound = ad::shard_mask(mask, num_queries, num_keys, q_begin, k_begin).bind(lq, lk);
  Matrix<double> tile = Matrix<double>::Zero(lq, lk);
  attend::detail::apply_mask(bound, tile, 0, 0);
  BoolMatrix visible(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    const KeyRange keys = bound.keys(i, i + 1);
    for (Index j = 0; j < lk; ++j) {
      visible(i, j) = tile(i, j) != -std::numeric_limits<double>::infinity();
      if (visible(i, j)) {
        EXPECT_TRUE(keys.begin <= j && j < keys.end) << "row " << i << " key " << j;
      }
    }
  }
  return visible;
}

TEST(ShardMask, MatchesTheGlobalMaskOnEverySegmentPair) {
  Rng rng(41);
  for (int trial = 0; trial < 200; ++trial) {
    const Index lq = rng.uniform(1, 60), lk = rng.uniform(1, 60);
    const Alignment a = rng.bernoulli(0.5) ? Alignment::TopLeft : Alignment::BottomRight;
    const Index left = rng.uniform(-1, 20), right = rng.uniform(-1, 20), valid = rng.uniform(0, lk);
    const Index q_begin = rng.uniform(0, lq - 1), k_begin = rng.uniform(0, lk - 1);
    const Index sq = rng.uniform(1, lq - q_begin), sk = rng.uniform(1, lk - k_begin);
    SCOPED_TRACE("Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " left=" + std::to_string(left) +
                 " right=" + std::to_string(right) + " valid=" + std::to_string(valid) + " pair at (" +
                 std::to_string(q_begin) + ", " + std::to_string(k_begin) + ") of (" + std::to_string(sq) + ", " +
                 std::to_string(sk) + ") " + alignment_name(a));
    const auto check = [&](const auto& mask, const BoolMatrix& global) {
      EXPECT_EQ(local_visibility(mask, lq, lk, q_begin, k_begin, sq, sk), global.block(q_begin, k_begin, sq, sk));
    };
    check(NoMask{}, all_visible(lq, lk));
    check(Causal(a), causal_visibility(lq, lk, a));
    check(Window(left, right, a), window_visibility(lq, lk, left, right, a));
    check(KeyPadding(valid), padding_visibility(lq, lk, valid));
    check(Window(left, right, a) & KeyPadding(valid),
          BoolMatrix((window_visibility(lq, lk, left, right, a).array() && padding_visibility(lq, lk, valid).array())
                         .matrix()));
  }
}

TEST(ShardMask, RejectsWhatTheGlobalMaskRejects) {
  EXPECT_THROW(ad::shard_mask(Window(-2, 0), 10, 10, 0, 0), attend::invalid_argument);
  EXPECT_THROW(ad::shard_mask(KeyPadding(11), 10, 10, 0, 0), attend::invalid_argument);
  static_assert(!ad::is_shardable_mask<BooleanMask>);
  static_assert(!ad::is_shardable_mask<Intersection<Causal, BooleanMask>>);
  static_assert(ad::is_shardable_mask<Intersection<Intersection<Causal, KeyPadding>, Window>>);
}

}  // namespace
}  // namespace attend::test
