// SPDX-License-Identifier: MIT
// Additive (Bahdanau) attention's backward against its forward in the same run, one head, fp32,
// blocked path, L in {256, 1024, 4096}, h in {32, 128}, 1 and 2 threads. Both are a tanh of h
// features per (query, key) pair, no GEMM, so ns/pair is the figure to compare: the backward
// evaluates the tanh twice per pair (once in each of its two passes) and does about three
// times the forward's other arithmetic. GFLOP/s counts the forward's 3h + 2 Dv flops per pair
// times 2.5 for the backward (FlashAttention's convention). Scratch: the projections and their
// gradients (4 L h), the partials of dv and one mask tile per thread.
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

namespace {

using attend::Index;
using T = float;
constexpr Index kDim = 64;

struct Problem {
  attend::AdditiveAttention<T> layer;
  attend::Matrix<T> q, k, v, d_out;
  attend::AttentionResult<T> forward;
  attend::AttentionOptions options;

  Problem(Index length, Index hidden)
      : layer(attend::Matrix<T>::Random(hidden, kDim) / 8, attend::Matrix<T>::Random(hidden, kDim) / 8,
              attend::Vector<T>::Random(hidden), attend::Vector<T>::Random(hidden)),
        q(attend::Matrix<T>::Random(length, kDim)),
        k(attend::Matrix<T>::Random(length, kDim)),
        v(attend::Matrix<T>::Random(length, kDim)),
        d_out(attend::Matrix<T>::Random(length, kDim)) {
    options.algorithm = attend::Algorithm::Blocked;
    forward = layer.forward_with_lse(q, k, v, attend::NoMask{}, options);
  }
};

void report_pairs(benchmark::State& state, Index length, Index hidden, double factor, int threads, double scratch) {
  const double pairs = double(length) * double(length);
  attend::bench::report<T>(state, factor * pairs * double(3 * hidden + 2 * kDim), threads, scratch);
  state.counters["ns_per_pair"] =
      benchmark::Counter(pairs * 1e-9, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

void BM_AdditiveForward(benchmark::State& state) {
  const Index length = state.range(0), hidden = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  Problem p(length, hidden);
  attend::Vector<T> lse(length);
  for (auto _ : state) {
    p.layer.forward_into(p.q, p.k, p.v, p.forward.output, attend::NoMask{}, p.options, lse);
    benchmark::DoNotOptimize(p.forward.output.data());
  }
  report_pairs(state, length, hidden, 1.0, threads, double(sizeof(T)) * double(2 * length * hidden));
}

void BM_AdditiveBackward(benchmark::State& state) {
  const Index length = state.range(0), hidden = state.range(1);
  const int threads = static_cast<int>(state.range(2));
  attend::bench::set_threads(threads);
  const Problem p(length, hidden);
  for (auto _ : state) {
    const auto g = attend::additive_attention_backward(p.layer, p.q, p.k, p.v, p.forward, p.d_out, attend::NoMask{},
                                                       p.options);
    benchmark::DoNotOptimize(g.dq.data());
  }
  const auto tiles = attend::detail::resolve_tiles(p.options, length, length);
  const double scratch =
      double(sizeof(T)) * (double(4 * length * hidden) + double((length + tiles.queries - 1) / tiles.queries * hidden) +
                           double(threads) * double(tiles.queries * tiles.keys + hidden));
  report_pairs(state, length, hidden, 2.5, threads, scratch);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"L", "h", "threads"});
  for (int threads : {1, 2})
    for (Index hidden : {32, 128})
      for (Index length : {256, 1024, 4096}) b->Args({length, hidden, threads});
  b->MinTime(0.2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_AdditiveForward)->Apply(shapes);
BENCHMARK(BM_AdditiveBackward)->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
