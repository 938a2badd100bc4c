// SPDX-License-Identifier: MIT
// Prefill attention of every head of an (L, H d) matrix (multi_head_attention_into, H = 8) in
// fp32, bf16 and f16, non-causal and causal, in one run:
//   Prefill/<precision>/<mask>/L:<L>/d:<d>/threads:<n>
// Each reports GFLOP/s (4 L^2 d per head, half of it causal), pct_peak against the fp32 FMA
// peak measured in the same run, and, for bf16 and f16, pct_bf16_peak against the
// AVX512-BF16 dot-product peak measured in the same run (where the build targets it).
// The ratio bf16 / fp32 of two rows of the same shape is the speed-up of the reduced path.
#include "support/counters.hpp"

#include <attend/attention/multi_head.hpp>

#include <benchmark/benchmark.h>

#include <string>

namespace {

using attend::Index;

constexpr Index kHeads = 8;

template <class S>
void BM_Prefill(benchmark::State& state) {
  const Index length = state.range(0), dim = state.range(1);
  const bool causal = state.range(2) != 0;
  const int threads = int(state.range(3));
  attend::bench::set_threads(threads);
  const attend::Matrix<S> q = attend::Matrix<float>::Random(length, kHeads * dim).template cast<S>();
  const attend::Matrix<S> k = attend::Matrix<float>::Random(length, kHeads * dim).template cast<S>();
  const attend::Matrix<S> v = attend::Matrix<float>::Random(length, kHeads * dim).template cast<S>();
  attend::Matrix<S> out(length, kHeads * dim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    if (causal)
      attend::multi_head_attention_into(q, k, v, kHeads, out, attend::Causal(), options);
    else
      attend::multi_head_attention_into(q, k, v, kHeads, out, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double flops =
      double(kHeads) * attend::bench::attention_flops(double(length), double(length), double(dim), causal);
  attend::bench::report<float>(state, flops, threads, 0);
#if defined(__AVX512BF16__)
  if constexpr (!std::is_same_v<S, float>) {
    const double bf16_peak = attend::bench::bf16_dot_peak_gflops(threads);
    state.counters["bf16_peak_GFLOPS"] = bf16_peak;
    state.counters["pct_bf16_peak"] =
        benchmark::Counter(flops * 1e-9 / bf16_peak * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  }
#endif
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "d", "causal", "threads"});
  for (Index dim : {64, 128})
    for (Index length : {1024, 2048, 4096})
      for (int causal : {0, 1}) b->Args({length, dim, causal, 2});
  b->Args({4096, 128, 0, 1});
  b->MinTime(0.3)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Prefill<float>)->Name("Prefill/fp32")->Apply(shapes);
BENCHMARK(BM_Prefill<Eigen::bfloat16>)->Name("Prefill/bf16")->Apply(shapes);
BENCHMARK(BM_Prefill<Eigen::half>)->Name("Prefill/f16")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
