// SPDX-License-Identifier: MIT
// The STREAM triad bandwidth, measured in the benchmark's own run: the ceiling the decode
// benchmarks report their K/V read rate against (pct_triad).
#pragma once

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <map>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attend::bench {

/// STREAM triad a[i] = b[i] + s c[i] over three arrays of 2^25 doubles (768 MiB in all, far
/// beyond the caches), OpenMP over `threads`, best of 5 runs, counting 3 arrays of bytes per run
/// as STREAM does (GB/s). Measured anew at every call: the bandwidth a shared machine gives
/// drifts within a run (from 46 to 80 GB/s on 2 threads of the development machine), so each
/// benchmark is compared with the triad of its own moment, not the first benchmark's.
inline double triad_gbps(int threads) {
  const std::ptrdiff_t n = std::ptrdiff_t(1) << 25;
  struct Arrays {  // allocated and first touched once, by the threads of the first caller
    std::unique_ptr<double[]> a, b, c;
  };
  static Arrays arrays = [&] {
    Arrays made{std::unique_ptr<double[]>(new double[std::size_t(n)]),
                std::unique_ptr<double[]>(new double[std::size_t(n)]),
                std::unique_ptr<double[]>(new double[std::size_t(n)])};
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      made.a[std::size_t(i)] = 1.0;
      made.b[std::size_t(i)] = 2.0;
      made.c[std::size_t(i)] = 0.5;
    }
    return made;
  }();
  double* const a = arrays.a.get();
  const double* const b = arrays.b.get();
  const double* const c = arrays.c.get();
  const double s = 3.0;
  (void)threads;
  double best = 0;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (std::ptrdiff_t i = 0; i < n; ++i) a[i] = b[i] + s * c[i];
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
    benchmark::DoNotOptimize(a);
    best = std::max(best, 3.0 * double(sizeof(double)) * double(n) / seconds.count() * 1e-9);
  }
  return best;
}

/// Reports the GB/s of `bytes` read per iteration, the triad measured right after the timed
/// loop and the percentage of it (rates over the measured time; benchmarks use real time).
inline void report_bandwidth(benchmark::State& state, double bytes, int threads) {
  const double triad = triad_gbps(threads);
  state.counters["GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["triad_GBps"] = triad;
  state.counters["pct_triad"] =
      benchmark::Counter(bytes * 1e-9 / triad * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["KV_bytes"] = benchmark::Counter(bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

/// Seconds per iteration of the fp32 form of each problem (by key), and the speedup of another
/// format over it: the fp32 benchmark runs first and records its time.
inline std::map<long, double>& fp32_seconds() {
  static std::map<long, double> seconds;
  return seconds;
}
inline void report_speedup(benchmark::State& state, long problem, bool is_fp32, double seconds_per_iteration) {
  if (is_fp32) fp32_seconds()[problem] = seconds_per_iteration;
  const auto it = fp32_seconds().find(problem);
  if (it != fp32_seconds().end()) state.counters["x_fp32"] = it->second / seconds_per_iteration;
}

}  // namespace attend::bench
