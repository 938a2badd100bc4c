// SPDX-License-Identifier: MIT
// Ring attention over MPI (attend/distributed/ring.hpp): per ring step, the compute time, the
// time blocked in MPI after it, the time the same K/V transfer takes alone, and so the fraction
// of the communication hidden behind the compute; plus the kernel rate and the link bandwidth
// that the scaling model of docs/DISTRIBUTED.md takes as its parameters.
//
//   mpiexec -n 2 ./distributed_ring_benchmark [--chunk=2048] [--heads=8] [--kv-heads=8] [--dim=128]
//           [--mask=causal|none] [--sharding=zigzag|contiguous] [--repeats=3] [--double]
//
// chunk = tokens per rank (L = N chunk). Times are the slowest rank's (max over ranks), each
// the best of `repeats` runs. With more ranks than free cores (mpiexec --oversubscribe), the wait
// also holds the time a rank waits for a slower neighbour, so the hidden fraction is a lower bound.
#include <attend/distributed.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

namespace ad = attend::distributed;
using attend::Index;

struct Config {
  Index chunk = 2048, heads = 8, kv_heads = 8, dim = 128;
  bool causal = true, zigzag = true, use_double = false;
  int repeats = 3;
};

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* name) -> const char* {
      const std::size_t n = std::strlen(name);
      return arg.compare(0, n, name) == 0 ? arg.c_str() + n : nullptr;
    };
    if (value("--chunk=")) c.chunk = std::atol(value("--chunk="));
    else if (value("--heads=")) c.heads = std::atol(value("--heads="));
    else if (value("--kv-heads=")) c.kv_heads = std::atol(value("--kv-heads="));
    else if (value("--dim=")) c.dim = std::atol(value("--dim="));
    else if (value("--repeats=")) c.repeats = std::max(1, std::atoi(value("--repeats=")));
    else if (value("--mask=")) c.causal = std::string(value("--mask=")) == "causal";
    else if (value("--sharding=")) c.zigzag = std::string(value("--sharding=")) == "zigzag";
    else if (arg == "--double") c.use_double = true;
    else {
      std::fprintf(stderr, "unknown argument %s (see the comment at the top of bench_ring.cpp)\n", argv[i]);
      std::exit(2);
    }
  }
  return c;
}

