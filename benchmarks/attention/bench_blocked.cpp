// SPDX-License-Identifier: MIT
// Materialized vs blocked scaled dot-product attention, H = 8 heads of one sequence, fp32:
// L in {512, ..., 8192}, d in {64, 128}, no mask and causal, 1 and 2 threads.
//
// Each run reports GFLOP/s (4 L^2 d per head, half for causal), the percentage of the FMA
// peak measured in the same run at the same thread count, and the scratch bytes of all
// threads (for the materialized path, one (L, L) score matrix per thread: 256 MiB at
// L = 8192). Pick sizes with a filter, e.g.
//   attention_bench_blocked --benchmark_filter='Blocked.*/2048/128/2' --benchmark_repetitions=5
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

#include <string>

namespace {

using attend::Algorithm;
using attend::Index;

constexpr Index kHeads = 8;

template <Algorithm Path, bool IsCausal>
void BM_Attention(benchmark::State& state) {
  using T = float;
  const Index length = state.range(0), dim = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kHeads * dim);
  const attend::Matrix<T> k = attend::Matrix<T>::Random(length, kHeads * dim);
  const attend::Matrix<T> v = attend::Matrix<T>::Random(length, kHeads * dim);
  attend::Matrix<T> out(length, kHeads * dim);
  attend::AttentionOptions options;
  options.algorithm = Path;
  const attend::BatchLayout layout{kHeads, 1};
  for (auto _ : state) {
    if constexpr (IsCausal)
      attend::batched_attention_into(q, k, v, out, layout, attend::Causal{}, options);
    else
      attend::batched_attention_into(q, k, v, out, layout, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double scratch_per_thread =
      Path == Algorithm::Materialized
          ? double(sizeof(T)) * double(length) * double(length)
          : double(attend::detail::BlockedScratch<T>::bytes(attend::detail::resolve_tiles(options), dim, dim));
  attend::bench::report<T>(state, double(kHeads) * attend::bench::attention_flops(length, length, dim, IsCausal),
                           threads, scratch_per_thread * threads);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "d", "threads"});
  for (int threads : {1, 2})
    for (Index dim : {64, 128})
      for (Index length : {512, 1024, 2048, 4096, 8192}) b->Args({length, dim, threads});
  // Sizes of one iteration run seconds at L = 8192: keep the default run short.
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK_TEMPLATE(BM_Attention, Algorithm::Materialized, false)->Name("Materialized/NoMask")->Apply(shapes);
BENCHMARK_TEMPLATE(BM_Attention, Algorithm::Blocked, false)->Name("Blocked/NoMask")->Apply(shapes);
BENCHMARK_TEMPLATE(BM_Attention, Algorithm::Materialized, true)->Name("Materialized/Causal")->Apply(shapes);
BENCHMARK_TEMPLATE(BM_Attention, Algorithm::Blocked, true)->Name("Blocked/Causal")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
