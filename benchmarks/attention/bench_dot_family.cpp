// SPDX-License-Identifier: MIT
// The dot family against scaled dot-product attention, one head, fp32, blocked path, d = 64:
// dot, bilinear (Q W once, then the GEMM path), cosine (rows normalized once) and soft-capped
// (the generic tile path: GEMM on the tile, then tanh). The transforms cost O(L d^2) or O(L d)
// next to O(L^2 d), so the first three should run at the scaled-dot rate.
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64;

enum class Variant { ScaledDot, Dot, Bilinear, Cosine, SoftCapped };

template <Variant V>
void BM_Variant(benchmark::State& state) {
  const Index length = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kDim) / 4, k = attend::Matrix<T>::Random(length, kDim),
                          v = attend::Matrix<T>::Random(length, kDim), w = attend::Matrix<T>::Random(kDim, kDim) / 8;
  attend::Matrix<T> out(length, kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  for (auto _ : state) {
    if constexpr (V == Variant::ScaledDot) attend::scaled_dot_product_attention_into(q, k, v, out, attend::Causal{}, options);
    if constexpr (V == Variant::Dot) attend::dot_product_attention_into(q, k, v, out, attend::Causal{}, options);
    if constexpr (V == Variant::Bilinear) attend::bilinear_attention_into(q, k, v, w, out, attend::Causal{}, options);
    if constexpr (V == Variant::Cosine) attend::cosine_attention_into(q, k, v, 0.1, out, attend::Causal{}, options);
    if constexpr (V == Variant::SoftCapped) attend::soft_capped_attention_into(q, k, v, 30.0, out, attend::Causal{}, options);
    benchmark::DoNotOptimize(out.data());
  }
  attend::bench::report<T>(state, attend::bench::attention_flops(double(length), double(length), kDim, true), threads,
                           double(threads) * double(attend::detail::BlockedScratch<T>::bytes(
                                                 attend::detail::resolve_tiles(options), kDim, kDim)));
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "threads"});
  for (int threads : {1, 2})
    for (Index length : {1024, 4096}) b->Args({length, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_Variant<Variant::ScaledDot>)->Name("ScaledDot/causal")->Apply(shapes);
BENCHMARK(BM_Variant<Variant::Dot>)->Name("Dot/causal")->Apply(shapes);
BENCHMARK(BM_Variant<Variant::Bilinear>)->Name("Bilinear/causal")->Apply(shapes);
BENCHMARK(BM_Variant<Variant::Cosine>)->Name("Cosine/causal")->Apply(shapes);
BENCHMARK(BM_Variant<Variant::SoftCapped>)->Name("SoftCapped/causal")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
