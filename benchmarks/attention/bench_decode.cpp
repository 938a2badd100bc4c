// SPDX-License-Identifier: MIT
// One decode step (a single query token) over a KV cache: 32 query heads sharing 8 kv heads
// (GQA, 4 query heads per kv head), d = 128, Lk in {1024, 8192, 32768}, 1 and 2 threads, with
// the cache stored in each format: fp32, bf16, f16 (Eigen::half) and q8_0 (queries and outputs
// float), and q8_0 with the queries rounded to 8 bits (AttentionOptions::quantize_queries:
// integer dot products, AVX512-VNNI where the build targets it), named q8_0+q8.
//
// Decode is bound by memory bandwidth: every K and V row is read once. Each step is
// decode_step_into on a KVCache holding Lk - 1 rows (append the token, attend), then
// truncate(Lk - 1). Each run reports the GB/s of the cache's K and V bytes (in its format),
// pct_triad = that rate over the STREAM triad bandwidth measured in the same run (support/
// stream.hpp), and x_fp32 = the speedup over the fp32 cache of the same Lk and threads (run
// first). Pick sizes or formats with a filter, e.g.
//   attention_bench_decode --benchmark_filter='/32768/threads:2'
//
// LayerStep: one decode_step(layer, cache, x) of a whole MultiHeadAttention layer (E = 4096,
// 32 query heads on 8 kv heads, no bias, 1024 cached tokens) with weights and cache in fp32 or
// bf16: its four projections read 80 MiB (fp32) or 40 MiB (bf16) of weights per token, more
// than the attention reads of the cache. GBps counts the weights' and the cache's bytes.
#include "support/counters.hpp"
#include "support/stream.hpp"

#include <attend/attention/kv_cache.hpp>
#include <attend/attention/multi_head.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <type_traits>

namespace {

using attend::Index;

constexpr Index kHeads = 32, kKvHeads = 8, kDim = 128;

template <class S, bool kQuantizeQueries = false>
void BM_Decode(benchmark::State& state) {
  const Index keys = state.range(0);
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  attend::KVCache<S> cache(keys, kKvHeads, kDim);
  const attend::Matrix<float> k = attend::Matrix<float>::Random(256, kKvHeads * kDim);
  const attend::Matrix<float> v = attend::Matrix<float>::Random(256, kKvHeads * kDim);
  for (Index t = 0; t < keys - 1; t += 256) {
    const Index n = std::min(Index(256), keys - 1 - t);
    cache.append(k.topRows(n), v.topRows(n));
  }
  const attend::Matrix<float> q = attend::Matrix<float>::Random(1, kHeads * kDim);
  attend::Matrix<float> out(1, kHeads * kDim);
  attend::AttentionOptions options;
  options.quantize_queries = kQuantizeQueries;
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    attend::decode_step_into(cache, q, k.topRows(1), v.topRows(1), kHeads, out, attend::NoMask{}, options);
    cache.truncate(keys - 1);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double bytes = double(keys) * double(cache.key_rows().row_bytes() + cache.value_rows().row_bytes());
  const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
  attend::bench::report_bandwidth(state, bytes, threads);
  attend::bench::report_speedup(state, long(keys * 16 + threads), std::is_same_v<S, float>,
                                seconds.count() / double(std::max<benchmark::IterationCount>(state.iterations(), 1)));
}

template <class S>
void BM_LayerStep(benchmark::State& state) {
  constexpr Index kModel = 4096, kContext = 1024;
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  const auto random = [](Index rows, Index cols) {
    return attend::Matrix<S>((attend::Matrix<float>::Random(rows, cols) * 0.02f).template cast<S>());
  };
  attend::MultiHeadWeights<S> weights;
  weights.q_proj_weight = random(kHeads * kDim, kModel);
  weights.k_proj_weight = random(kKvHeads * kDim, kModel);
  weights.v_proj_weight = random(kKvHeads * kDim, kModel);
  weights.out_proj_weight = random(kModel, kHeads * kDim);
  const attend::MultiHeadAttention<S> layer(kHeads, weights, kKvHeads);
  attend::KVCache<S> cache(layer, kContext + 1);
  (void)attend::decode_step(layer, cache, random(kContext, kModel));
  const attend::Matrix<S> x = random(1, kModel);
  for (auto _ : state) {
    attend::Matrix<S> y = attend::decode_step(layer, cache, x);
    cache.truncate(kContext);
    benchmark::DoNotOptimize(y.data());
  }
  const double weight_bytes = double(sizeof(S)) * double(weights.q_proj_weight.size() + weights.k_proj_weight.size() +
                                                         weights.v_proj_weight.size() + weights.out_proj_weight.size());
  const double cache_bytes = double(kContext + 1) * double(cache.key_rows().row_bytes() + cache.value_rows().row_bytes());
  attend::bench::report_bandwidth(state, weight_bytes + cache_bytes, threads);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "threads"});
  for (int threads : {1, 2})
    for (Index keys : {1024, 8192, 32768}) b->Args({keys, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Decode<float>)->Name("Decode/fp32/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_Decode<Eigen::bfloat16>)->Name("Decode/bf16/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_Decode<Eigen::half>)->Name("Decode/f16/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_Decode<attend::Q8_0>)->Name("Decode/q8_0/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_Decode<attend::Q8_0, true>)->Name("Decode/q8_0+q8/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_LayerStep<float>)->Name("LayerStep/fp32/E4096/GQA32x8/ctx1024")->ArgName("threads")->Arg(1)->Arg(2)->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_LayerStep<Eigen::bfloat16>)->Name("LayerStep/bf16/E4096/GQA32x8/ctx1024")->ArgName("threads")->Arg(1)->Arg(2)->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
