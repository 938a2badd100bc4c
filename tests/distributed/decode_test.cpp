// SPDX-License-Identifier: MIT
// One decode step over a KV cache sharded across the ranks (distributed/decode.hpp): against the
// long-double reference over all keys and the single-process decode step (tolerance rule), the
// same bits run to run, a rank without keys, per-rank KVCache shards filled round-robin, and
// errors raised on every rank.
#include <attend/distributed.hpp>

#include "support/random.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

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

/// Checks the (1, H d_v) output and (H) lse of a step over all keys (k, v) against the reference
/// per head, and the single-process decode step against the same.
template <class T>
void expect_step_matches(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Index heads,
                         const Matrix<T>& out, const Vector<T>& lse) {
  const Index d = q.cols() / heads, kv_heads = k.cols() / d, dv = v.cols() / kv_heads, group = heads / kv_heads;
  Matrix<T> single(1, heads * dv);
  decode_attention_into(q, k, v, heads, single);
  const T scale = T(1) / std::sqrt(T(d));
  const BoolMatrix visible = BoolMatrix::Constant(1, k.rows(), true);
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / group;
    const Matrix<T> qh = q.middleCols(h * d, d), kh = k.middleCols(g * d, d), vh = v.middleCols(g * dv, dv);
    const Reference ref = reference_attention(qh, kh, vh, Real(scale), visible);
    const Baseline<T> base = baseline_attention<T>(qh, kh, vh, scale, visible);
    expect_matches_reference<T>(out.middleCols(h * dv, dv), lse.segment(h, 1), ref, base);
    expect_matches_reference<T>(single.middleCols(h * dv, dv), Vector<T>(), ref, base);
  }
}

template <class T>
class DecodeTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(DecodeTest, Scalars);

// Uneven contiguous shards (rank 0 holds no key when there are several ranks), GQA 8 on 2,
// several local splits: the step matches the reference over all keys, and repeats bit for bit.
TYPED_TEST(DecodeTest, ShardedCacheMatchesReference) {
  using T = TypeParam;
  const int ranks = comm_size(), rank = comm_rank();
  const Index heads = 8, kv_heads = 2, d = 32, dv = 16;
  std::vector<Index> begin(std::size_t(ranks) + 1, 0);  // rank r holds keys [begin[r], begin[r + 1])
  for (int r = 0; r < ranks; ++r) begin[std::size_t(r) + 1] = begin[std::size_t(r)] + (ranks > 1 && r == 0 ? 0 : 150 + 37 * r);
  const Index lk = begin.back();
  Rng rng(21);
  const Matrix<T> q = rng.normal<T>(1, heads * d), k = rng.normal<T>(lk, kv_heads * d),
                  v = rng.normal<T>(lk, kv_heads * dv);
  const Index mine = begin[std::size_t(rank)], rows = begin[std::size_t(rank) + 1] - mine;
  AttentionOptions options;
  options.block_k = 64;  // several splits per rank
  Matrix<T> out(1, heads * dv), again(1, heads * dv);
  Vector<T> lse(heads), lse_again(heads);
  ad::distributed_decode_attention_into(MPI_COMM_WORLD, q, k.middleRows(mine, rows), v.middleRows(mine, rows), heads,
                                        out, options, lse);
  expect_step_matches<T>(q, k, v, heads, out, lse);
  ad::distributed_decode_attention_into(MPI_COMM_WORLD, q, k.middleRows(mine, rows), v.middleRows(mine, rows), heads,
                                        again, options, lse_again);
  EXPECT_TRUE(identical(out, again));
  EXPECT_TRUE(identical(lse, lse_again));
}

// Each rank keeps its own KVCache; token t goes to rank t mod N (round-robin appends). Steps after
// every token match the reference over all tokens so far.
TYPED_TEST(DecodeTest, RoundRobinKVCaches) {
  using T = TypeParam;
  const int ranks = comm_size(), rank = comm_rank();
  const Index heads = 4, kv_heads = 1, d = 16, tokens = 23;
  Rng rng(22);
  const Matrix<T> q = rng.normal<T>(tokens, heads * d), k = rng.normal<T>(tokens, kv_heads * d),
                  v = rng.normal<T>(tokens, kv_heads * d);
  KVCache<T> cache(tokens, kv_heads, d);
  for (Index t = 0; t < tokens; ++t) {
    SCOPED_TRACE("token " + std::to_string(t));
    if (t % ranks == rank) cache.append(k.middleRows(t, 1), v.middleRows(t, 1));
    Matrix<T> out(1, heads * d);
    Vector<T> lse(heads);
    ad::distributed_decode_attention_into(MPI_COMM_WORLD, q.middleRows(t, 1), cache.keys(), cache.values(), heads,
                                          out, {}, lse);
    // The reference sees the tokens in rank order, not time order: attention does not depend on it.
    expect_step_matches<T>(q.middleRows(t, 1), k.topRows(t + 1), v.topRows(t + 1), heads, out, lse);
  }
}

// One rank's bad arguments make every rank throw.
TEST(DecodeErrors, EveryRankThrowsWhenOneRankIsWrong) {
  const int ranks = comm_size(), rank = comm_rank();
  Rng rng(23);
  const Matrix<float> q = rng.normal<float>(1, 32), k = rng.normal<float>(10, 16), v = rng.normal<float>(10, 16);
  Matrix<float> out(1, 32);
  // The last rank's keys are narrower than its query's heads.
  const Matrix<float> k_bad = rank == ranks - 1 ? Matrix<float>(rng.normal<float>(10, 12)) : k;
  EXPECT_THROW(ad::distributed_decode_attention_into(MPI_COMM_WORLD, q, k_bad, v, 2, out), attend::invalid_argument);
  // Heads that differ between ranks.
  if (ranks > 1) {
    EXPECT_THROW(ad::distributed_decode_attention_into(MPI_COMM_WORLD, q, k, v, rank == 0 ? 2 : 1, out),
                 attend::invalid_argument);
  }
}

}  // namespace
}  // namespace attend::test
