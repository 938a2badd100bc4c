// SPDX-License-Identifier: MIT
// The machine's fused-multiply-add peak, measured in the benchmark's own run: every thread
// runs a register-only loop of independent FMAs on the widest native SIMD packet (AVX-512
// where the build targets it) for float or double. Benchmarks report their GFLOP/s as a
// percentage of it at the same thread count. Where the build targets AVX512-BF16, the bf16
// dot-product peak is probed the same way (bf16_dot_peak_gflops).
#pragma once

#include <Eigen/Core>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512BF16__)
/// Runs `rounds` rounds of kAccumulators independent chains of the bf16 dot-product instruction
/// (VDPBF16PS, _mm512_dpbf16_ps, on 512-bit registers); returns the flops done, counted as for
/// an FMA: each of the 16 float lanes adds two products of bf16 pairs, 2 multiplies and 2 adds,
/// so 4 flops per lane and 64 per instruction (an fp32 FMA on 512 bits: 32). A kernel that
/// computes 2 n flops of multiply-adds in bf16 thus runs n / 32 such instructions. 16 chains
/// keep two instructions per cycle in flight for a latency of up to 8 cycles.
inline double bf16_dot_loop(long rounds) {
  constexpr int kAccumulators = 16;
  __m512 acc[kAccumulators];
  for (int a = 0; a < kAccumulators; ++a) acc[a] = _mm512_set1_ps(float(a) * 1e-3f);
  // Read through volatile so that the compiler cannot precompute the chains.
  volatile float x_value = 0.999f, y_value = 1e-7f;
  const __m512 xs = _mm512_set1_ps(x_value), ys = _mm512_set1_ps(y_value);
  const __m512bh x = _mm512_cvtne2ps_pbh(xs, xs), y = _mm512_cvtne2ps_pbh(ys, ys);
  for (long r = 0; r < rounds; ++r)
    for (int a = 0; a < kAccumulators; ++a) acc[a] = _mm512_dpbf16_ps(acc[a], x, y);
  __m512 sum = acc[0];
  for (int a = 1; a < kAccumulators; ++a) sum = _mm512_add_ps(sum, acc[a]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, sum);
  float total = 0;
  for (const float lane : lanes) total += lane;
  volatile float sink = total;
  (void)sink;
  return 64.0 * kAccumulators * double(rounds);
}
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// The best GFLOP/s of a few trials of about 0.1 s in which `threads` threads (OpenMP, or 1
/// without it) each run loop(rounds), which returns the flops it did.
template <class Loop>
double best_gflops_of_trials(int threads, Loop loop) {
  constexpr long kRounds = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    double flops = 0;
    const auto start = std::chrono::steady_clock::now();
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(+ : flops)
#else
    (void)threads;
#endif
    flops += loop(kRounds);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, flops / seconds * 1e-9);
  }
  return best;
}

/// Peak FMA throughput in GFLOP/s of `threads` threads. Benchmarks measure it next to each
/// timing, so that both see the same machine load.
template <class T>
double fma_peak_gflops(int threads) {
  return best_gflops_of_trials(threads, [](long rounds) { return fma_loop<T>(rounds); });
}

#if defined(__AVX512BF16__)
/// Peak throughput of the bf16 dot-product instruction in GFLOP/s (flops counted as in
/// bf16_dot_loop) of `threads` threads, measured as fma_peak_gflops.
inline double bf16_dot_peak_gflops(int threads) {
  return best_gflops_of_trials(threads, [](long rounds) { return bf16_dot_loop(rounds); });
}
#endif

}  // namespace attend::bench
