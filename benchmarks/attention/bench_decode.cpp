// SPDX-License-Identifier: MIT
// One decode step (a single query token) over a KV cache: 32 query heads sharing 8 kv heads
// (GQA, 4 query heads per kv head), d = 128, fp32, Lk in {1024, 8192, 32768}, 1 and 2 threads.
//
// Decode is bound by memory bandwidth: every K and V row is read once. Each run reports the
// GB/s of K and V read, and, measured in the same run over the same bytes and threads,
//  - Copy: memcpy of K and V into another buffer (GB/s of the bytes read),
//  - Read: a streaming vectorized sum over K and V (GB/s),
// with pct_copy = decode GB/s / copy GB/s. Pick sizes with a filter, e.g.
//   attention_bench_decode --benchmark_filter='/32768/'
#include "support/counters.hpp"

#include <attend/attention/split_kv.hpp>
#include <attend/detail/parallel.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstring>

namespace {

using attend::Index;
using T = float;

constexpr Index kHeads = 32, kKvHeads = 8, kDim = 128;
constexpr Index kChunks = 64;  // pieces of the copy and read loops, spread over the threads

struct Cache {
  explicit Cache(Index keys)
      : k(attend::Matrix<T>::Random(keys, kKvHeads * kDim)), v(attend::Matrix<T>::Random(keys, kKvHeads * kDim)) {}
  double bytes() const { return double(sizeof(T)) * double(k.size() + v.size()); }
  attend::Matrix<T> k, v;  // (Lk, H_kv d)
};

/// memcpy of src into dst in kChunks pieces over the threads.
void parallel_copy(const attend::Matrix<T>& src, attend::Matrix<T>& dst) {
  const Index n = src.size(), piece = (n + kChunks - 1) / kChunks;
  attend::detail::parallel_for_with_scratch(
      kChunks, [] { return 0; },
      [&](Index c, int&) {
        const Index begin = std::min(n, c * piece), end = std::min(n, begin + piece);
        std::memcpy(dst.data() + begin, src.data() + begin, sizeof(T) * std::size_t(end - begin));
      });
}

/// A vectorized streaming sum of m in kChunks pieces over the threads.
T parallel_sum(const attend::Matrix<T>& m) {
  const Index n = m.size(), piece = (n + kChunks - 1) / kChunks;
  attend::Vector<T> partial(kChunks);
  attend::detail::parallel_for_with_scratch(
      kChunks, [] { return 0; },
      [&](Index c, int&) {
        const Index begin = std::min(n, c * piece), end = std::min(n, begin + piece);
        partial(c) = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>(m.data() + begin, end - begin).sum();
      });
  return partial.sum();
}

/// Best copy bandwidth (GB/s of the bytes read) of a few rounds, for the pct_copy counter.
double copy_gbps(const Cache& cache) {
  attend::Matrix<T> dk = attend::Matrix<T>::Zero(cache.k.rows(), cache.k.cols());  // touched: no page faults
  attend::Matrix<T> dv = attend::Matrix<T>::Zero(cache.v.rows(), cache.v.cols());
  double best = 0;
  for (int round = 0; round < 7; ++round) {
    const auto start = std::chrono::steady_clock::now();
    parallel_copy(cache.k, dk);
    parallel_copy(cache.v, dv);
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    benchmark::DoNotOptimize(dk.data());
    benchmark::DoNotOptimize(dv.data());
    best = std::max(best, cache.bytes() / seconds.count() * 1e-9);
  }
  return best;
}

void report_bandwidth(benchmark::State& state, double bytes) {
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["KV_bytes"] = benchmark::Counter(bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_Decode(benchmark::State& state) {
  const Index keys = state.range(0);
  attend::bench::set_threads(int(state.range(1)));
  const Cache cache(keys);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(1, kHeads * kDim);
  attend::Matrix<T> out(1, kHeads * kDim);
  const double copy = copy_gbps(cache);
  for (auto _ : state) {
    attend::decode_attention_into(q, cache.k, cache.v, kHeads, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, cache.bytes());
  state.counters["copy_GBps"] = copy;
  state.counters["pct_copy"] =
      benchmark::Counter(cache.bytes() * 1e-9 / copy * 100.0, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Copy(benchmark::State& state) {
  attend::bench::set_threads(int(state.range(1)));
  const Cache cache(state.range(0));
  attend::Matrix<T> dk = attend::Matrix<T>::Zero(cache.k.rows(), cache.k.cols());
  attend::Matrix<T> dv = attend::Matrix<T>::Zero(cache.v.rows(), cache.v.cols());
  for (auto _ : state) {
    parallel_copy(cache.k, dk);
    parallel_copy(cache.v, dv);
    benchmark::DoNotOptimize(dk.data());
    benchmark::DoNotOptimize(dv.data());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, cache.bytes());
}

void BM_Read(benchmark::State& state) {
  attend::bench::set_threads(int(state.range(1)));
  const Cache cache(state.range(0));
  for (auto _ : state) {
    const T sum = parallel_sum(cache.k) + parallel_sum(cache.v);
    benchmark::DoNotOptimize(sum);
  }
  report_bandwidth(state, cache.bytes());
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "threads"});
  for (int threads : {1, 2})
    for (Index keys : {1024, 8192, 32768}) b->Args({keys, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Decode)->Name("Decode/GQA32x8/d128")->Apply(shapes);
BENCHMARK(BM_Copy)->Name("Copy")->Apply(shapes);
BENCHMARK(BM_Read)->Name("Read")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
