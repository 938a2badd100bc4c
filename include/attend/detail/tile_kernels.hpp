// SPDX-License-Identifier: MIT
/// \file detail/tile_kernels.hpp
/// \brief Register-blocked micro-kernels of the blocked path, written once over Eigen packets
/// (so for float and double, AVX-512, AVX2, SSE, NEON, or plain scalars). K and V may be stored
/// as S = bf16 or half with T = float: each element is widened exactly as it is loaded
/// (detail::load_as), and everything is computed and accumulated in T.
///
/// One step of the blocked path for a query tile (rows i, padded to `lanes`) and a key tile
/// (rows j) holds the scores *transposed*, st(j, i), one query per SIMD lane:
///  1. score_tile:          st = K_tile Qt          (Qt: scaled, packed queries; see packing.hpp)
///     and, for a full tile, each lane's max over the tile's keys, from the registers;
///  2. the mask policy sets invisible entries of st to -inf (partial tiles only);
///  3. online_softmax_step: per query, running max m and sum l; st becomes P^T; alpha rescales;
///  4. value_tile:          acc = diag(alpha) acc + P V_tile;
/// and after the last key tile, finalize_rows writes out = acc / l and lse = m + log l.
/// With queries along lanes the softmax reductions over keys are plain vertical max/add, and
/// K and V are read in place (any row stride): nothing is packed per head.
#pragma once

#include "../types.hpp"
#include "packet.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

ATTEND_PACKET_WARNINGS_PUSH

namespace attend::detail {

/// Register block of the score kernel: kScoreRows keys x kScorePackets packets of queries.
inline constexpr int kScoreRows = 6;
inline constexpr int kScorePackets = 4;
/// Register block of the value kernel: kValueRows queries x kValuePackets packets of features.
inline constexpr int kValueRows = 6;
inline constexpr int kValuePackets = 4;
/// Rows of V the value kernel prefetches ahead.
inline constexpr Index kValuePrefetch = 32;

/// tile_max(v W + lane) = max(tile_max(v W + lane), max_r scores[r][v] lane) for NV packets of
/// W lanes: a register block of scores folded into its lanes' running maxima (pmax with the
/// maximum first, as online_softmax_step's own pass, so that NaN scores are skipped alike).
template <std::size_t MR, std::size_t NV, class P, class T>
EIGEN_ALWAYS_INLINE void fold_tile_max(const P (&scores)[MR][NV], T* tile_max) {
  namespace simd = Eigen::internal;
  constexpr Index W = simd::unpacket_traits<P>::size;
  ATTEND_UNROLL
  for (std::size_t v = 0; v < NV; ++v) {
    P m = simd::ploadu<P>(tile_max + Index(v) * W);
    ATTEND_UNROLL
    for (std::size_t r = 0; r < MR; ++r) m = simd::pmax(m, scores[r][v]);
    simd::pstoreu(tile_max + Index(v) * W, m);
  }
}

/// st(j, i) = <k_j, qt(:, i)> for MR keys j and NV packets of query lanes i:
/// MR x NV accumulators, one broadcast of k(j, c) and NV loads of qt(c, :) per feature c; with
/// tile_max (the block's lanes), the block is also folded into it (fold_tile_max).
/// The MR rows of K two blocks ahead are prefetched, a cache line at a time: the rows of a head
/// of an (L, H d) matrix lie a page apart, and the hardware prefetchers stop at pages.
template <class T, class S, int MR, int NV>
void score_block(const S* k, Index k_stride, const T* qt, Index qt_stride, Index depth, T* st, Index st_stride,
                 T* tile_max) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  constexpr Index W = kLanes<T>, kLine = 64 / Index(sizeof(S));
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r)
    for (Index c = 0; c < depth; c += kLine) prefetch_at(k, (2 * MR + r) * k_stride + c);
  P acc[std::size_t(MR)][std::size_t(NV)];
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTEND_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = simd::pset1<P>(T(0));
  for (Index c = 0; c < depth; ++c) {
    P q[std::size_t(NV)];
    ATTEND_UNROLL
    for (int v = 0; v < NV; ++v) q[v] = simd::pload<P>(qt + c * qt_stride + v * W);
    ATTEND_UNROLL
    for (int r = 0; r < MR; ++r) {
      const P kc = simd::pset1<P>(widen<T>(k[r * k_stride + c]));
      ATTEND_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::pmadd(kc, q[v], acc[r][v]);
    }
  }
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTEND_UNROLL
    for (int v = 0; v < NV; ++v) simd::pstore(st + r * st_stride + v * W, acc[r][v]);
  if (tile_max != nullptr) fold_tile_max(acc, tile_max);
}

/// Score tile st (keys, lanes) = K_tile (keys, Dk) Qt (Dk, lanes); lanes a multiple of kLanes.
/// qt and st rows must be aligned to the packet size. `visible(i0, i1)` is a range [begin, end)
/// of tile keys that holds every key query lanes [i0, i1) may see: a block of keys is scored
/// only for the packets of lanes whose range meets it (on a causal diagonal, about 3/8 of the
/// block is skipped). Entries left unscored are invisible, and the mask sets them to -inf.
/// With tile_max (lanes entries, aligned; for a full tile, where every entry is scored), each
/// lane's maximum over the keys is folded into it as the blocks are formed, which saves
/// online_softmax_step a pass over st.
template <class T, class S = T, class Visible>
void score_tile(const ConstMatrixRef<identity_t<S>>& k, const T* qt, Index qt_stride, Index lanes, T* st, Index st_stride,
                const Visible& visible, T* tile_max = nullptr) {
  constexpr Index W = kLanes<T>;
  const Index keys = k.rows(), depth = k.cols(), packets = lanes / W;
  for (Index p0 = 0; p0 < packets; p0 += kScorePackets) {
    const Index np = std::min<Index>(kScorePackets, packets - p0);
    decltype(visible(0, 0)) seen[kScorePackets];  // keys each packet of the group may see
    for (Index p = 0; p < np; ++p) seen[p] = visible((p0 + p) * W, (p0 + p + 1) * W);
    for (Index j0 = 0; j0 < keys; j0 += kScoreRows) {
      const Index mr = std::min<Index>(kScoreRows, keys - j0);
      // The packets of the group that see a key of [j0, j0 + mr): a run, as ranges only move
      // forward with the lanes; score that run, from packet `first`.
      Index first = np, last = -1;
      for (Index p = 0; p < np; ++p)
        if (seen[p].begin < j0 + mr && seen[p].end > j0 && seen[p].begin < seen[p].end) {
          first = std::min(first, p);
          last = p;
        }
      if (last < first) continue;
      const Index lane0 = (p0 + first) * W;
      with_static_size<kScorePackets>(last - first + 1, [&](auto nv) {
        with_static_size<kScoreRows>(mr, [&](auto rows) {
          score_block<T, S, decltype(rows)::value, decltype(nv)::value>(k.data() + j0 * k.outerStride(), k.outerStride(),
                                                                     qt + lane0, qt_stride, depth,
                                                                     st + j0 * st_stride + lane0, st_stride,
                                                                     tile_max == nullptr ? nullptr : tile_max + lane0);
        });
      });
    }
  }
}

/// One online-softmax step over a score tile held as st (keys, lanes), for every lane i:
///   m'_i = max(m_i, max_j st_ji)            (running max; max_j st_ji from tile_max if given)
///   u_i  = m'_i, or 0 while m'_i = -inf     (so that -inf - -inf is never formed)
///   alpha_i = exp(m_i - u_i)                (rescales what was accumulated so far)
///   st_ji  <- p_ji = exp(st_ji - u_i)
///   l'_i = alpha_i l_i + sum_j p_ji          (running sum)
/// max, sum, alpha and tile_max hold `lanes` entries, aligned to the packet size.
template <class T>
void online_softmax_step(T* st, Index st_stride, Index keys, Index lanes, T* max, T* sum, T* alpha,
                         const T* tile_max = nullptr) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  const P neg_inf = simd::pset1<P>(-std::numeric_limits<T>::infinity());
  for (Index i = 0; i < lanes; i += kLanes<T>) {
    const P m_old = simd::pload<P>(max + i);
    P m = m_old;
    if (tile_max != nullptr)
      m = simd::pmax(m, simd::pload<P>(tile_max + i));
    else
      for (Index j = 0; j < keys; ++j) m = simd::pmax(m, simd::pload<P>(st + j * st_stride + i));
    const P u = simd::pandnot(m, simd::pcmp_eq(m, neg_inf));
    const P a = exp_or_zero(simd::psub(m_old, u));
    P l = simd::pset1<P>(T(0));
    for (Index j = 0; j < keys; ++j) {
      T* s = st + j * st_stride + i;
      const P p = exp_or_zero(simd::psub(simd::pload<P>(s), u));
      simd::pstore(s, p);
      l = simd::padd(l, p);
    }
    simd::pstore(max + i, m);
    simd::pstore(sum + i, simd::pmadd(a, simd::pload<P>(sum + i), l));
    simd::pstore(alpha + i, a);
  }
}

/// `Vec` (a packet of T, or T itself) from consecutive values of storage type S at p, widened.
template <class Vec, class S>
Vec load_vec(const S* p) {
  if constexpr (Eigen::internal::unpacket_traits<Vec>::size == 1)
    return widen<Vec>(*p);
  else
    return load_as<typename Eigen::internal::unpacket_traits<Vec>::type>(p);
}

/// acc(i, :) = alpha_i acc(i, :) + sum_j pt(j, i) v(j, :) for MR query rows i and NV packets of
/// `Vec` (a packet, or T itself for the feature columns past the last whole packet).
template <class T, class S, class Vec, int MR, int NV>
void value_block(const T* pt, Index pt_stride, Index keys, const S* v, Index v_stride, const T* alpha, T* acc,
                 Index acc_stride) {
  namespace simd = Eigen::internal;
  constexpr Index W = simd::unpacket_traits<Vec>::size;
  Vec o[std::size_t(MR)][std::size_t(NV)];
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r) {
    const Vec a = simd::pset1<Vec>(alpha[r]);
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c) o[r][c] = simd::pmul(a, simd::ploadu<Vec>(acc + r * acc_stride + c * W));
  }
  for (Index j = 0; j < keys; ++j) {
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c) prefetch_at(v, (j + kValuePrefetch) * v_stride + c * W);  // see score_block
    Vec x[std::size_t(NV)];
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c) x[c] = load_vec<Vec>(v + j * v_stride + c * W);
    ATTEND_UNROLL
    for (int r = 0; r < MR; ++r) {
      const Vec p = simd::pset1<Vec>(pt[j * pt_stride + r]);
      ATTEND_UNROLL
      for (int c = 0; c < NV; ++c) o[r][c] = simd::pmadd(p, x[c], o[r][c]);
    }
  }
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r)
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c) simd::pstoreu(acc + r * acc_stride + c * W, o[r][c]);
}

/// acc (rows, Dv) = diag(alpha) acc + P V_tile with P held transposed as pt (keys, >= rows).
/// Each block of query rows [i0, i1) reads only the keys `visible(i0, i1)` (see score_tile);
/// their weights outside it are zero.
template <class T, class S = T, class Visible>
void value_tile(const T* pt, Index pt_stride, const ConstMatrixRef<identity_t<S>>& v, const T* alpha, MatrixRef<T> acc,
                const Visible& visible) {
  const Index rows = acc.rows(), dim = v.cols();
  const Index packed_dim = dim / kLanes<T> * kLanes<T>;
  for (Index c0 = 0; c0 < dim;) {
    // Whole packets first, then one column at a time for the tail (dim not a multiple of it).
    const bool tail = c0 >= packed_dim;
    const Index width = tail ? 1 : kLanes<T> * std::min<Index>(kValuePackets, (packed_dim - c0) / kLanes<T>);
    for (Index i0 = 0; i0 < rows; i0 += kValueRows) {
      const Index mr = std::min<Index>(kValueRows, rows - i0);
      const auto seen = visible(i0, i0 + mr);
      const Index j0 = seen.begin, keys = std::max<Index>(seen.end - seen.begin, 0);
      T* acc_block = acc.data() + i0 * acc.outerStride() + c0;
      const S* v_block = v.data() + j0 * v.outerStride() + c0;
      const T* p_block = pt + j0 * pt_stride + i0;
      with_static_size<kValueRows>(mr, [&](auto m) {
        constexpr int MR = decltype(m)::value;
        if (tail) {
          value_block<T, S, T, MR, 1>(p_block, pt_stride, keys, v_block, v.outerStride(), alpha + i0, acc_block,
                                   acc.outerStride());
        } else {
          with_static_size<kValuePackets>(width / kLanes<T>, [&](auto nv) {
            value_block<T, S, Packet<T>, MR, decltype(nv)::value>(p_block, pt_stride, keys, v_block, v.outerStride(),
                                                               alpha + i0, acc_block, acc.outerStride());
          });
        }
      });
    }
    c0 += width;
  }
}

/// out_i = acc_i / l_i and, when lse is non-empty, lse_i = m_i + log l_i; a row with l_i = 0
/// (it saw no key) gets zeros and lse -inf. NaN in l_i propagates. An output stored as O (bf16,
/// half) is rounded once, here, to nearest even.
template <class T, class O = T>
void finalize_rows(const ConstMatrixRef<T>& acc, const T* max, const T* sum, MatrixRef<identity_t<O>> out,
                   VectorRef<T> lse) {
  for (Index i = 0; i < acc.rows(); ++i) {
    const bool empty = sum[i] == T(0);
    if (empty)
      out.row(i).setZero();
    else
      out.row(i) = (acc.row(i) / sum[i]).template cast<O>();
    if (lse.size() != 0) lse(i) = empty ? -std::numeric_limits<T>::infinity() : max[i] + std::log(sum[i]);
  }
}

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP
