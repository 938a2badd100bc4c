// SPDX-License-Identifier: MIT
// Sharding of a sequence over ranks (distributed/sharding.hpp): the segments of all ranks tile
// [0, L) exactly, contiguous shards differ by at most one token, zigzag shards pair chunk r with
// chunk 2N - 1 - r, and shard_rows / allgather_rows round-trip on the ranks mpiexec starts.
#include <attend/distributed.hpp>

#include "support/random.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

namespace attend::test {
namespace {

namespace ad = attend::distributed;

TEST(Sharding, SegmentsTileTheSequence) {
  for (ad::Sharding sharding : {ad::Sharding::Contiguous, ad::Sharding::Zigzag})
    for (int ranks : {1, 2, 3, 4, 7})
      for (Index length : {0, 1, 5, 16, 97, 1000}) {
        SCOPED_TRACE("ranks " + std::to_string(ranks) + " length " + std::to_string(length));
        std::vector<int> owner(std::size_t(length), -1);
        Index smallest = length, largest = 0;
        for (int r = 0; r < ranks; ++r) {
          const std::vector<ad::Segment> segments = ad::shard_segments(sharding, length, ranks, r);
          ASSERT_EQ(segments.size(), sharding == ad::Sharding::Zigzag ? 2u : 1u);
          for (const ad::Segment& s : segments)
            for (Index i = s.begin; i < s.begin + s.length; ++i) {
              ASSERT_TRUE(i >= 0 && i < length);
              EXPECT_EQ(owner[std::size_t(i)], -1) << "position " << i << " held twice";
              owner[std::size_t(i)] = r;
            }
          smallest = std::min(smallest, ad::shard_length(sharding, length, ranks, r));
          largest = std::max(largest, ad::shard_length(sharding, length, ranks, r));
        }
        EXPECT_EQ(std::count(owner.begin(), owner.end(), -1), 0);
        EXPECT_LE(largest - smallest, sharding == ad::Sharding::Zigzag ? 2 : 1);
        if (sharding == ad::Sharding::Zigzag && length % (2 * ranks) == 0 && length > 0) {
          const Index chunk = length / (2 * ranks);
          for (int r = 0; r < ranks; ++r) {
            const std::vector<ad::Segment> segments = ad::shard_segments(sharding, length, ranks, r);
            EXPECT_EQ(segments[0].begin, r * chunk);
            EXPECT_EQ(segments[1].begin, (2 * ranks - 1 - r) * chunk);
          }
        }
      }
}

TEST(Sharding, RejectsUndefinedShards) {
  EXPECT_THROW(ad::shard_segments(ad::Sharding::Contiguous, -1, 2, 0), attend::invalid_argument);
  EXPECT_THROW(ad::shard_segments(ad::Sharding::Zigzag, 10, 2, 2), attend::invalid_argument);
  EXPECT_THROW(ad::shard_segments(ad::Sharding::Zigzag, 10, 0, 0), attend::invalid_argument);
}

TEST(Sharding, AllgatherRowsRoundTrips) {
  int ranks = 0, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Rng rng(31);
  for (Index length : {0, 3, 50, 129}) {
    const Matrix<float> global = rng.normal<float>(length, 5);
    for (ad::Sharding sharding : {ad::Sharding::Contiguous, ad::Sharding::Zigzag}) {
      const Matrix<float> local = ad::shard_rows(global, sharding, ranks, rank);
      EXPECT_TRUE(identical(ad::allgather_rows(MPI_COMM_WORLD, local, sharding), global));
    }
  }
}

}  // namespace
}  // namespace attend::test
