// SPDX-License-Identifier: MIT
// Additive (Bahdanau) attention, one head, fp32, blocked path: time per (query, key) pair for
// L in {256, 1024, 4096} and hidden size h in {32, 128}, next to scaled dot-product attention of
// the same shape. The cost is one h-wide tanh per pair (no GEMM), so ns/pair is the figure to
// compare; GFLOP/s counts 3h + 2 Dv flops per pair (add, tanh as one, multiply-add; P V).
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64;

void report_pairs(benchmark::State& state, Index length, Index hidden, int threads, double scratch) {
  const double pairs = double(length) * double(length);
  attend::bench::report<T>(state, pairs * double(3 * hidden + 2 * kDim), threads, scratch);
  state.counters["ns_per_pair"] =
      benchmark::Counter(pairs * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void BM_Additive(benchmark::State& state) {
  const Index length = state.range(0), hidden = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const attend::AdditiveAttention<T> layer(attend::Matrix<T>::Random(hidden, kDim) / 8,
                                           attend::Matrix<T>::Random(hidden, kDim) / 8,
                                           attend::Vector<T>::Random(hidden), attend::Vector<T>::Random(hidden));
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim), k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim);
  attend::Matrix<T> out(length, kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    layer.forward_into(q, k, v, out, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
  }
  const auto tiles = attend::detail::resolve_tiles(options);
  // Projections (Lq + Lk, h) plus the engine's per-thread tile scratch.
  const double scratch = double(sizeof(T)) * double(2 * length * hidden) +
                         double(threads) * double(attend::detail::BlockedScratch<T>::bytes(tiles, hidden, kDim));
  report_pairs(state, length, hidden, threads, scratch);
}

void BM_ScaledDotSameShape(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim), k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim);
  attend::Matrix<T> out(length, kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    attend::scaled_dot_product_attention_into(q, k, v, out, attend::NoMask{}, options);
    benchmark::DoNotOptimize(out.data());
  }
  const double pairs = double(length) * double(length);
  attend::bench::report<T>(state, attend::bench::attention_flops(double(length), double(length), kDim, false), threads,
                           double(threads) * double(attend::detail::BlockedScratch<T>::bytes(
                                                 attend::detail::resolve_tiles(options), kDim, kDim)));
  state.counters["ns_per_pair"] =
      benchmark::Counter(pairs * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "h", "threads"});
  for (int threads : {1, 2})
    for (Index hidden : {32, 128})
      for (Index length : {256, 1024, 4096}) b->Args({length, hidden, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Additive)->Apply(shapes);
BENCHMARK(BM_ScaledDotSameShape)->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
