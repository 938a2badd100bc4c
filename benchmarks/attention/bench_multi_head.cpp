// SPDX-License-Identifier: MIT
// Multi-head self attention forward, fp32, width 512 with 8 heads (d = 64), L in {128, 512, 2048}:
//  - Projected: MultiHeadAttention::forward (Q/K/V in-projections, attention, out-projection),
//    FLOPs 4 (2 L 512 512) for the four projections plus 8 x 4 L^2 64 for the heads;
//  - Heads: multi_head_attention_into on already projected Q, K, V (no projections).
// Each run reports GFLOP/s, the percentage of the FMA peak measured in the same run at the same
// thread count, and the scratch bytes (the projected Q, K, V and the concatenated heads).
#include "support/counters.hpp"

#include <attend/attention/multi_head.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;

constexpr Index kWidth = 512, kHeads = 8;

attend::MultiHeadWeights<T> random_weights() {
  const T s = T(1) / T(22.6);  // about 1/sqrt(512): unit-variance projections
  return {attend::Matrix<T>::Random(kWidth, kWidth) * s, attend::Matrix<T>::Random(kWidth, kWidth) * s,
          attend::Matrix<T>::Random(kWidth, kWidth) * s, attend::Matrix<T>::Random(kWidth, kWidth) * s,
          attend::Vector<T>::Random(kWidth),            attend::Vector<T>::Random(kWidth),
          attend::Vector<T>::Random(kWidth),            attend::Vector<T>::Random(kWidth)};
}

double head_flops(Index length) {
  return double(kHeads) * attend::bench::attention_flops(double(length), double(length), double(kWidth / kHeads), false);
}

void BM_Projected(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const attend::MultiHeadAttention<T> mha(kHeads, random_weights());
  const attend::Matrix<T> x = attend::Matrix<T>::Random(length, kWidth);
  for (auto _ : state) {
    attend::MultiHeadResult<T> r = mha.forward(x);
    benchmark::DoNotOptimize(r.output.data());
    benchmark::ClobberMemory();
  }
  const double projection_flops = 4 * 2.0 * double(length) * kWidth * kWidth;
  attend::bench::report<T>(state, projection_flops + head_flops(length), threads,
                           4.0 * sizeof(T) * double(length) * kWidth);
}

void BM_Heads(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kWidth);
  const attend::Matrix<T> k = attend::Matrix<T>::Random(length, kWidth);
  const attend::Matrix<T> v = attend::Matrix<T>::Random(length, kWidth);
  attend::Matrix<T> out(length, kWidth);
  for (auto _ : state) {
    attend::multi_head_attention_into(q, k, v, kHeads, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  attend::bench::report<T>(state, head_flops(length), threads, 0);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "threads"});
  for (int threads : {1, 2})
    for (Index length : {128, 512, 2048}) b->Args({length, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Projected)->Name("MHA/Projected/E512/H8")->Apply(shapes);
BENCHMARK(BM_Heads)->Name("MHA/Heads/E512/H8")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
