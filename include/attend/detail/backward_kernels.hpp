// SPDX-License-Identifier: MIT
/// \file detail/backward_kernels.hpp
/// \brief Element-wise pieces of the attention backward (FlashAttention-2), over Eigen packets:
/// the row statistic D_i = <dO_i, O_i>, the recomputed weights P = exp(S - lse) and the score
/// gradient dS = P * (dP - D), the score modifiers whose derivative the backward applies, and
/// the masks' score modifiers (SoftCap, ScoreMod) applied with their derivatives.
///
/// The products of the backward (S = Q K^T, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ = dS K)
/// run on the forward's register-blocked kernels (tile_kernels.hpp); what is here is the work
/// between them.
#pragma once

#include "../custom.hpp"
#include "../masks.hpp"
#include "../types.hpp"
#include "packet.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

ATTEND_PACKET_WARNINGS_PUSH

namespace attend::detail {

/// acc + x y, fused where the target has FMA (as Eigen's pmadd is), so that a scalar chain of
/// multiply-adds rounds as one lane of the tile kernels does.
template <class T>
T multiply_add(T x, T y, T acc) {
#ifdef EIGEN_VECTORIZE_FMA
  return std::fma(x, y, acc);
#else
  return x * y + acc;
#endif
}

/// out_i = <a_i, b_i> for `rows` rows of n values (rows `a_stride` and `b_stride` apart), each
/// summed one multiply-add at a time from element 0: the order and rounding of the score
/// kernel's dot products (tile_kernels.hpp), so that D_i = <dO_i, O_i> and dP_ij = <dO_i, v_j>
/// round alike, and a row that sees one key (O_i = v_j exactly) gets dS = P (dP - D) = 0
/// exactly, as it is mathematically.
///
/// kLanes rows at a time, one per lane: a square block of kLanes rows x kLanes values of a and
/// of b is loaded a row at a time and transposed in registers (Eigen's ptranspose, as
/// pack_scaled_queries does), so that each lane's chain takes one pmadd per value. Each row is
/// read in order, a whole cache line at a time (the rows of a head of an (L, H d) matrix lie a
/// page apart). The values past the last whole packet continue each row's chain one
/// multiply-add at a time. The key pass computes D for every (query tile, key tile): in scalar
/// chains (eight rows interleaved) it took an eighth of that pass at 8 heads of d = 128 (perf),
/// this way under a tenth.
template <class T>
void row_dots(const T* a, Index a_stride, const T* b, Index b_stride, Index rows, Index n, T* out) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  constexpr Index W = kLanes<T>;
  const Index packed_n = n / W * W;
  for (Index i0 = 0; i0 < rows; i0 += W) {
    const Index block_rows = std::min(W, rows - i0);
    P sum = simd::pset1<P>(T(0));  // lane r: the chain of row i0 + r
    for (Index c0 = 0; c0 < packed_n; c0 += W) {
      simd::PacketBlock<P, int(W)> x, y;  // row r: values [c0, c0 + W) of row i0 + r
      for (Index r = 0; r < W; ++r) {
        x.packet[r] = r < block_rows ? simd::ploadu<P>(a + (i0 + r) * a_stride + c0) : simd::pset1<P>(T(0));
        y.packet[r] = r < block_rows ? simd::ploadu<P>(b + (i0 + r) * b_stride + c0) : simd::pset1<P>(T(0));
      }
      simd::ptranspose(x);  // row c: value c0 + c of rows [i0, i0 + W)
      simd::ptranspose(y);
      for (Index c = 0; c < W; ++c) sum = simd::pmadd(x.packet[c], y.packet[c], sum);
    }
    alignas(P) T lanes[std::size_t(W)];
    simd::pstore(lanes, sum);
    for (Index r = 0; r < block_rows; ++r) {
      const T* a_row = a + (i0 + r) * a_stride;
      const T* b_row = b + (i0 + r) * b_stride;
      T chain = lanes[r];
      for (Index c = packed_n; c < n; ++c) chain = multiply_add(a_row[c], b_row[c], chain);
      out[i0 + r] = chain;
    }
  }
}

/// The shift u_i of row i's recomputed weights p_ij = exp(s_ij - u_i): its log-sum-exp, or +inf
/// when that is -inf (the row saw no key), so that every p_ij is exactly 0 and -inf - -inf is
/// never formed. NaN stays NaN.
template <class T>
T weight_shift(T lse) {
  return lse == -std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::infinity() : lse;
}

/// For the n entries of one row (n a multiple of the packet size; x and dp aligned to it),
/// with the row's shift u and statistic D:
///   p   = exp(s - u)           (exactly 0 where s = -inf)
///   ds  = p (dp - D), and exactly 0 where p = 0
/// s becomes p and dp becomes ds. A hidden key (p = 0) contributes nothing, whatever dp holds
/// there (a kernel may leave unscored entries of a hidden region unwritten).
template <class T>
void weights_and_score_gradient_row(T* s, T* dp, Index n, T u, T d) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  const P shift = simd::pset1<P>(u), stat = simd::pset1<P>(d), zero = simd::pset1<P>(T(0));
  for (Index j = 0; j < n; j += kLanes<T>) {
    const P p = exp_or_zero(simd::psub(simd::pload<P>(s + j), shift));
    simd::pstore(s + j, p);
    const P ds = simd::pmul(p, simd::psub(simd::pload<P>(dp + j), stat));
    simd::pstore(dp + j, simd::pandnot(ds, simd::pcmp_eq(p, zero)));
  }
}

