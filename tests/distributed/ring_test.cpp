// SPDX-License-Identifier: MIT
// Ring attention (distributed/ring.hpp) on the ranks mpiexec starts (1..4): each rank's shard of
// the output and log-sum-exp against the long-double reference of the whole sequence (tolerance
// rule), the single-process blocked path under the same rule, bit-for-bit repeatability (runs,
// thread counts, ring vs all-gather), the blocks a mask lets the ring skip, and errors raised on
// every rank when one rank's arguments are wrong.
#include <attend/distributed.hpp>

#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>
#include <vector>

namespace attend::test {
namespace {

namespace ad = attend::distributed;

int comm_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

int comm_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

/// A global multi-head problem, the same on every rank (fixed seed).
template <class T>
struct Problem {
  Index lq, lk, heads, kv_heads, d, dv;
  Matrix<T> q, k, v;  // (Lq, H d), (Lk, H_kv d), (Lk, H_kv d_v)

  Problem(Index lq_, Index lk_, Index heads_, Index kv_heads_, Index d_, Index dv_, std::uint64_t seed)
      : lq(lq_), lk(lk_), heads(heads_), kv_heads(kv_heads_), d(d_), dv(dv_) {
    Rng rng(seed);
    q = rng.normal<T>(lq, heads * d);
    k = rng.normal<T>(lk, kv_heads * d);
    v = rng.normal<T>(lk, kv_heads * dv);
  }
};

/// This rank's output and log-sum-exp of a ring call.
template <class T>
struct Shard {
  Matrix<T> out;  // (Lq_r, H d_v)
  Matrix<T> lse;  // (Lq_r, H)
};

template <class T, class Mask>
Shard<T> run_ring(const Problem<T>& p, const Mask& mask, const ad::RingOptions& options) {
  const int ranks = comm_size(), rank = comm_rank();
  const Matrix<T> q = ad::shard_rows(p.q, options.sharding, ranks, rank);
  const Matrix<T> k = ad::shard_rows(p.k, options.sharding, ranks, rank);
  const Matrix<T> v = ad::shard_rows(p.v, options.sharding, ranks, rank);
  Shard<T> s{Matrix<T>(q.rows(), p.heads * p.dv), Matrix<T>(q.rows(), p.heads)};
  ad::ring_attention_into(MPI_COMM_WORLD, q, k, v, p.heads, s.out, mask, options, s.lse);
  return s;
}

/// Checks a ring result, head by head, against the long-double reference of the whole problem
/// (restricted to this rank's rows), and the single-process blocked path against the same.
template <class T, class Mask>
void expect_matches(const Problem<T>& p, const Mask& mask, const BoolMatrix& visible, const ad::RingOptions& options,
                    const Shard<T>& s) {
  const int ranks = comm_size(), rank = comm_rank();
  const T scale = T(1) / std::sqrt(T(p.d));
  Matrix<T> single(p.lq, p.heads * p.dv);  // the single-process blocked path
  AttentionOptions blocked;
  blocked.algorithm = Algorithm::Blocked;
  multi_head_attention_into(p.q, p.k, p.v, p.heads, single, mask, blocked);
  const Matrix<T> single_rows = ad::shard_rows(single, options.sharding, ranks, rank);
  ASSERT_EQ(s.out.rows(), single_rows.rows());
  if (s.out.rows() == 0) return;  // an empty shard (no column block of an empty matrix at an offset)
  const Index group = p.heads / p.kv_heads;
  for (Index h = 0; h < p.heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / group;
    const Matrix<T> qh = p.q.middleCols(h * p.d, p.d), kh = p.k.middleCols(g * p.d, p.d),
                    vh = p.v.middleCols(g * p.dv, p.dv);
    const Reference ref = reference_attention(qh, kh, vh, Real(scale), visible);
    const Baseline<T> base = baseline_attention<T>(qh, kh, vh, scale, visible);
    // This rank's rows of the reference and baseline.
    const Reference mine{ad::shard_rows(ref.output, options.sharding, ranks, rank),
                         RealVector(ad::shard_rows(RealMatrix(ref.lse), options.sharding, ranks, rank)), {}};
    const Baseline<T> base_mine{ad::shard_rows(base.output, options.sharding, ranks, rank),
                                Vector<T>(ad::shard_rows(Matrix<T>(base.lse), options.sharding, ranks, rank)), {}};
    const Vector<T> lse = s.lse.col(h);
    expect_matches_reference<T>(s.out.middleCols(h * p.dv, p.dv), lse, mine, base_mine);
    expect_matches_reference<T>(single_rows.middleCols(h * p.dv, p.dv), Vector<T>(), mine, base_mine);
  }
}

/// The masks of the grid: (mask, its reference visibility) for an (Lq, Lk) problem.
template <class F>
void for_each_mask(Index lq, Index lk, F&& f) {
  const auto both = [](const BoolMatrix& a, const BoolMatrix& b) { return BoolMatrix((a.array() && b.array()).matrix()); };
  f("NoMask", NoMask{}, all_visible(lq, lk));
  for (Alignment a : {Alignment::TopLeft, Alignment::BottomRight}) {
    const std::string name = alignment_name(a);
    f("Causal(" + name + ")", Causal(a), causal_visibility(lq, lk, a));
    f("Window(17, 0, " + name + ")", Window(17, 0, a), window_visibility(lq, lk, 17, 0, a));
    f("Window(5, 9, " + name + ")", Window(5, 9, a), window_visibility(lq, lk, 5, 9, a));
    f("Window(-1, 30, " + name + ")", Window(-1, 30, a), window_visibility(lq, lk, -1, 30, a));
    f("Causal(" + name + ") & KeyPadding", Causal(a) & KeyPadding(lk - lk / 3),
      both(causal_visibility(lq, lk, a), padding_visibility(lq, lk, lk - lk / 3)));
  }
  f("KeyPadding", KeyPadding(lk / 2), padding_visibility(lq, lk, lk / 2));
}

template <class T>
class RingTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(RingTest, Scalars);

// Self attention (Lq = Lk, uneven shards), GQA (4 query heads on 2 kv heads), every band mask,
// both shardings, ring and all-gather: each within the tolerance rule of the reference, and the
// all-gather variant bit for bit the ring's result.
TYPED_TEST(RingTest, SelfAttentionMatchesReference) {
  using T = TypeParam;
  const Problem<T> p(157, 157, 4, 2, 16, 8, 11);
  for (ad::Sharding sharding : {ad::Sharding::Contiguous, ad::Sharding::Zigzag})
    for_each_mask(p.lq, p.lk, [&](const std::string& name, const auto& mask, const BoolMatrix& visible) {
      SCOPED_TRACE(name + (sharding == ad::Sharding::Zigzag ? " zigzag" : " contiguous"));
      ad::RingOptions options;
      options.sharding = sharding;
      options.block_q = 16;  // several tiles per segment
      options.block_k = 32;
      const Shard<T> ring = run_ring(p, mask, options);
      expect_matches(p, mask, visible, options, ring);
      options.exchange = ad::KVExchange::AllGather;
      const Shard<T> gathered = run_ring(p, mask, options);
      EXPECT_TRUE(identical(gathered.out, ring.out));
      EXPECT_TRUE(identical(gathered.lse, ring.lse));
    });
}

// Cross attention (Lq != Lk) with both alignments: queries and keys sharded over their own lengths.
TYPED_TEST(RingTest, CrossAttentionMatchesReference) {
  using T = TypeParam;
  for (const std::pair<Index, Index>& lengths : {std::pair<Index, Index>{96, 211}, {203, 64}}) {
    const Index lq = lengths.first, lk = lengths.second;  // (a lambda cannot capture structured bindings in C++17)
    const Problem<T> p(lq, lk, 2, 1, 8, 12, 12);
    for (ad::Sharding sharding : {ad::Sharding::Contiguous, ad::Sharding::Zigzag})
      for_each_mask(lq, lk, [&](const std::string& name, const auto& mask, const BoolMatrix& visible) {
        SCOPED_TRACE(name + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) +
                     (sharding == ad::Sharding::Zigzag ? " zigzag" : " contiguous"));
        ad::RingOptions options;
        options.sharding = sharding;
        expect_matches(p, mask, visible, options, run_ring(p, mask, options));
      });
  }
}

// Fewer tokens than ranks (none at all included): ranks with empty shards still take part.
TYPED_TEST(RingTest, ShortSequenceLeavesSomeRanksEmpty) {
  using T = TypeParam;
  for (Index length : {0, 1, 3}) {
    const Problem<T> p(length, length, 2, 2, 8, 8, 13);
    for (ad::Sharding sharding : {ad::Sharding::Contiguous, ad::Sharding::Zigzag}) {
      SCOPED_TRACE("L=" + std::to_string(length) + (sharding == ad::Sharding::Zigzag ? " zigzag" : " contiguous"));
      ad::RingOptions options;
      options.sharding = sharding;
      expect_matches(p, Causal(), causal_visibility(length, length, Alignment::TopLeft), options,
                     run_ring(p, Causal(), options));
    }
  }
}

// Bitwise: the same call twice, on 1, 3 (num_threads) and 2 (OpenMP's default) threads, gives the same bits.
TYPED_TEST(RingTest, BitwiseRepeatableAcrossRunsAndThreads) {
  using T = TypeParam;
  const Problem<T> p(300, 300, 2, 1, 32, 32, 14);
  ad::RingOptions options;
  options.sharding = ad::Sharding::Zigzag;
  options.block_q = 32;
  const Shard<T> first = run_ring(p, Causal(), options);
  const Shard<T> again = run_ring(p, Causal(), options);
  EXPECT_TRUE(identical(first.out, again.out));
  EXPECT_TRUE(identical(first.lse, again.lse));
  options.num_threads = 3;
  const Shard<T> threaded = run_ring(p, Causal(), options);
  EXPECT_TRUE(identical(first.out, threaded.out));
  EXPECT_TRUE(identical(first.lse, threaded.lse));
#ifdef _OPENMP
  options.num_threads = 0;  // OpenMP's default team
  const int threads = omp_get_max_threads();
  omp_set_num_threads(2);
  const Shard<T> defaulted = run_ring(p, Causal(), options);
  omp_set_num_threads(threads);
  EXPECT_TRUE(identical(first.out, defaulted.out));
  EXPECT_TRUE(identical(first.lse, defaulted.lse));
#endif
}

// What the plan skips: under a causal mask with contiguous shards rank r computes exactly the
// blocks 0..r and passes on only blocks that a later rank still needs; a window narrower than a
// shard reaches only the previous rank, so each rank computes at most 2 blocks and sends at
// most one message.
TEST(RingPlan, MasksSkipBlocksAndMessages) {
  const int ranks = comm_size(), rank = comm_rank();
  const Problem<double> p(64 * ranks, 64 * ranks, 1, 1, 8, 8, 15);
  ad::RingProfile profile;
  ad::RingOptions options;
  options.profile = &profile;
  run_ring(p, Causal(), options);
  ASSERT_EQ(profile.steps.size(), std::size_t(ranks));
  for (int step = 0; step < ranks; ++step) {
    const ad::RingStep& s = profile.steps[std::size_t(step)];
    EXPECT_EQ(s.block, (rank - step + ranks) % ranks);
    EXPECT_EQ(s.computed, s.block <= rank) << "step " << step;
    // Block b held by rank r = b + step goes on while a rank after r (before the ring wraps) exists.
    const bool forwards = step + 1 < ranks && s.block + step + 1 < ranks;
    EXPECT_EQ(s.bytes_sent, forwards ? 64 * 16 * Index(sizeof(double)) : 0) << "step " << step;
  }
  run_ring(p, Window(10, 0), options);
  int computed = 0;
  Index sent = 0;
  for (const ad::RingStep& s : profile.steps) {
    computed += s.computed ? 1 : 0;
    sent += s.bytes_sent;
  }
  EXPECT_EQ(computed, rank == 0 ? 1 : 2);
  EXPECT_EQ(sent, rank + 1 < ranks ? 64 * 16 * Index(sizeof(double)) : 0);
}

// One rank's bad arguments make every rank throw (none is left waiting in a collective).
TEST(RingErrors, EveryRankThrowsWhenOneRankIsWrong) {
  const int ranks = comm_size(), rank = comm_rank();
  const Problem<float> p(40, 40, 2, 2, 8, 8, 16);
  const Matrix<float> q = ad::shard_rows(p.q, ad::Sharding::Contiguous, ranks, rank);
  const Matrix<float> k = ad::shard_rows(p.k, ad::Sharding::Contiguous, ranks, rank);
  const Matrix<float> v = ad::shard_rows(p.v, ad::Sharding::Contiguous, ranks, rank);
  // The last rank's output has a wrong width.
  Matrix<float> out(q.rows(), rank == ranks - 1 ? 15 : 16);
  EXPECT_THROW(ad::ring_attention_into(MPI_COMM_WORLD, q, k, v, 2, out, Causal()), attend::invalid_argument);
  // Rank 0 holds one key too many: with Lk = 41 its shard would still have floor(41 / N) rows.
  Matrix<float> good(q.rows(), 16);
  const Matrix<float> k_more = rank == 0 ? Matrix<float>::Ones(k.rows() + 1, k.cols()) : k;
  const Matrix<float> v_more = rank == 0 ? Matrix<float>::Ones(v.rows() + 1, v.cols()) : v;
  if (ranks > 1) {
    try {
      ad::ring_attention_into(MPI_COMM_WORLD, q, k_more, v_more, 2, good, Causal());
      ADD_FAILURE() << "expected attend::invalid_argument";
    } catch (const attend::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("holds"), std::string::npos) << e.what();
    }
  }
  // Heads that differ between ranks (2 heads of width 8 on rank 0, 1 of width 16 elsewhere).
  if (ranks > 1) {
    EXPECT_THROW(ad::ring_attention_into(MPI_COMM_WORLD, q, k, v, rank == 0 ? 2 : 1, good, NoMask{}),
                 attend::invalid_argument);
  }
}

}  // namespace
}  // namespace attend::test
