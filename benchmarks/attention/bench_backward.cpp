// SPDX-License-Identifier: MIT
// The attention backward (attention/backward.hpp) against its forward in the same run: H = 8
// heads of one sequence, fp32, L in {1024, ..., 8192}, d in {64, 128}, no mask and causal,
// 2 threads (and 1 on request). With 8 heads and at most 8 threads the backward runs its one pass
// (one task per head; backward_blocked.hpp); with more threads than heads, the two passes.
//
// Each iteration runs the forward (multi_head_attention_with_lse) and then the backward
// (multi_head_attention_backward_into), timed separately; the benchmark's time is the
// backward's. Counters: the backward's GFLOP/s and % of the FMA peak measured in the run, with
// FlashAttention's convention that a backward is 2.5 forwards (5 GEMMs of L^2 d against 2;
// half of it causal); the forward's GFLOP/s; their ratio `bwd_over_fwd` (the goal is >= 0.75 at
// L >= 2048); and the backward's scratch bytes of all threads, which do not depend on L.
// `Backward16k` runs L = 16384 (d = 128, causal) to show that.
//   benchmarks/attention_bench_backward --benchmark_filter='Backward/.*/2$' --benchmark_repetitions=3
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>

namespace {

using attend::Index;

constexpr Index kHeads = 8;

template <bool IsCausal>
void BM_Backward(benchmark::State& state) {
  using T = float;
  using Clock = std::chrono::steady_clock;
  const Index length = state.range(0), dim = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kHeads * dim);
  const attend::Matrix<T> k = attend::Matrix<T>::Random(length, kHeads * dim);
  const attend::Matrix<T> v = attend::Matrix<T>::Random(length, kHeads * dim);
  const attend::Matrix<T> d_out = attend::Matrix<T>::Random(length, kHeads * dim);
  attend::Matrix<T> dq(length, kHeads * dim), dk(length, kHeads * dim), dv(length, kHeads * dim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  double forward_seconds = 0, backward_seconds = 0;
  for (auto _ : state) {
    const auto start = Clock::now();
    const attend::MultiHeadLseResult<T> forward =
        IsCausal ? attend::multi_head_attention_with_lse(q, k, v, kHeads, attend::Causal{}, options)
                 : attend::multi_head_attention_with_lse(q, k, v, kHeads, attend::NoMask{}, options);
    const auto middle = Clock::now();
    if constexpr (IsCausal)
      attend::multi_head_attention_backward_into(q, k, v, kHeads, forward.output, forward.lse, d_out, dq, dk, dv,
                                                 attend::Causal{}, options);
    else
      attend::multi_head_attention_backward_into(q, k, v, kHeads, forward.output, forward.lse, d_out, dq, dk, dv,
                                                 attend::NoMask{}, options);
    const auto end = Clock::now();
    benchmark::DoNotOptimize(dq.data());
    benchmark::ClobberMemory();
    forward_seconds += std::chrono::duration<double>(middle - start).count();
    backward_seconds += std::chrono::duration<double>(end - middle).count();
    state.SetIterationTime(std::chrono::duration<double>(end - middle).count());
  }
  const double forward_flops = double(kHeads) * attend::bench::attention_flops(length, length, dim, IsCausal);
  const double iterations = double(state.iterations());
  const attend::detail::TileShape tiles = attend::detail::resolve_backward_tiles(options, length, length);
  // The larger of the two passes' scratch and the one pass's (the key pass's and a dS^T tile).
  const double scratch_per_thread =
      double(std::max(attend::detail::KeyPassScratch<T>::bytes(tiles, dim, dim, false, true),
                      attend::detail::QueryPassScratch<T>::bytes(tiles, dim, dim, false)));
  attend::bench::report<T>(state, 2.5 * forward_flops, threads, scratch_per_thread * threads);
  state.counters["fwd_GFLOPS"] = forward_flops * iterations / forward_seconds * 1e-9;
  state.counters["bwd_over_fwd"] = 2.5 * forward_seconds / backward_seconds;
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "d", "threads"});
  for (int threads : {2, 1})
    for (Index dim : {64, 128})
      for (Index length : {1024, 2048, 4096, 8192}) b->Args({length, dim, threads});
  b->MinTime(0.2)->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK_TEMPLATE(BM_Backward, false)->Name("Backward/NoMask")->Apply(shapes);
BENCHMARK_TEMPLATE(BM_Backward, true)->Name("Backward/Causal")->Apply(shapes);
BENCHMARK_TEMPLATE(BM_Backward, true)
    ->Name("Backward16k/Causal")
    ->ArgNames({"L", "d", "threads"})
    ->Args({16384, 128, 2})
    ->Iterations(1)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
