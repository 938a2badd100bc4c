// SPDX-License-Identifier: MIT
// Batched decoding from a paged KV cache: 32 query heads on 8 kv heads (GQA), d = 128, blocks
// of 16 keys, 2 threads, the pool stored in each format: fp32, bf16, f16 and q8_0 (queries and
// outputs float).
//
//  - Batch: one paged_attention_into step of 64 sequences whose lengths are spread evenly over
//    256..8192 (one query token each), against
//  - LoopPaged: a loop of 64 single-sequence paged_attention_into calls over the same pool
//    (x_batch = its time over Batch's, measured in the same run), and
//  - LoopContiguous (fp32): a loop of 64 decode_attention_into calls, each over its sequence's
//    contiguous cache (the same rows, copied out of the pool),
//  - One/paged vs One/contiguous (fp32): one sequence of Lk keys, paged (blocks of 16) or contiguous.
// Each reports the GB/s of K and V read (every row once, in the pool's format), pct_triad =
// that rate over the STREAM triad bandwidth measured in the same run (support/stream.hpp), and
// x_fp32 = the speedup over the fp32 pool on the same problem (run first).
//   attention_bench_paged_decode                       (all)
//   attention_bench_paged_decode --benchmark_filter=Batch
#include "support/counters.hpp"
#include "support/stream.hpp"

#include <attend/attention/paged_kv_cache.hpp>
#include <attend/attention/split_kv.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <type_traits>
#include <vector>