double max_over_ranks(double x) {
  double m = 0;
  MPI_Allreduce(&x, &m, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return m;
}

template <class T>
int run(const Config& c) {
  using Matrix = attend::Matrix<T>;
  int rank = 0, ranks = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  const Index length = c.chunk * ranks, d = c.dim;
  std::mt19937 rng(unsigned(17 + rank));
  std::normal_distribution<double> normal;
  const auto random = [&](Index rows, Index cols) {
    return Matrix(Matrix::NullaryExpr(rows, cols, [&] { return T(normal(rng)); }));
  };
  ad::RingOptions options;
  options.sharding = c.zigzag ? ad::Sharding::Zigzag : ad::Sharding::Contiguous;
  const Index rows = ad::shard_length(options.sharding, length, ranks, rank);
  const Matrix q = random(rows, c.heads * d), k = random(rows, c.kv_heads * d), v = random(rows, c.kv_heads * d);
  Matrix out(rows, c.heads * d);

  // Kernel rate: this rank's queries against its own keys, no mask (4 C^2 d H FLOPs).
  double kernel = std::numeric_limits<double>::infinity();
  for (int r = 0; r < c.repeats; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    attend::multi_head_attention_into(q, k, v, c.heads, out);
    kernel = std::min(kernel, max_over_ranks(MPI_Wtime() - t0));
  }
  const double rate = 4.0 * double(rows) * double(rows) * double(d) * double(c.heads) / kernel;

  // The K/V transfer of one step alone: rank r sends its packed [K | V] to r + 1.
  const Matrix packed = random(rows, 2 * c.kv_heads * d);
  Matrix incoming(rows, packed.cols());
  const double bytes = double(packed.size()) * sizeof(T);
  double transfer = std::numeric_limits<double>::infinity();
  if (ranks > 1)
    for (int r = 0; r < c.repeats + 2; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      MPI_Request requests[2];
      const MPI_Datatype type = ad::detail::mpi_type<T>();
      MPI_Irecv(incoming.data(), int(incoming.size()), type, (rank + ranks - 1) % ranks, 1, MPI_COMM_WORLD, &requests[0]);
      MPI_Isend(packed.data(), int(packed.size()), type, (rank + 1) % ranks, 1, MPI_COMM_WORLD, &requests[1]);
      MPI_Waitall(2, requests, MPI_STATUSES_IGNORE);
      transfer = std::min(transfer, max_over_ranks(MPI_Wtime() - t0));
    }

  // The ring, best of `repeats` by total time; per step, the slowest rank's compute and wait.
  std::vector<double> best_compute, best_wait;
  std::vector<int> best_computed, best_sent;
  double best_total = std::numeric_limits<double>::infinity();
  for (int r = 0; r < c.repeats; ++r) {
    ad::RingProfile profile;
    options.profile = &profile;
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    if (c.causal)
      ad::ring_attention_into(MPI_COMM_WORLD, q, k, v, c.heads, out, attend::Causal(), options);
    else
      ad::ring_attention_into(MPI_COMM_WORLD, q, k, v, c.heads, out, attend::NoMask(), options);
    const double total = max_over_ranks(MPI_Wtime() - t0);
    std::vector<double> compute, wait, compute_max(std::size_t(ranks), 0.0), wait_max(std::size_t(ranks), 0.0);
    std::vector<int> computed, sent, computed_sum(std::size_t(ranks), 0), sent_any(std::size_t(ranks), 0);
    for (const ad::RingStep& step : profile.steps) {
      compute.push_back(step.compute_seconds);
      wait.push_back(step.wait_seconds);
      computed.push_back(step.computed ? 1 : 0);
      sent.push_back(step.bytes_sent > 0 ? 1 : 0);
    }
    MPI_Allreduce(compute.data(), compute_max.data(), ranks, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(wait.data(), wait_max.data(), ranks, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    MPI_Allreduce(computed.data(), computed_sum.data(), ranks, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(sent.data(), sent_any.data(), ranks, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (total < best_total) {
      best_total = total;
      best_compute = compute_max;
      best_wait = wait_max;
      best_computed = computed_sum;
      best_sent = sent_any;
    }
  }

  if (rank == 0) {
    const double flops_total = (c.causal ? 2.0 * double(length) * double(length + 1) : 4.0 * double(length) * double(length)) *
                               double(d) * double(c.heads);
    // What a ring call allocates: two K/V buffers, the running log-sum-exp, and per thread the
    // kernel's scratch plus one query tile's partial; the caller holds the Q, K, V and output shards.
    const attend::detail::TileShape tiles = attend::detail::kDefaultTiles;
    const double scratch = double(attend::detail::BlockedScratch<T>::bytes(tiles, d, d)) +
                           double(sizeof(T)) * double(tiles.queries * (d + 1));
    const double allocated = double(sizeof(T)) * double(rows) * (2.0 * 2.0 * double(c.kv_heads * d) + double(c.heads));
    const double held = double(sizeof(T)) * double(rows) * (2.0 * double(c.heads * d) + 2.0 * double(c.kv_heads * d));
#ifdef _OPENMP
    const int threads = omp_get_max_threads();
#else
    const int threads = 1;
#endif
    std::printf("ring attention: %d ranks x %d threads, L = %d x %ld = %ld tokens, H = %ld, H_kv = %ld, d = %ld, %s, "
                "%s, %s shards\n",
                ranks, threads, ranks, long(c.chunk), long(length), long(c.heads), long(c.kv_heads), long(d),
                sizeof(T) == 4 ? "float" : "double", c.causal ? "causal" : "no mask", c.zigzag ? "zigzag" : "contiguous");
    std::printf("kernel: one %ld x %ld block, %ld heads: %.2f ms, %.1f GFLOP/s per rank\n", long(rows), long(rows),
                long(c.heads), kernel * 1e3, rate / 1e9);
    if (ranks > 1)
      std::printf("transfer of one K/V block alone (%.2f MiB): %.3f ms, %.2f GB/s\n", bytes / 1048576.0,
                  transfer * 1e3, bytes / transfer / 1e9);
    std::printf("%4s %9s %11s %9s %12s %7s\n", "step", "computed", "compute ms", "wait ms", "transfer ms", "hidden");
    double waited = 0, exposed_base = 0, compute_sum = 0;
    for (int s = 0; s < ranks; ++s) {
      const std::size_t i = std::size_t(s);
      compute_sum += best_compute[i];
      if (best_sent[i]) {
        const double hidden = std::clamp(1.0 - best_wait[i] / transfer, 0.0, 1.0);
        waited += std::min(best_wait[i], transfer);
        exposed_base += transfer;
        std::printf("%4d %6d/%-2d %11.2f %9.3f %12.3f %6.1f%%\n", s, best_computed[i], ranks, best_compute[i] * 1e3,
                    best_wait[i] * 1e3, transfer * 1e3, 100 * hidden);
      } else {
        std::printf("%4d %6d/%-2d %11.2f %9.3f %12s %7s\n", s, best_computed[i], ranks, best_compute[i] * 1e3,
                    best_wait[i] * 1e3, "-", "-");
      }
    }
    const double ideal = flops_total / (double(ranks) * rate);
    std::printf("total %.2f ms (sum of step compute %.2f ms); communication hidden: %.1f%% of %.3f ms\n",
                best_total * 1e3, compute_sum * 1e3, exposed_base > 0 ? 100 * (1 - waited / exposed_base) : 100.0,
                exposed_base * 1e3);
    std::printf("ideal (FLOPs / (N x kernel rate)) %.2f ms: parallel efficiency %.1f%%\n", ideal * 1e3,
                100 * ideal / best_total);
    std::printf("memory per rank: %.1f MiB allocated by the call (2 K/V buffers, lse) + %.2f MiB per thread; "
                "%.1f MiB of Q, K, V and output shards\n",
                allocated / 1048576.0, scratch / 1048576.0, held / 1048576.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  const Config config = parse(argc, argv);
  const int status = config.use_double ? run<double>(config) : run<float>(config);
  MPI_Finalize();
  return status;
}
