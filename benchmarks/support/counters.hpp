// SPDX-License-Identifier: MIT
// Counters every attention benchmark reports next to its time: GFLOP/s, the percentage of the
// FMA peak measured in the same run at the same thread count, and the scratch memory.
#pragma once

#include "fma_peak.hpp"

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attend::bench {

/// Sets the OpenMP thread count (and so Eigen's) for the kernels that follow.
inline void set_threads(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

/// FLOPs of one attention head: two GEMMs of Lq x Lk x d (2 flops per multiply-add each),
/// 4 Lq Lk d in all, half of it when a causal mask hides about half of the scores.
inline double attention_flops(double lq, double lk, double dim, bool causal) {
  return 4.0 * lq * lk * dim * (causal ? 0.5 : 1.0);
}

/// Reports GFLOP/s and percent of the FMA peak (rates over the measured time), the peak
/// itself, and the scratch bytes. Call after the timing loop; benchmarks use real time.
template <class T>
void report(benchmark::State& state, double flops_per_iteration, int threads, double scratch_bytes) {
  const double peak = fma_peak_gflops<T>(threads);
  state.counters["GFLOPS"] =
      benchmark::Counter(flops_per_iteration * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_peak"] =
      benchmark::Counter(flops_per_iteration * 1e-9 / peak * 100.0, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOPS"] = peak;
  state.counters["scratch_bytes"] = benchmark::Counter(scratch_bytes, benchmark::Counter::kDefaults,
                                                       benchmark::Counter::kIs1024);
}

}  // namespace attend::bench
