// SPDX-License-Identifier: MIT
// Batched decoding from a paged KV cache: 32 query heads on 8 kv heads (GQA), d = 128, fp32,
// blocks of 16 keys, 2 threads.
//
//  - Batch: one paged_attention_into step of 64 sequences whose lengths are spread evenly over
//    256..8192 (one query token each), against
//  - LoopPaged: a loop of 64 single-sequence paged_attention_into calls over the same pool, and
//  - LoopContiguous: a loop of 64 decode_attention_into calls, each over its sequence's
//    contiguous cache (the same rows, copied out of the pool),
//  - One/paged vs One/contiguous: one sequence of Lk keys, paged (blocks of 16) or contiguous.
// Each reports the GB/s of K and V read (every row once) and pct_triad = that rate over the STREAM
// triad bandwidth measured in the same run: a[i] = b[i] + s c[i] over three arrays of 2^25
// doubles (768 MiB in all, far beyond the caches), OpenMP over the benchmark's threads, best of
// 10 runs, counting 3 arrays of bytes per run as STREAM does.
//   attention_bench_paged_decode                       (all)
//   attention_bench_paged_decode --benchmark_filter=Batch
#include "support/counters.hpp"

#include <attend/attention/paged_kv_cache.hpp>
#include <attend/attention/split_kv.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using attend::Index;
using T = float;

constexpr Index kHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 16, kSequences = 64;

/// STREAM triad bandwidth (GB/s, 3 arrays of bytes per run), best of 10 runs, on `threads`.
double triad_gbps(int threads) {
  const Index n = Index(1) << 25;
  // Uninitialized, so that the first touch below places the pages by the threads.
  const std::unique_ptr<double[]> a(new double[std::size_t(n)]), b(new double[std::size_t(n)]),
      c(new double[std::size_t(n)]);
  const double s = 3.0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (Index i = 0; i < n; ++i) {  // first touch by the threads that run the triad
    a[std::size_t(i)] = 1.0;
    b[std::size_t(i)] = 2.0;
    c[std::size_t(i)] = 0.5;
  }
  (void)threads;
  double best = 0;
  for (int run = 0; run < 10; ++run) {
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (Index i = 0; i < n; ++i) a[std::size_t(i)] = b[std::size_t(i)] + s * c[std::size_t(i)];
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    benchmark::DoNotOptimize(a.get());
    best = std::max(best, 3.0 * double(sizeof(double)) * double(n) / seconds.count() * 1e-9);
  }
  return best;
}

std::vector<Index> batch_lengths() {
  std::vector<Index> lengths;
  for (Index i = 0; i < kSequences; ++i) lengths.push_back(256 + i * (8192 - 256) / (kSequences - 1));
  return lengths;
}

/// A pool holding sequences of the given lengths (rows repeated from a random chunk).
struct Pool {
  explicit Pool(const std::vector<Index>& lengths)
      : cache(blocks_for(lengths), kKvHeads, kDim, {kBlock}) {
    const attend::Matrix<T> k = attend::Matrix<T>::Random(256, kKvHeads * kDim);
    const attend::Matrix<T> v = attend::Matrix<T>::Random(256, kKvHeads * kDim);
    for (Index len : lengths) {
      ids.push_back(cache.add_sequence());
      for (Index t = 0; t < len; t += 256) {
        const Index n = std::min(Index(256), len - t);
        cache.append(ids.back(), k.topRows(n), v.topRows(n));
      }
      bytes += double(sizeof(T)) * double(len) * double(2 * kKvHeads * kDim);
    }
  }
  static Index blocks_for(const std::vector<Index>& lengths) {
    Index blocks = 0;
    for (Index len : lengths) blocks += (len + kBlock - 1) / kBlock;
    return blocks;
  }
  attend::PagedKVCache<T> cache;
  std::vector<Index> ids;
  double bytes = 0;  // K and V of every sequence
};

void report(benchmark::State& state, double bytes, double triad) {
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["triad_GBps"] = triad;
  state.counters["pct_triad"] =
      benchmark::Counter(bytes * 1e-9 / triad * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["KV_bytes"] = benchmark::Counter(bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

void BM_Batch(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  const Pool pool(batch_lengths());
  const attend::Matrix<T> q = attend::Matrix<T>::Random(kSequences, kHeads * kDim);
  attend::Matrix<T> out(kSequences, kHeads * kDim);
  const auto rows = attend::SequenceRows::uniform(kSequences, 1);
  const double triad = triad_gbps(threads);
  for (auto _ : state) {
    attend::paged_attention_into(pool.cache, pool.ids, rows, q, kHeads, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, pool.bytes, triad);
}

void BM_LoopPaged(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  const Pool pool(batch_lengths());
  const attend::Matrix<T> q = attend::Matrix<T>::Random(kSequences, kHeads * kDim);
  attend::Matrix<T> out(kSequences, kHeads * kDim);
  const auto one = attend::SequenceRows::uniform(1, 1);
  const double triad = triad_gbps(threads);
  for (auto _ : state) {
    for (Index b = 0; b < kSequences; ++b)
      attend::paged_attention_into(pool.cache, {pool.ids[std::size_t(b)]}, one, q.row(b), kHeads, out.row(b));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, pool.bytes, triad);
}

void BM_LoopContiguous(benchmark::State& state) {
  const int threads = int(state.range(0));
  attend::bench::set_threads(threads);
  std::vector<attend::Matrix<T>> keys, values;
  double bytes = 0;
  {
    const Pool pool(batch_lengths());
    for (Index id : pool.ids) {
      keys.push_back(pool.cache.gather_keys(id));
      values.push_back(pool.cache.gather_values(id));
    }
    bytes = pool.bytes;
  }
  const attend::Matrix<T> q = attend::Matrix<T>::Random(kSequences, kHeads * kDim);
  attend::Matrix<T> out(kSequences, kHeads * kDim);
  const double triad = triad_gbps(threads);
  for (auto _ : state) {
    for (Index b = 0; b < kSequences; ++b)
      attend::decode_attention_into(q.row(b), keys[std::size_t(b)], values[std::size_t(b)], kHeads, out.row(b));
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, bytes, triad);
}

void BM_OnePaged(benchmark::State& state) {
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const Pool pool({state.range(0)});
  const attend::Matrix<T> q = attend::Matrix<T>::Random(1, kHeads * kDim);
  attend::Matrix<T> out(1, kHeads * kDim);
  const auto one = attend::SequenceRows::uniform(1, 1);
  const double triad = triad_gbps(threads);
  for (auto _ : state) {
    attend::paged_attention_into(pool.cache, pool.ids, one, q, kHeads, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, pool.bytes, triad);
}

void BM_OneContiguous(benchmark::State& state) {
  const int threads = int(state.range(1));
  attend::bench::set_threads(threads);
  const Pool pool({state.range(0)});
  const attend::Matrix<T> k = pool.cache.gather_keys(0), v = pool.cache.gather_values(0);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(1, kHeads * kDim);
  attend::Matrix<T> out(1, kHeads * kDim);
  const double triad = triad_gbps(threads);
  for (auto _ : state) {
    attend::decode_attention_into(q, k, v, kHeads, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report(state, pool.bytes, triad);
}

void batch_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"threads"})->Arg(2)->MinTime(0.5)->UseRealTime()->Unit(benchmark::kMillisecond);
}

void one_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "threads"});
  for (Index keys : {1024, 8192, 32768}) b->Args({keys, 2});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK(BM_Batch)->Name("Batch/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopPaged)->Name("LoopPaged/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_LoopContiguous)->Name("LoopContiguous/64seq/GQA32x8/d128")->Apply(batch_shapes);
BENCHMARK(BM_OnePaged)->Name("One/paged/GQA32x8/d128")->Apply(one_shapes);
BENCHMARK(BM_OneContiguous)->Name("One/contiguous/GQA32x8/d128")->Apply(one_shapes);

}  // namespace

BENCHMARK_MAIN();
