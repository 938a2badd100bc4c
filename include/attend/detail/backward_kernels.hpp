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

/// <a, b> over n contiguous values, one fused multiply-add at a time from a_0 (where the target
/// has FMA): the order and rounding of the score kernel's dot products (tile_kernels.hpp), so
/// that D_i = <dO_i, O_i> and dP_ij = <dO_i, v_j> round alike. A row that sees one key has
/// O_i = v_j exactly, so dS = P (dP - D) is then exactly 0, as it is mathematically.
template <class T>
T row_dot(const T* a, const T* b, Index n) {
  T sum = 0;
  for (Index c = 0; c < n; ++c) {
#ifdef EIGEN_VECTORIZE_FMA
    sum = std::fma(a[c], b[c], sum);
#else
    sum += a[c] * b[c];
#endif
  }
  return sum;
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
