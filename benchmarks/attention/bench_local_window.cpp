// SPDX-License-Identifier: MIT
// Local-window attention: causal sliding window of w = 256 keys, one head, fp32, d = 64, blocked
// path, L = 4096 ... 65536. The cost is linear in L: ns_per_query stays flat as L doubles.
// FLOPs count 4 L w d (the keys actually in the window).
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64, kWindow = 256;

void BM_SlidingWindow(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim), k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim);
  attend::Matrix<T> out(length, kDim);
  const attend::AttentionOptions options;  // Auto: blocked for a window this narrow
  for (auto _ : state) {
    attend::local_window_attention_into(q, k, v, attend::sliding_window(kWindow), out, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
  }
  attend::bench::report<T>(state, 4.0 * double(length) * double(kWindow) * double(kDim), threads,
                           double(threads) * double(attend::detail::BlockedScratch<T>::bytes(
                                                 attend::detail::resolve_tiles(options), kDim, kDim)));
  state.counters["ns_per_query"] = benchmark::Counter(double(length) * 1e-9, benchmark::Counter::kIsIterationInvariantRate |
                                                                                benchmark::Counter::kInvert);
}

BENCHMARK(BM_SlidingWindow)
    ->ArgNames({"L", "threads"})
    ->ArgsProduct({{4096, 8192, 16384, 32768, 65536}, {1, 2}})
    ->MinTime(0.2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
