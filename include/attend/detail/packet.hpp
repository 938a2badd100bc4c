// SPDX-License-Identifier: MIT
/// \file detail/packet.hpp
/// \brief The SIMD vocabulary of the tile kernels: Eigen's packet of the widest native width
/// (16 floats with AVX-512, 8 with AVX2, ...; a plain scalar without vectorization) and a
/// guarded exponential.
#pragma once

#include "../types.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__F16C__) || defined(EIGEN_VECTORIZE_AVX512)
#include <immintrin.h>  // _cvtsh_ss and the packet conversions, also where Eigen does not vectorize; vscalefps
#endif

// A packet type (__m512, ...) as a template argument makes GCC warn that its alignment
// attribute is ignored; Eigen silences the same warning in its own headers.
#if defined(__GNUC__) && !defined(__clang__)
#define ATTEND_PACKET_WARNINGS_PUSH \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wignored-attributes\"")
#define ATTEND_PACKET_WARNINGS_POP _Pragma("GCC diagnostic pop")
#else
#define ATTEND_PACKET_WARNINGS_PUSH
#define ATTEND_PACKET_WARNINGS_POP
#endif

// Fully unrolls a loop over a register block, so that its packets stay in registers.
#if defined(__clang__)
#define ATTEND_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ATTEND_UNROLL _Pragma("GCC unroll 32")
#else
#define ATTEND_UNROLL
#endif

ATTEND_PACKET_WARNINGS_PUSH

