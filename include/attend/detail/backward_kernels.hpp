// SPDX-License-Identifier: MIT
/// \file detail/backward_kernels.hpp
/// \brief Element-wise pieces of the attention backward (FlashAttention-2), over Eigen packets:
/// the row statistic D_i = <dO_i, O_i>, the recomputed weights P = exp(S - lse) and the score
/// gradient dS = P * (dP - D), and the score modifiers whose derivative the backward applies.
///
/// The products of the backward (S = Q K^T, dP = dO V^T, dV = P^T dO, dK = dS^T Q, dQ = dS K)
/// run on the forward's register-blocked kernels (tile_kernels.hpp); what is here is the work
/// between them.
#pragma once

#include "../types.hpp"
#include "packet.hpp"

#include <cmath>
#include <limits>

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
/// exactly, as it is mathematically. Eight rows' chains are interleaved so that their
/// multiply-adds overlap; each row's result does not depend on its neighbours.
template <class T>
void row_dots(const T* a, Index a_stride, const T* b, Index b_stride, Index rows, Index n, T* out) {
  constexpr Index kChains = 8;
  Index i = 0;
  for (; i + kChains <= rows; i += kChains) {
    T sum[kChains] = {};
    for (Index c = 0; c < n; ++c)
      for (Index r = 0; r < kChains; ++r)
        sum[r] = multiply_add(a[(i + r) * a_stride + c], b[(i + r) * b_stride + c], sum[r]);
    for (Index r = 0; r < kChains; ++r) out[i + r] = sum[r];
  }
  for (; i < rows; ++i) {
    T sum = 0;
    for (Index c = 0; c < n; ++c) sum = multiply_add(a[i * a_stride + c], b[i * b_stride + c], sum);
    out[i] = sum;
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

/// Logit soft-capping s = cap tanh(z / cap) (scores/soft_cap.hpp), with ds/dz = 1 - (s / cap)^2.
template <class T>
struct SoftCapModifier {
  static constexpr bool active = true;
  T cap;
  /// z -> s in place; g = ds/dz, same shape.
  template <class S, class G>
  void forward(S&& z, G&& g) const {
    z.array() = (z.array() / cap).tanh();
    g.array() = T(1) - z.array().square();
    z.array() *= cap;
  }
};

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP
