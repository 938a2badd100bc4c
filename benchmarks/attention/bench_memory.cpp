// SPDX-License-Identifier: MIT
// Long context on the blocked path: L = 65536, H = 8 heads, d = 128, fp32, 2 threads. The
// blocked path's scratch is a few tiles per thread, independent of L (the run at L = 16384
// reports the same scratch), where the materialized path would need an (L, L) score matrix:
// 16 GiB per head at L = 65536.
//
// Full attention at this size is 4 L^2 d H = 17.6 TFLOP, minutes on two cores, so the run uses
// a causal sliding window of 1024 keys (Window(1023, 0), as in Mistral-style long-context
// models): O(L w d) work, about 0.27 TFLOP, one iteration. Counters: GFLOP/s of the visible
// scores, percent of the FMA peak, scratch bytes of all threads, the materialized path's
// bytes per head, the bytes of Q, K, V and the output, and the process's peak RSS.
#include "support/counters.hpp"
#include "support/memory.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;

constexpr Index kHeads = 8;
constexpr Index kDim = 128;
constexpr Index kWindow = 1024;  // keys each query sees, itself included

void BM_LongContextBlocked(benchmark::State& state) {
  using T = float;
  const Index length = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  attend::bench::set_threads(threads);
  const attend::Matrix<T> q = attend::Matrix<T>::Random(length, kHeads * kDim);
  const attend::Matrix<T> k = attend::Matrix<T>::Random(length, kHeads * kDim);
  const attend::Matrix<T> v = attend::Matrix<T>::Random(length, kHeads * kDim);
  attend::Matrix<T> out(length, kHeads * kDim);
  attend::AttentionOptions options;
  options.algorithm = attend::Algorithm::Blocked;
  const attend::Window window(kWindow - 1, 0);
  for (auto _ : state) {
    attend::batched_attention_into(q, k, v, out, attend::BatchLayout{kHeads, 1}, window, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Query i sees min(i + 1, w) keys.
  const double full = double(length - std::min(length, kWindow)) * double(kWindow);
  const double ramp = double(std::min(length, kWindow)) * double(std::min(length, kWindow) + 1) / 2;
  const double flops = double(kHeads) * 4.0 * (full + ramp) * double(kDim);
  const double scratch =
      double(attend::detail::BlockedScratch<T>::bytes(attend::detail::resolve_tiles(options), kDim, kDim)) * threads;
  attend::bench::report<T>(state, flops, threads, scratch);
  const auto bytes = [](double b) {
    return benchmark::Counter(b, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  };
  state.counters["materialized_bytes_per_head"] = bytes(double(sizeof(T)) * double(length) * double(length));
  state.counters["qkvo_bytes"] = bytes(4.0 * double(sizeof(T)) * double(q.size()));
  state.counters["peak_rss"] = bytes(attend::bench::peak_rss_bytes());
}

BENCHMARK(BM_LongContextBlocked)
    ->ArgNames({"L", "threads"})
    ->Args({16384, 2})
    ->Args({65536, 2})
    ->Iterations(1)
    ->UseRealTime()
    ->Unit(benchmark::kSecond);

}  // namespace

BENCHMARK_MAIN();