/// The same over a transposed tile, one query per lane: for rows j < keys of st and dpt
/// (`lanes` entries each, aligned), with per-lane shifts u and statistics D.
template <class T>
void weights_and_score_gradient_lanes(T* st, T* dpt, Index stride, Index keys, Index lanes, const T* u, const T* d) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  const P zero = simd::pset1<P>(T(0));
  for (Index i = 0; i < lanes; i += kLanes<T>) {
    const P shift = simd::pload<P>(u + i), stat = simd::pload<P>(d + i);
    for (Index j = 0; j < keys; ++j) {
      T* s = st + j * stride + i;
      T* dp = dpt + j * stride + i;
      const P p = exp_or_zero(simd::psub(simd::pload<P>(s), shift));
      simd::pstore(s, p);
      const P ds = simd::pmul(p, simd::psub(simd::pload<P>(dp), stat));
      simd::pstore(dp, simd::pandnot(ds, simd::pcmp_eq(p, zero)));
    }
  }
}

/// Score modifier of plain dot-product scores: s = z, nothing to do.
struct IdentityModifier {
  static constexpr bool active = false;
  template <class S, class G>
  void forward(S&&, G&&) const {}
};

/// Logit soft-capping s = cap tanh(z / cap) (scores/soft_cap.hpp), with ds/dz = 1 - (s / cap)^2:
/// the tile routine of the SoftCap mask policy (custom.hpp), on the scores before any mask.
template <class T>
struct SoftCapModifier {
  static constexpr bool active = true;
  T cap;
  /// z -> s in place; g = ds/dz, same shape.
  template <class S, class G>
  void forward(S&& z, G&& g) const {
    g.setOnes();
    soft_cap_with_slope(z, g, cap);
  }
};

/// Whether a bound policy's add_bias transforms the scores other than by adding a term that does
/// not depend on them: it then gives `add_bias(s, slope, q0, k0)` (custom.hpp's protocol), which
/// the backward calls. Composed policies (`a & b`, OffsetMask) have one when an operand has.
template <class P, class S, class = void>
struct has_score_slope_for : std::false_type {};

template <class P, class S>
struct has_score_slope_for<P, S,
                           std::void_t<decltype(std::declval<const P&>().add_bias(
                               std::declval<Matrix<S>&>(), std::declval<Matrix<S>&>(), Index(0), Index(0)))>>
    : std::true_type {};

template <class P>
struct has_score_slope
    : std::bool_constant<has_score_slope_for<P, float>::value || has_score_slope_for<P, double>::value> {};

template <class A, class B>
struct has_score_slope<BothVisible<A, B>> : std::bool_constant<has_score_slope<A>::value || has_score_slope<B>::value> {
};

template <class Inner>
struct has_score_slope<OffsetPolicy<Inner>> : has_score_slope<Inner> {};

/// The add_bias phase of `mask` on a tile of scores s whose first element is (q0, k0), and the
/// chain rule through it: every operand that transforms the scores multiplies `slope` (same
/// shape as s) by the derivative of its output with respect to its input, in the order the
/// operands of `&` are written (as BothVisible::add_bias runs them); additive operands leave it.
template <class BoundMask, class Scores, class Slopes>
void add_bias_with_slope(const BoundMask& mask, Scores&& s, Slopes&& slope, Index q0, Index k0) {
  if constexpr (has_score_slope<BoundMask>::value)
    mask.add_bias(s, slope, q0, k0);
  else
    mask.add_bias(s, q0, k0);
}

template <class A, class B, class Scores, class Slopes>
void add_bias_with_slope(const BothVisible<A, B>& mask, Scores&& s, Slopes&& slope, Index q0, Index k0) {
  const Index q1 = q0 + s.rows(), k1 = k0 + s.cols();
  if (mask.first.classify(q0, q1, k0, k1) != TileKind::Full) add_bias_with_slope(mask.first, s, slope, q0, k0);
  if (mask.second.classify(q0, q1, k0, k1) != TileKind::Full) add_bias_with_slope(mask.second, s, slope, q0, k0);
}

template <class Inner, class Scores, class Slopes>
void add_bias_with_slope(const OffsetPolicy<Inner>& mask, Scores&& s, Slopes&& slope, Index q0, Index k0) {
  add_bias_with_slope(mask.inner, s, slope, q0 + mask.query_offset, k0 + mask.key_offset);
}

/// apply_mask (masks.hpp) of a Partial tile for the backward: its biases and score modifiers,
/// with slope *= the modifiers' derivatives when the mask has any, then -inf at hidden keys.
template <class BoundMask, class Scores, class Slopes>
void apply_mask_with_slope(const BoundMask& mask, Scores&& s, Slopes&& slope, Index q0, Index k0) {
  if constexpr (has_score_slope<BoundMask>::value) {
    add_bias_with_slope(mask, s, slope, q0, k0);
    mask.hide(s, q0, k0);
  } else {
    apply_mask(mask, s, q0, k0);
  }
}

/// dZ = dS * slope, and exactly 0 where the weight p is 0 (a hidden or dropped key contributes
/// nothing, whatever a modifier's derivative is there: NaN or infinite at -inf, say).
template <class DS, class G, class P>
void chain_score_slope(DS&& ds, const G& slope, const P& p) {
  ds = (p.array() == 0).select(0, ds.array() * slope.array());
}

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP
