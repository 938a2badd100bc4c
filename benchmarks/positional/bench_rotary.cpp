// SPDX-License-Identifier: MIT
// Rotary embedding and sinusoidal encoding applied in place to one (L = 4096, 32 heads x 128)
// float matrix (64 MiB), on 1 and 2 threads.
//
// Both are memory-bound: each reports GB/s (bytes of x read and written, 2 * L * 4096 * 4 per
// call; the rotary cos/sin rows, 2 MiB, are not counted) and the percentage of the bandwidth of
// an in-place scale x *= c over the same matrix, measured in the same run at the same thread
// count (`ceiling_GBps`). Variants:
//   Rotary/HalfSplit, Rotary/Interleaved   positions 0..L-1 from the cos/sin cache
//   Rotary/HalfSplit/Positions             explicit position ids (a shuffled 0..L-1)
//   Rotary/HalfSplit/Uncached              cache_length 0: cos/sin computed per row in double
//   Sinusoidal/Add                         add_sinusoidal_encoding (one sin/cos in double per pair)
//   Scale                                  the in-place scale itself
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <numeric>
#include <random>

namespace {

using attend::Index;
using T = float;

constexpr Index kLength = 4096;
constexpr Index kHeads = 32;
constexpr Index kHeadDim = 128;
constexpr Index kWidth = kHeads * kHeadDim;

/// x *= c row by row on the library's parallel loop: the same access pattern as the kernels.
void scale_in_place(attend::Matrix<T>& x, T c) {
  attend::detail::parallel_for_with_scratch(
      x.rows(), [] { return 0; }, [&](Index r, int&) { x.row(r) *= c; });
}

/// Best GB/s of the in-place scale over a (kLength, kWidth) matrix, once per thread count.
double scale_bandwidth_gbps(int threads) {
  static std::map<int, double> cache;
  const auto found = cache.find(threads);
  if (found != cache.end()) return found->second;
  attend::bench::set_threads(threads);
  attend::Matrix<T> x = attend::Matrix<T>::Random(kLength, kWidth);
  double best = 0;
  for (int repeat = 0; repeat < 10; ++repeat) {
    const auto start = std::chrono::steady_clock::now();
    scale_in_place(x, T(1.0001));
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    best = std::max(best, 2.0 * double(x.size()) * sizeof(T) / seconds.count() * 1e-9);
  }
  benchmark::DoNotOptimize(x.data());
  return cache[threads] = best;
}

/// GB/s of `bytes` per iteration and its percentage of the scale bandwidth.
void report_bandwidth(benchmark::State& state, double bytes, int threads) {
  const double ceiling = scale_bandwidth_gbps(threads);
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_ceiling"] =
      benchmark::Counter(bytes * 1e-9 / ceiling * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ceiling_GBps"] = ceiling;
}

constexpr double kBytesOfX = 2.0 * double(kLength) * double(kWidth) * sizeof(T);

enum class Positions { Offset, Explicit, Uncached };

template <attend::RotaryLayout Layout, Positions Mode>
void BM_Rotary(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  attend::bench::set_threads(threads);
  attend::RotaryOptions options;
  options.layout = Layout;
  options.cache_length = Mode == Positions::Uncached ? 0 : kLength;
  const attend::RotaryEmbedding<T> rope(kHeadDim, options);
  attend::Matrix<T> x = attend::Matrix<T>::Random(kLength, kWidth);
  attend::Vector<Index> positions(kLength);
  std::iota(positions.data(), positions.data() + kLength, Index(0));
  std::shuffle(positions.data(), positions.data() + kLength, std::mt19937_64(42));
  for (auto _ : state) {
    if constexpr (Mode == Positions::Explicit)
      rope.apply(x, positions);
    else
      rope.apply(x, 0);
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, kBytesOfX, threads);
}

void BM_SinusoidalAdd(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  attend::bench::set_threads(threads);
  attend::Matrix<T> x = attend::Matrix<T>::Random(kLength, kWidth);
  for (auto _ : state) {
    attend::add_sinusoidal_encoding<T>(x, 0);
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, kBytesOfX, threads);
}

void BM_Scale(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  attend::bench::set_threads(threads);
  attend::Matrix<T> x = attend::Matrix<T>::Random(kLength, kWidth);
  for (auto _ : state) {
    scale_in_place(x, T(1.0001));
    benchmark::DoNotOptimize(x.data());
    benchmark::ClobberMemory();
  }
  report_bandwidth(state, kBytesOfX, threads);
}

void threads(benchmark::internal::Benchmark* b) {
  b->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

using attend::RotaryLayout;
BENCHMARK_TEMPLATE(BM_Rotary, RotaryLayout::HalfSplit, Positions::Offset)->Name("Rotary/HalfSplit")->Apply(threads);
BENCHMARK_TEMPLATE(BM_Rotary, RotaryLayout::Interleaved, Positions::Offset)
    ->Name("Rotary/Interleaved")
    ->Apply(threads);
BENCHMARK_TEMPLATE(BM_Rotary, RotaryLayout::HalfSplit, Positions::Explicit)
    ->Name("Rotary/HalfSplit/Positions")
    ->Apply(threads);
BENCHMARK_TEMPLATE(BM_Rotary, RotaryLayout::HalfSplit, Positions::Uncached)
    ->Name("Rotary/HalfSplit/Uncached")
    ->Apply(threads);
BENCHMARK(BM_SinusoidalAdd)->Name("Sinusoidal/Add")->Apply(threads);
BENCHMARK(BM_Scale)->Name("Scale")->Apply(threads);

}  // namespace

BENCHMARK_MAIN();
