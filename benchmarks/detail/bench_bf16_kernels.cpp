// SPDX-License-Identifier: MIT
// The tile kernels of the blocked path on one (64 queries x 256 keys) tile, one thread, d = 64
// and 128: the float kernels (score_tile, value_tile) against the AVX512-BF16 ones
// (score_tile_bf16; value_tile_bf16 with the rounding of P to bf16 pairs that it needs per tile).
// Each kernel does 2 * 64 * 256 * d flops (the score GEMM or the P V GEMM). Each run reports
// GFLOP/s and the percentages of the fp32 FMA peak and of the bf16 dot-product peak, both
// probed in the same run on one thread (support/fma_peak.hpp). Once per query tile the engine
// also packs Q (Pack* rows); the bf16 path packs V once per call (not timed here).
//   detail_bench_bf16_kernels --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include "support/fma_peak.hpp"

#include <attend/detail/bf16_kernels.hpp>
#include <attend/detail/packing.hpp>
#include <attend/detail/tile_kernels.hpp>
#include <attend/masks.hpp>

#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using attend::Index;
using attend::KeyRange;
using attend::Matrix;
using bf16 = Eigen::bfloat16;
using Words = Matrix<std::uint32_t>;
namespace detail = attend::detail;

constexpr Index kQueries = 64, kKeys = 256;

/// Every key of the tile, for every lane: a full tile.
struct AllKeys {
  KeyRange operator()(Index, Index) const { return {0, kKeys}; }
};

/// One tile's operands in float and in bf16 (the same values), packed as each path needs.
struct Tile {
  explicit Tile(Index dim)
      : q(Matrix<float>::Random(kQueries, dim).cast<bf16>().cast<float>()),
        k(Matrix<float>::Random(kKeys, dim).cast<bf16>().cast<float>()),
        v(Matrix<float>::Random(kKeys, dim).cast<bf16>().cast<float>()),
        q16(q.cast<bf16>()),
        k16(k.cast<bf16>()),
        v16(v.cast<bf16>()),
        qt(dim, kQueries),
        qt2((dim + 1) / 2, kQueries),
        v2(kKeys / 2, dim),
        pt(Matrix<float>::Random(kKeys, kQueries).cwiseAbs()),
        pt2(kKeys / 2, kQueries),
        st(kKeys, kQueries),
        acc(Matrix<float>::Zero(kQueries, dim)),
        alpha(std::size_t(kQueries), 1.0f),
        scale(1.0f / std::sqrt(float(dim))) {
    detail::pack_scaled_queries<float>(q, scale, qt);
    detail::pack_query_pairs(q16, kQueries, qt2);
    detail::pack_value_pairs(v16, v2);
    detail::pack_weight_pairs(pt.data(), pt.outerStride(), kKeys, kQueries, pt2.data(), pt2.outerStride());
  }

  Matrix<float> q, k, v;
  Matrix<bf16> q16, k16, v16;
  Matrix<float> qt;
  Words qt2, v2;
  Matrix<float> pt;
  Words pt2;
  Matrix<float> st, acc;
  std::vector<float> alpha;
  float scale;
};

/// GFLOP/s of `flops` per iteration, and its percentages of the peaks of one thread.
void report(benchmark::State& state, double flops) {
  const double fp32_peak = attend::bench::fma_peak_gflops<float>(1);
  state.counters["GFLOPS"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_fp32_peak"] =
      benchmark::Counter(flops * 1e-9 / fp32_peak * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["fp32_peak_GFLOPS"] = fp32_peak;
#if ATTEND_HAS_BF16_DOT_KERNELS
  const double bf16_peak = attend::bench::bf16_dot_peak_gflops(1);
  state.counters["pct_bf16_peak"] =
      benchmark::Counter(flops * 1e-9 / bf16_peak * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bf16_peak_GFLOPS"] = bf16_peak;
#endif
}

double tile_flops(Index dim) { return 2.0 * double(kQueries) * double(kKeys) * double(dim); }

void BM_ScoreFloat(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::score_tile<float>(t.k, t.qt.data(), t.qt.outerStride(), kQueries, t.st.data(), t.st.outerStride(),
                              AllKeys{});
    benchmark::DoNotOptimize(t.st.data());
    benchmark::ClobberMemory();
  }
  report(state, tile_flops(state.range(0)));
}

void BM_ValueFloat(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::value_tile<float>(t.pt.data(), t.pt.outerStride(), t.v, t.alpha.data(), t.acc, AllKeys{});
    benchmark::DoNotOptimize(t.acc.data());
    benchmark::ClobberMemory();
  }
  report(state, tile_flops(state.range(0)));
}

void BM_PackQueriesFloat(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::pack_scaled_queries<float>(t.q, t.scale, t.qt);
    benchmark::DoNotOptimize(t.qt.data());
    benchmark::ClobberMemory();
  }
}

#if ATTEND_HAS_BF16_DOT_KERNELS
void BM_ScoreBf16(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::score_tile_bf16(t.k16, t.qt2.data(), t.qt2.outerStride(), kQueries, t.scale, t.st.data(),
                            t.st.outerStride(), AllKeys{});
    benchmark::DoNotOptimize(t.st.data());
    benchmark::ClobberMemory();
  }
  report(state, tile_flops(state.range(0)));
}

/// P rounded to bf16 pairs, then P V: what the engine runs per tile.
void BM_ValueBf16(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::pack_weight_pairs(t.pt.data(), t.pt.outerStride(), kKeys, kQueries, t.pt2.data(), t.pt2.outerStride());
    detail::value_tile_bf16(t.pt2.data(), t.pt2.outerStride(), t.v2, t.alpha.data(), t.acc, AllKeys{});
    benchmark::DoNotOptimize(t.acc.data());
    benchmark::ClobberMemory();
  }
  report(state, tile_flops(state.range(0)));
}

/// The rounding of P to bf16 pairs alone (part of ValueBf16).
void BM_PackWeightsBf16(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::pack_weight_pairs(t.pt.data(), t.pt.outerStride(), kKeys, kQueries, t.pt2.data(), t.pt2.outerStride());
    benchmark::DoNotOptimize(t.pt2.data());
    benchmark::ClobberMemory();
  }
}

void BM_PackQueriesBf16(benchmark::State& state) {
  Tile t(state.range(0));
  for (auto _ : state) {
    detail::pack_query_pairs(t.q16, kQueries, t.qt2);
    benchmark::DoNotOptimize(t.qt2.data());
    benchmark::ClobberMemory();
  }
}
#endif

void dims(benchmark::internal::Benchmark* b) { b->ArgName("d")->Arg(64)->Arg(128)->MinTime(0.2)->UseRealTime(); }

BENCHMARK(BM_ScoreFloat)->Apply(dims);
BENCHMARK(BM_ValueFloat)->Apply(dims);
BENCHMARK(BM_PackQueriesFloat)->Apply(dims);
#if ATTEND_HAS_BF16_DOT_KERNELS
BENCHMARK(BM_ScoreBf16)->Apply(dims);
BENCHMARK(BM_ValueBf16)->Apply(dims);
BENCHMARK(BM_PackWeightsBf16)->Apply(dims);
BENCHMARK(BM_PackQueriesBf16)->Apply(dims);
#endif

}  // namespace

BENCHMARK_MAIN();