namespace {

using attend::Index;

constexpr Index kHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16, kSequences = 64;

std::vector<Index> batch_lengths() {
  std::vector<Index> lengths;
  for (Index i = 0; i < kSequences; ++i) lengths.push_back(256 + i * (8192 - 256) / (kSequences - 1));
  return lengths;
}

/// A pool in format S holding sequences of the given lengths (rows repeated from a random chunk).
template <class S>
struct Pool {
  explicit Pool(const std::vector<Index>& lengths) : cache(blocks_for(lengths), kKvHeads, kDim, {kBlock}) {
    const attend::Matrix<float> k = attend::Matrix<float>::Random(256, kKvHeads * kDim);
    const attend::Matrix<float> v = attend::Matrix<float>::Random(256, kKvHeads * kDim);
    for (Index len : lengths) {
      ids.push_back(cache.add_sequence());
      for (Index t = 0; t < len; t += 256) {
        const Index n = std::min(Index(256), len - t);
        cache.append(ids.back(), k.topRows(n), v.topRows(n));
      }
      bytes += double(len) * double(cache.key_rows().row_bytes() + cache.value_rows().row_bytes());
    }
  }
  static Index blocks_for(const std::vector<Index>& lengths) {
    Index blocks = 0;
    for (Index len : lengths) blocks += (len + kBlock - 1) / kBlock;
    return blocks;
  }
  attend::PagedKVCache<S> cache;
  std::vector<Index> ids;
  double bytes = 0;  // K and V of every sequence, in the pool's format
};

/// Runs `step` over the state's iterations; returns the seconds per iteration.
template <class F>
double timed(benchmark::State& state, F&& step) {
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
  return seconds.count() / double(std::max<benchmark::IterationCount>(state.iterations(), 1));
}

/// Seconds per iteration of each format's Batch, for LoopPaged's x_batch.
std::map<long, double>& batch_seconds() {
  static std::map<long, double> seconds;
  return seconds;
}

template <class S>
constexpr long format_id() {
  if constexpr (std::is_same_v<S, float>) return 0;
  if constexpr (std::is_same_v<S, Eigen::bfloat16>) return 1;
  if constexpr (std::is_same_v<S, Eigen::half>) return 2;
  return 3;
}

template <class S>
void BM_Batch(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  const Pool<S> pool(batch_lengths());
  const attend::Matrix<float> q = attend::Matrix<float>::Random(kSequences, kHeads * kDim);
  attend::Matrix<float> out(kSequences, kHeads * kDim);
  const auto rows = attend::SequenceRows::uniform(kSequences, 1);
  const double seconds = timed(state, [&] {
    attend::paged_attention_into(pool.cache, pool.ids, rows, q, kHeads, out);
    benchmark::DoNotOptimize(out.data());
  });
  batch_seconds()[format_id<S>()] = seconds;
  attend::bench::report_bandwidth(state, pool.bytes, threads);
  attend::bench::report_speedup(state, 1, std::is_same_v<S, float>, seconds);
}

template <class S>
void BM_LoopPaged(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  const Pool<S> pool(batch_lengths());
  const attend::Matrix<float> q = attend::Matrix<float>::Random(kSequences, kHeads * kDim);
  attend::Matrix<float> out(kSequences, kHeads * kDim);
  const auto one = attend::SequenceRows::uniform(1, 1);
  const double seconds = timed(state, [&] {
    for (Index b = 0; b < kSequences; ++b)
      attend::paged_attention_into(pool.cache, {pool.ids[std::size_t(b)]}, one, q.row(b), kHeads, out.row(b));
    benchmark::DoNotOptimize(out.data());
  });
  attend::bench::report_bandwidth(state, pool.bytes, threads);
  attend::bench::report_speedup(state, 2, std::is_same_v<S, float>, seconds);
  if (const auto it = batch_seconds().find(format_id<S>()); it != batch_seconds().end())
    state.counters["x_batch"] = seconds / it->second;
}

void BM_LoopContiguous(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  std::vector<attend::Matrix<float>> keys, values;
  double bytes = 0;
  {
    const Pool<float> pool(batch_lengths());
    for (Index id : pool.ids) {
      keys.push_back(pool.cache.gather_keys(id));
      values.push_back(pool.cache.gather_values(id));
    }
    bytes = pool.bytes;
  }
  const attend::Matrix<float> q = attend::Matrix<float>::Random(kSequences, kHeads * kDim);
  attend::Matrix<float> out(kSequences, kHeads * kDim);
  timed(state, [&] {
    for (Index b = 0; b < kSequences; ++b)
      attend::decode_attention_into(q.row(b), keys[std::size_t(b)], values[std::size_t(b)], kHeads, out.row(b));
    benchmark::DoNotOptimize(out.data());
  });
  attend::bench::report_bandwidth(state, bytes, threads);
}

template <class S>
void BM_OnePaged(benchmark::State& state) {
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const Pool<S> pool({state.range(0)});
  const attend::Matrix<float> q = attend::Matrix<float>::Random(1, kHeads * kDim);
  attend::Matrix<float> out(1, kHeads * kDim);
  const auto one = attend::SequenceRows::uniform(1, 1);
  const double seconds = timed(state, [&] {
    attend::paged_attention_into(pool.cache, pool.ids, one, q, kHeads, out);
    benchmark::DoNotOptimize(out.data());
  });
  attend::bench::report_bandwidth(state, pool.bytes, threads);
  attend::bench::report_speedup(state, 100 + long(state.range(0)), std::is_same_v<S, float>, seconds);
}

void BM_OneContiguous(benchmark::State& state) {
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const Pool<float> pool({state.range(0)});
  const attend::Matrix<float> k = pool.cache.gather_keys(0), v = pool.cache.gather_values(0);
  const attend::Matrix<float> q = attend::Matrix<float>::Random(1, kHeads * kDim);
  attend::Matrix<float> out(1, kHeads * kDim);
  timed(state, [&] {
    attend::decode_attention_into(q, k, v, kHeads, out);
    benchmark::DoNotOptimize(out.data());
  });
  attend::bench::report_bandwidth(state, pool.bytes, threads);
}

void batch_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->Arg(2)->MinTime(0.5)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void one_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "threads"});
  for (Index keys : {1024, 8192, 32768}) b->Args({keys, 2});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Batch<float>)->Name("Batch/fp32/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopPaged<float>)->Name("LoopPaged/fp32/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_Batch<Eigen::bfloat16>)->Name("Batch/bf16/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopPaged<Eigen::bfloat16>)->Name("LoopPaged/bf16/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_Batch<Eigen::half>)->Name("Batch/f16/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopPaged<Eigen::half>)->Name("LoopPaged/f16/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_Batch<attend::Q8_0>)->Name("Batch/q8_0/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopPaged<attend::Q8_0>)->Name("LoopPaged/q8_0/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopContiguous)->Name("LoopContiguous/fp32/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_OnePaged<float>)->Name("One/paged/fp32/GQA32x8/d128")->Apply(one_shapes);
BENCHMARK(BM_OneContiguous)->Name("One/contiguous/fp32/GQA32x8/d128")->Apply(one_shapes);
BENCHMARK(BM_OnePaged<Eigen::bfloat16>)->Name("One/paged/bf16/GQA32x8/d128")->Apply(one_shapes);
BENCHMARK(BM_OnePaged<Eigen::half>)->Name("One/paged/f16/GQA32x8/d128")->Apply(one_shapes);
BENCHMARK(BM_OnePaged<attend::Q8_0>)->Name("One/paged/q8_0/GQA32x8/d128")->Apply(one_shapes);

}  // namespace

BENCHMARK_MAIN();
