// SPDX-License-Identifier: MIT
// Top-k attention against plain scaled dot-product attention, one head, fp32, d = 64, blocked:
// L in {1024, 4096}, k in {1, 16, 256}. Top-k runs a selection pass over the score tiles and then
// the engine with only the selected keys visible, so it costs about two score passes; GFLOP/s
// counts the plain attention's 4 L^2 d so that rates compare directly.
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64;

void BM_TopK(benchmark::State& state) {
  const Index length = state.range(0), top_k = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim), k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim);
  attend::Matrix<T> out(length, kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    if (top_k == 0)
      attend::scaled_dot_product_attention_into(q, k, v, out, attend::NoMask{}, options);
    else
      attend::top_k_attention_into(q, k, v, top_k, out, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
  }
  const auto tiles = attend::detail::resolve_tiles(options);
  // Selection: per thread (Bq, k) best keys + k + Bk merge buffer + a score tile; (Lq, k) indices.
  const double selection =
      top_k == 0 ? 0.0
                 : double(threads) * double((tiles.queries + 1) * top_k + tiles.keys) * double(sizeof(T) + sizeof(Index)) +
                       double(length * top_k) * double(sizeof(Index));
  attend::bench::report<T>(state, attend::bench::attention_flops(double(length), double(length), kDim, false), threads,
                           selection + double(threads) * double(attend::detail::BlockedScratch<T>::bytes(tiles, kDim, kDim)));
}

BENCHMARK(BM_TopK)
    ->ArgNames({"L", "k", "threads"})
    ->ArgsProduct({{1024, 4096}, {0, 1, 16, 256}, {1, 2}})
    ->MinTime(0.2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
