// SPDX-License-Identifier: MIT
// Score biases on scaled dot-product attention, one head, fp32, d = 64, causal, blocked path:
// none, ALiBi and the T5 relative position bias (a per-element add computed from (i, j)).
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64;

enum class Bias { None, Alibi, Relative };

template <Bias B>
void BM_Bias(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim), k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim);
  const attend::Vector<T> table = attend::Vector<T>::Random(32);
  attend::Matrix<T> out(length, kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    if constexpr (B == Bias::None) attend::scaled_dot_product_attention_into(q, k, v, out, attend::Causal{}, options);
    if constexpr (B == Bias::Alibi)
      attend::scaled_dot_product_attention_into(q, k, v, out, attend::Causal{} & attend::Alibi(0.0625), options);
    if constexpr (B == Bias::Relative)
      attend::scaled_dot_product_attention_into(q, k, v, out, attend::Causal{} & attend::RelativePositionBias(table),
                                                options);
    benchmark::DoNotOptimize(out.data());
  }
  attend::bench::report<T>(state, attend::bench::attention_flops(double(length), double(length), kDim, true), threads,
                           double(threads) * double(attend::detail::BlockedScratch<T>::bytes(
                                                 attend::detail::resolve_tiles(options), kDim, kDim)));
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "threads"})->ArgsProduct({{1024, 4096}, {1, 2}});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Bias<Bias::None>)->Name("Causal")->Apply(shapes);
BENCHMARK(BM_Bias<Bias::Alibi>)->Name("Causal+ALiBi")->Apply(shapes);
BENCHMARK(BM_Bias<Bias::Relative>)->Name("Causal+T5Relative")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