namespace attend::detail {

/// Eigen's native packet of T and its number of lanes.
template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;

template <class T>
inline constexpr Index kLanes = Eigen::internal::unpacket_traits<Packet<T>>::size;

/// The smallest multiple of the packet width that holds n lanes.
template <class T>
constexpr Index round_up_to_lanes(Index n) {
  return (n + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

/// x widened exactly to T. half goes through F16C where the target has it: Eigen 3.4 turns its
/// own F16C paths on for clang only (its test reads EIGEN_COMP_CLANG, which it defines as 0 for
/// GCC) and otherwise converts by bit manipulation, several times slower in the value kernel;
/// attend calls the instructions itself (here and in load_as/store_as).
template <class T, class S>
T widen(S x) {
#if defined(__F16C__)
  if constexpr (std::is_same_v<S, Eigen::half>) return T(_cvtsh_ss(x.x));
#endif
  return T(x);
}

/// Whether Eigen converts packets of S to packets of T (pcast) on this target: bf16 and half to
/// float with AVX-512 or AVX. Elsewhere (SSE-only builds, NEON, ...) the conversions below go
/// lane by lane through the scalar conversion; the results are the same.
template <class T, class S>
inline constexpr bool has_packet_conversion =
#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX)
    std::is_same_v<T, float> && is_reduced_precision<S> &&
    Eigen::internal::unpacket_traits<typename Eigen::internal::packet_traits<S>::type>::size == kLanes<T>;
#else
    false;
#endif

/// One packet of T from kLanes<T> consecutive values of storage type S at p (any alignment),
/// converted exactly (bf16 and half widen to float without rounding).
template <class T, class S>
Packet<T> load_as(const S* p) {
  namespace simd = Eigen::internal;
  if constexpr (std::is_same_v<T, S>) {
    return simd::ploadu<Packet<T>>(p);
#if defined(__F16C__) && defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (std::is_same_v<S, Eigen::half> && std::is_same_v<T, float>) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (std::is_same_v<S, Eigen::half> && std::is_same_v<T, float>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  } else if constexpr (has_packet_conversion<T, S>) {
    using PS = typename simd::packet_traits<S>::type;
    return simd::pcast<PS, Packet<T>>(simd::ploadu<PS>(p));
  } else {
    alignas(Packet<T>) T lanes[kLanes<T>];
    for (Index i = 0; i < kLanes<T>; ++i) lanes[i] = widen<T>(p[i]);
    return simd::pload<Packet<T>>(lanes);
  }
}

/// Tells the compiler that x is in a register here, so that it keeps a loaded packet there
/// instead of folding the load into each of the instructions that use it (GCC does, and a
/// packet used by N fused multiply-adds is then loaded N times: the decode kernels become
/// bound by loads instead of multiply-adds). Generates no instruction; a no-op where the
/// compiler has no such constraint.
template <class P>
EIGEN_ALWAYS_INLINE void keep_in_register(P& x) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX512F__)
  if constexpr (sizeof(P) >= 16) __asm__("" : "+v"(x));
#elif defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
  if constexpr (sizeof(P) >= 16) __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  if constexpr (sizeof(P) >= 16) __asm__("" : "+w"(x));
#else
  (void)x;
#endif
}

/// Stores a packet of T as kLanes<T> values of S at p (any alignment), rounded to nearest even.
template <class S, class P>
void store_as(S* p, const P& x) {
  namespace simd = Eigen::internal;
  using T = typename simd::unpacket_traits<P>::type;
  if constexpr (std::is_same_v<T, S>) {
    simd::pstoreu(p, x);
#if defined(__F16C__) && defined(EIGEN_VECTORIZE_AVX512)
  } else if constexpr (std::is_same_v<S, Eigen::half> && std::is_same_v<T, float>) {
    // (The masked form: unoptimized GCC expands the unmasked one into a -1 mask, which a user's
    // -Wsign-conversion reports.)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_mask_cvtps_ph(_mm256_setzero_si256(), __mmask16(0xFFFF), x, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__) && defined(EIGEN_VECTORIZE_AVX)
  } else if constexpr (std::is_same_v<S, Eigen::half> && std::is_same_v<T, float>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
#endif
  } else if constexpr (has_packet_conversion<T, S>) {
    using PS = typename simd::packet_traits<S>::type;
    simd::pstoreu(p, simd::pcast<Packet<T>, PS>(x));
  } else {
    alignas(Packet<T>) T lanes[kLanes<T>];
    simd::pstore(lanes, x);
    for (Index i = 0; i < kLanes<T>; ++i) p[i] = S(lanes[i]);
  }
}

/// exp(x) per lane, exactly 0 where x = -inf (Eigen's double pexp returns a denormal there, and
/// a masked key must weigh exactly nothing). NaN stays NaN.
template <class P>
P exp_or_zero(const P& x) {
  namespace simd = Eigen::internal;
  using T = typename simd::unpacket_traits<P>::type;
  const P masked = simd::pcmp_eq(x, simd::pset1<P>(-std::numeric_limits<T>::infinity()));
  return simd::pandnot(simd::pexp(x), masked);
}

#if defined(EIGEN_VECTORIZE_AVX512)
/// exp(x) of 16 floats with AVX-512's vscalefps (the overload the softmax kernels take there):
///   n = round(x log2 e),  r = x - n ln 2  (ln 2 in two parts, |r| <= ln 2 / 2 + eps),
///   exp(x) = 2^n (1 + r + r^2 P(r))  with Cephes' degree-5 P (expf),
/// and 2^n applied by vscalefps, which rounds once into the subnormals, to 0 below them and to
/// inf above FLT_MAX; x is first clamped to [-120, 128], past both ends. Measured over
/// [-103, 88]: at most 1.24 ulp, 0.35 on average (Eigen's pexp: 4.5 and 1.47, flushing results
/// below FLT_MIN to 0), and 1.16x faster. exp(-inf) = +0, exp(inf) = inf, NaN stays NaN (the
/// clamps return their second operand, x, for NaN).
inline Eigen::internal::Packet16f exp_or_zero(const Eigen::internal::Packet16f& x) {
  const __m512 clamped = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-120.0f), x));
  const __m512 shifter = _mm512_set1_ps(12582912.0f);  // 1.5 2^23: adding it rounds to an integer
  const __m512 n =
      _mm512_sub_ps(_mm512_fmadd_ps(clamped, _mm512_set1_ps(1.44269504088896341f), shifter), shifter);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), clamped);  // n (355 / 512) is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 exp_r = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(exp_r, n);
}
#endif

/// The lanes of p summed in order, lane 0 first (no horizontal-reduction intrinsic, whose order
/// differs between instruction sets).
template <class P>
typename Eigen::internal::unpacket_traits<P>::type sum_of_lanes(const P& p) {
  using T = typename Eigen::internal::unpacket_traits<P>::type;
  alignas(P) T lanes[Eigen::internal::unpacket_traits<P>::size];
  Eigen::internal::pstore(lanes, p);
  T sum = 0;
  for (const T lane : lanes) sum += lane;
  return sum;
}

