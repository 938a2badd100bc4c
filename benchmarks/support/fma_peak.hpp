// SPDX-License-Identifier: MIT
// The machine's fused-multiply-add peak, measured in the benchmark's own run: every thread
// runs a register-only loop of independent FMAs on the widest native SIMD packet (AVX-512
// where the build targets it) for float or double. Benchmarks report their GFLOP/s as a
// percentage of it at the same thread count.
#pragma once

#include <Eigen/Core>

#include <algorithm>
#include <chrono>

namespace attend::bench {

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

/// Runs `rounds` rounds of kAccumulators independent FMA chains of one packet each; returns
/// the flops done (2 per lane per FMA). The accumulators never leave registers: enough of
/// them hide the FMA latency on every current x86 and Arm core.
template <class T>
double fma_loop(long rounds) {
  using Packet = typename Eigen::internal::packet_traits<T>::type;
  constexpr int kAccumulators = 12;
  constexpr int kLanes = Eigen::internal::unpacket_traits<Packet>::size;
  Packet acc[kAccumulators];
  for (int a = 0; a < kAccumulators; ++a) acc[a] = Eigen::internal::pset1<Packet>(T(a) * T(1e-3));
  // Read through volatile so that the compiler cannot precompute the chains.
  volatile T x_value = T(0.999999), y_value = T(1e-7);
  const Packet x = Eigen::internal::pset1<Packet>(T(x_value)), y = Eigen::internal::pset1<Packet>(T(y_value));
  for (long r = 0; r < rounds; ++r)
    for (int a = 0; a < kAccumulators; ++a) acc[a] = Eigen::internal::pmadd(acc[a], x, y);
  Packet sum = acc[0];
  for (int a = 1; a < kAccumulators; ++a) sum = Eigen::internal::padd(sum, acc[a]);
  volatile T sink = Eigen::internal::predux(sum);
  (void)sink;
  return 2.0 * kLanes * kAccumulators * double(rounds);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// Peak FMA throughput in GFLOP/s of `threads` threads (OpenMP, or 1 without it), the best of
/// a few trials of about 0.1 s. Benchmarks measure it next to each timing, so that both see
/// the same machine load.
template <class T>
double fma_peak_gflops(int threads) {
  constexpr long kRounds = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    double flops = 0;
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : flops)
#endif
    flops += fma_loop<T>(kRounds);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, flops / seconds * 1e-9);
  }
  return best;
}

}  // namespace attend::bench
