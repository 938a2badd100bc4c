// SPDX-License-Identifier: MIT
// Ring attention over MPI: a long causal sequence split over the ranks (zigzag shards, GQA),
// checked against a single-process run of a shorter prefix (causal: the first P outputs depend
// only on the first P tokens).
//
//   mpiexec -n 4 ./example_ring_attention [tokens]
//
// Each rank holds the queries, keys and values of its shard and gets the output of its shard;
// K/V blocks travel around the ring while each rank computes (see attend/distributed/ring.hpp).
#include <attend/distributed.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);  // only the main thread calls MPI
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  namespace ad = attend::distributed;
  using Matrix = attend::Matrix<float>;

  const attend::Index tokens = argc > 1 ? std::atol(argv[1]) : 4096, prefix = std::min<attend::Index>(tokens, 512);
  const attend::Index heads = 8, kv_heads = 2, d = 64;

  // Every rank draws the same sequence (a real model would compute its shard's projections).
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  const auto random = [&](attend::Index rows, attend::Index cols) {
    return Matrix(Matrix::NullaryExpr(rows, cols, [&] { return normal(rng); }));
  };
  const Matrix q = random(tokens, heads * d), k = random(tokens, kv_heads * d), v = random(tokens, kv_heads * d);

  // This rank's shard: chunks r and 2N - 1 - r of 2N, so that every rank does the same causal work.
  ad::RingOptions options;
  options.sharding = ad::Sharding::Zigzag;
  const Matrix q_mine = ad::shard_rows(q, options.sharding, ranks, rank);
  const Matrix k_mine = ad::shard_rows(k, options.sharding, ranks, rank);
  const Matrix v_mine = ad::shard_rows(v, options.sharding, ranks, rank);
  Matrix out_mine(q_mine.rows(), heads * d);
  const double start = MPI_Wtime();
  ad::ring_attention_into(MPI_COMM_WORLD, q_mine, k_mine, v_mine, heads, out_mine, attend::Causal(), options);
  const double seconds = MPI_Wtime() - start;

  // The whole output in sequence order, then the check against one process on the prefix.
  const Matrix out = ad::allgather_rows(MPI_COMM_WORLD, out_mine, options.sharding);
  int status = 0;
  if (rank == 0) {
    Matrix expected(prefix, heads * d);
    attend::multi_head_attention_into(q.topRows(prefix), k.topRows(prefix), v.topRows(prefix), heads, expected,
                                      attend::Causal());
    const float error = (out.topRows(prefix) - expected).cwiseAbs().maxCoeff();
    std::printf("%ld tokens over %d ranks (%ld each), %ld heads on %ld kv heads, d = %ld: %.3f s\n", long(tokens),
                ranks, long(q_mine.rows()), long(heads), long(kv_heads), long(d), seconds);
    std::printf("first %ld outputs vs one process on the prefix: max |difference| = %.2e\n", long(prefix), error);
    status = error <= 1e-5f ? 0 : 1;
    if (status) std::printf("mismatch\n");
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