// GCC 12 reports its own _mm512_undefined_ps() inside the AVX-512 unpack intrinsics of the
// transpose as used uninitialized (a false positive fixed in GCC 13; the lanes it "uses" are
// overwritten by the unpack).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
/// sums[n] = the sum of the lanes of acc[n], n < N. With N a multiple of the packet width W,
/// W at a time: after a register transpose of W accumulators, lane n of the sum of the W
/// packets is the sum of acc[n] (W - 1 adds for W sums, where a halving tree per accumulator
/// costs log2 W shuffles and adds each). Otherwise lane by lane, in order. (Flattened: Eigen's
/// transpose is inlined here, within the pragmas above, wherever it would not be otherwise.
/// Inlined into its caller: out of line it cost the score kernel a call and a vzeroupper per
/// block, with the 16 accumulators stored to memory and read back.)
template <class T, int N>
#if defined(__GNUC__)
__attribute__((flatten))
#endif
EIGEN_ALWAYS_INLINE void lane_sums(const Packet<T>* acc, T* sums) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  constexpr int W = int(kLanes<T>);
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<T, float> && N == 16 && W == 16) {
    // A tree of pairwise sums over 16 accumulators, halving the packets at each of 4 stages
    // (15 pairs of 2 shuffles and an add, where a transpose takes 64 shuffles and 15 adds).
    // After it, lane 4 L + t holds the sum of acc[4 t + L]; one permutation puts acc[n] at n.
    __m512 s8[8], s4[4], s2[2];
    for (int k = 0; k < 8; ++k)  // 128-bit quarters: [x q0+q2, x q1+q3, y q0+q2, y q1+q3]
      s8[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0x44),
                            _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], 0xEE));
    for (int k = 0; k < 4; ++k)  // quarter L: the 4 partial lanes of acc[4 k + L]
      s4[k] = _mm512_add_ps(_mm512_shuffle_f32x4(s8[2 * k], s8[2 * k + 1], 0x88),
                            _mm512_shuffle_f32x4(s8[2 * k], s8[2 * k + 1], 0xDD));
    for (int k = 0; k < 2; ++k)  // quarter L: 2 partials of acc[8 k + L], then 2 of acc[8 k + 4 + L]
      s2[k] = _mm512_add_ps(_mm512_shuffle_ps(s4[2 * k], s4[2 * k + 1], 0x44),
                            _mm512_shuffle_ps(s4[2 * k], s4[2 * k + 1], 0xEE));
    const __m512 total =  // quarter L: acc[L], acc[4 + L], acc[8 + L], acc[12 + L]
        _mm512_add_ps(_mm512_shuffle_ps(s2[0], s2[1], 0x88), _mm512_shuffle_ps(s2[0], s2[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(sums, _mm512_permutexvar_ps(order, total));
    return;
  }
#endif
  if constexpr (N % W == 0) {
    for (int g = 0; g < N; g += W) {
      simd::PacketBlock<P, W> block;
      for (int n = 0; n < W; ++n) block.packet[n] = acc[g + n];
      simd::ptranspose(block);
      P total = block.packet[0];
      for (int n = 1; n < W; ++n) total = simd::padd(total, block.packet[n]);
      simd::pstoreu(sums + g, total);
    }
  } else {
    for (int n = 0; n < N; ++n) sums[n] = sum_of_lanes(acc[n]);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// x_i <- exp(x_i - shift) over n contiguous values, exactly 0 where x_i = -inf; returns their
/// sum. The sum's order depends on n alone (lane-wise over whole packets from x_0, the lanes in
/// order, then the tail), not on the alignment of x, so a row sums to the same bits wherever
/// it sits in memory.
template <class T>
T exp_shifted_sum_inplace(T* x, Index n, T shift) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  const P shift_packet = simd::pset1<P>(shift);
  P packet_sums = simd::pset1<P>(T(0));
  Index i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) {
    const P e = exp_or_zero(simd::psub(simd::ploadu<P>(x + i), shift_packet));
    simd::pstoreu(x + i, e);
    packet_sums = simd::padd(packet_sums, e);
  }
  T sum = sum_of_lanes(packet_sums);
  for (; i < n; ++i) {
    x[i] = x[i] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

/// Prefetches the cache line of p + offset into the cache. The address may lie past the end of
/// p's array (a prefetch never faults): it is formed in integer arithmetic, so no out-of-range
/// pointer is ever created.
template <class T>
void prefetch_at(const T* p, Index offset) {
  const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(p) + std::uintptr_t(offset * Index(sizeof(T)));
  Eigen::internal::prefetch(reinterpret_cast<const T*>(address));
}

/// Calls f(std::integral_constant<int, n>) for a runtime n in [1, Max]: the kernels' remainder
/// blocks get compile-time sizes too.
template <int Max, class F>
void with_static_size(Index n, F&& f) {
  static_assert(Max >= 1);
  if (n == Max) {
    f(std::integral_constant<int, Max>{});
  } else if constexpr (Max > 1) {
    with_static_size<Max - 1>(n, f);
  }
}

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP
