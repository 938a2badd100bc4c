// SPDX-License-Identifier: MIT
/// \file detail/bf16_kernels.hpp
/// \brief Tile kernels of the blocked path for bf16 Q, K and V on the AVX512-BF16 dot-product
/// instruction; compiled only when the target has it (`__AVX512BF16__` with AVX512BW), where
/// ATTEND_HAS_BF16_DOT_KERNELS is 1. Elsewhere this header defines nothing but that macro, 0.
///
/// VDPBF16PS (_mm512_dpbf16_ps) takes a PAIR of bf16 from each operand in each of its 16 32-bit
/// lanes and adds both products to a float accumulator:
///   acc_l += a_l.lo b_l.lo + a_l.hi b_l.hi
/// Each product of two bf16 is exact in float; the sums round to nearest even; bf16 denormal
/// inputs and float denormal results are flushed to zero (the instruction ignores MXCSR). One
/// instruction thus contracts two consecutive indices of a dot product, and both operands must
/// hold such a pair in one 32-bit word. A *word* below is a std::uint32_t holding two bf16, the
/// first of the pair in its low half (x86 is little-endian: two consecutive bf16 of a row in
/// memory are one such word). The layouts:
///   qt2 (ceil(Dk/2), lanes)   qt2(c2, i) = (q(i, 2 c2), q(i, 2 c2 + 1))   per query tile
///   K   (keys, Dk)            read in place: the word k(j, 2 c2 .. 2 c2 + 1) is broadcast
///   pt2 (ceil(keys/2), lanes) pt2(j2, i) = (p(2 j2, i), p(2 j2 + 1, i))   per (query, key) tile
///   v2  (ceil(Lk/2), Dv)      v2(j2, c) = (v(2 j2, c), v(2 j2 + 1, c))    once per call
/// with a zero in the second half of a word whose pair runs past an odd Dk, an odd key count or
/// an odd Lk, and zero words in the padding lanes of qt2. Key tiles of v2 start on an even key.
///
/// Precision. Q, K and V enter exactly (they are bf16 already) and every sum is in float: the
/// scores, scaled in float after the dot product (scale q is not rounded to bf16), and the P V
/// accumulator. The one rounding point is P: the float weights p = exp(s - m) in [0, 1] are
/// rounded to bf16 (to nearest even, as PyTorch's and SGLang's CPU flash kernels do) before the
/// P V product. bf16 keeps 8 significant bits, so each weight moves by at most 2^-8 of itself;
/// the output o = sum_j p_j v_j / l keeps l, the sum of the unrounded weights, and the error
/// this adds to o is at most
///   2^-8 sum_j p_j |v_j| / l <= 2^-8 max_j |v_j|   (0.4% of the largest |v| it averages),
/// and, for weights spread over n keys whose rounding errors are independent, of the order of
/// 2^-8 / sqrt(3 n) of |v|. (A weight below 2^-126 is flushed to zero: under 2^-126 |v|.)
#pragma once

#include "../types.hpp"
#include "packet.hpp"
#include "tile_kernels.hpp"  // fold_tile_max

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define ATTEND_HAS_BF16_DOT_KERNELS 1
#else
#define ATTEND_HAS_BF16_DOT_KERNELS 0
#endif

#if ATTEND_HAS_BF16_DOT_KERNELS

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

ATTEND_PACKET_WARNINGS_PUSH

namespace attend::detail {

/// Query lanes (and float accumulators) per 512-bit register.
inline constexpr Index kBf16Lanes = 16;
/// Register block of the bf16 score kernel: keys x packets of 16 query lanes (24 accumulators).
inline constexpr int kBf16ScoreRows = 6;
inline constexpr int kBf16ScorePackets = 4;
/// Register block of the bf16 value kernel: query rows x packets of 16 features.
inline constexpr int kBf16ValueRows = 6;
inline constexpr int kBf16ValuePackets = 4;
/// Pairs of rows of v2 the value kernel prefetches ahead.
inline constexpr Index kBf16ValuePrefetch = 16;

/// The 16 lanes of x as 32 bf16, the operand type of _mm512_dpbf16_ps.
inline __m512bh as_bf16_pairs(__m512i x) { return (__m512bh)x; }

/// The word at p (two bf16, p[0] in the low half), in every lane.
inline __m512i broadcast_pair(const Eigen::bfloat16* p) {
  std::uint32_t word;
  std::memcpy(&word, p, sizeof word);
  return _mm512_set1_epi32(static_cast<int>(word));
}

/// The word (p[0], 0) in every lane: the last feature of an odd Dk, without reading past it.
inline __m512i broadcast_single(const Eigen::bfloat16* p) {
  std::uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return _mm512_set1_epi32(static_cast<int>(bits));
}

/// The index of _mm512_permutexvar_epi16 / _mm512_permutex2var_epi16 whose element 2 l is
/// first + l and element 2 l + 1 is second + l, l in [0, 16): it interleaves two runs of 16 bf16.
inline __m512i interleave_index(int first, int second) {
  alignas(64) std::int16_t index[32];
  for (int l = 0; l < 16; ++l) {
    index[2 * l] = static_cast<std::int16_t>(first + l);
    index[2 * l + 1] = static_cast<std::int16_t>(second + l);
  }
  return _mm512_load_si512(index);
}

/// Words (a_l, b_l) of two packets of 16 floats rounded to bf16 (to nearest even): the pair
/// layout of two consecutive rows. `interleave` is interleave_index(0, 16): cvtne2ps_pbh(b, a)
/// holds a's 16 bf16 in its low half and b's in its high half.
inline __m512i round_to_pairs(__m512 a, __m512 b, __m512i interleave) {
  return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

/// Writes qt2 (ceil(Dk/2), >= lanes): qt2(c2, i) = (q(i, 2 c2), q(i, 2 c2 + 1)) for the rows
/// i < q.rows(), zero in the second half past an odd Dk, and zero words in the padding lanes
/// [rows, lanes). Q is read row by row, each row once, in place.
///
/// \param q     (rows, Dk) bf16 query rows of the tile, rows <= lanes
/// \param lanes a multiple of kBf16Lanes
/// \param qt2   (ceil(Dk/2), >= lanes) words
inline void pack_query_pairs(const ConstMatrixRef<Eigen::bfloat16>& q, Index lanes, MatrixRef<std::uint32_t> qt2) {
  const Index rows = q.rows(), depth = q.cols(), pairs = depth / 2;
  ATTEND_ASSERT(rows <= lanes && lanes % kBf16Lanes == 0);
  ATTEND_ASSERT(qt2.rows() == (depth + 1) / 2 && qt2.cols() >= lanes);
  for (Index i = 0; i < rows; ++i) {
    const Eigen::bfloat16* row = q.data() + i * q.outerStride();
    for (Index c2 = 0; c2 < pairs; ++c2) std::memcpy(&qt2(c2, i), row + 2 * c2, sizeof(std::uint32_t));
    if (depth % 2 != 0) qt2(pairs, i) = Eigen::numext::bit_cast<std::uint16_t>(row[depth - 1]);
  }
  qt2.block(0, rows, qt2.rows(), lanes - rows).setZero();
}

/// Writes v2 (ceil(Lk/2), Dv): v2(j2, c) = (v(2 j2, c), v(2 j2 + 1, c)), the second half zero
/// in the last row of an odd Lk. 32 features of two rows at a time are interleaved in registers.
///
/// \param v  (Lk, Dv) bf16
/// \param v2 (ceil(Lk/2), Dv) words
inline void pack_value_pairs(const ConstMatrixRef<Eigen::bfloat16>& v, MatrixRef<std::uint32_t> v2) {
  const Index keys = v.rows(), dim = v.cols();
  ATTEND_ASSERT(v2.rows() == (keys + 1) / 2 && v2.cols() == dim);
  // Of the 64 bf16 of two rows' 32 features (the first row's at indices [0, 32), the second's
  // at [32, 64)): the words of features [0, 16) and of [16, 32).
  const __m512i low = interleave_index(0, 32), high = interleave_index(16, 48);
  for (Index j2 = 0; j2 < v2.rows(); ++j2) {
    const Eigen::bfloat16* even = v.data() + 2 * j2 * v.outerStride();
    const Eigen::bfloat16* odd = 2 * j2 + 1 < keys ? even + v.outerStride() : nullptr;
    std::uint32_t* out = v2.data() + j2 * v2.outerStride();
    for (Index c = 0; c < dim; c += 32) {
      const Index n = std::min<Index>(32, dim - c);
      const __mmask32 in_mask = n == 32 ? ~__mmask32(0) : (__mmask32(1) << n) - 1;
      const __m512i a = _mm512_maskz_loadu_epi16(in_mask, even + c);
      const __m512i b = odd ? _mm512_maskz_loadu_epi16(in_mask, odd + c) : _mm512_setzero_si512();
      const __mmask16 low_mask = __mmask16(in_mask), high_mask = __mmask16(in_mask >> 16);
      _mm512_mask_storeu_epi32(out + c, low_mask, _mm512_permutex2var_epi16(a, low, b));
      if (high_mask) _mm512_mask_storeu_epi32(out + c + 16, high_mask, _mm512_permutex2var_epi16(a, high, b));
    }
  }
}

/// Writes pt2 (ceil(keys/2), lanes): pt2(j2, i) = (p(2 j2, i), p(2 j2 + 1, i)) rounded to bf16,
/// the second half zero in the last row of an odd key count (row `keys` of pt is not read).
///
/// \param pt  (keys, >= lanes) float weights P^T, as online_softmax_step leaves them
/// \param pt2 (ceil(keys/2), >= lanes) words; may not overlap pt
inline void pack_weight_pairs(const float* pt, Index pt_stride, Index keys, Index lanes, std::uint32_t* pt2,
                              Index pt2_stride) {
  ATTEND_ASSERT(lanes % kBf16Lanes == 0);
  const __m512i interleave = interleave_index(0, 16);
  for (Index j2 = 0; 2 * j2 < keys; ++j2) {
    const float* even = pt + 2 * j2 * pt_stride;
    const bool has_odd = 2 * j2 + 1 < keys;
    for (Index i = 0; i < lanes; i += kBf16Lanes) {
      const __m512 a = _mm512_loadu_ps(even + i);
      const __m512 b = has_odd ? _mm512_loadu_ps(even + pt_stride + i) : _mm512_setzero_ps();
      _mm512_storeu_si512(pt2 + j2 * pt2_stride + i, round_to_pairs(a, b, interleave));
    }
  }
}

/// st(j, i) = scale <k_j, q_i> for MR keys j and NV packets of query lanes i: MR x NV float
/// accumulators; per pair of features, NV loads of qt2 and one broadcast word of each key row.
/// The MR rows of K two blocks ahead are prefetched, and tile_max folded, as in score_block.
template <int MR, int NV>
void score_block_bf16(const Eigen::bfloat16* k, Index k_stride, const std::uint32_t* qt2, Index qt2_stride, Index depth,
                      float scale, float* st, Index st_stride, float* tile_max) {
  constexpr Index kLine = 32;  // bf16 per cache line
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r)
    for (Index c = 0; c < depth; c += kLine) prefetch_at(k, (2 * MR + r) * k_stride + c);
  __m512 acc[std::size_t(MR)][std::size_t(NV)];
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r) ATTEND_UNROLL
  for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const Index pairs = depth / 2;
  for (Index c2 = 0; c2 < pairs; ++c2) {
    __m512bh q[std::size_t(NV)];
    ATTEND_UNROLL
    for (int v = 0; v < NV; ++v) q[v] = as_bf16_pairs(_mm512_loadu_si512(qt2 + c2 * qt2_stride + v * kBf16Lanes));
    ATTEND_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512bh kc = as_bf16_pairs(broadcast_pair(k + r * k_stride + 2 * c2));
      ATTEND_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], kc, q[v]);
    }
  }
  if (depth % 2 != 0) {  // the last feature: (k, 0) . (q, 0)
    ATTEND_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512bh kc = as_bf16_pairs(broadcast_single(k + r * k_stride + depth - 1));
      ATTEND_UNROLL
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], kc,
                                     as_bf16_pairs(_mm512_loadu_si512(qt2 + pairs * qt2_stride + v * kBf16Lanes)));
    }
  }
  const __m512 scale_packet = _mm512_set1_ps(scale);
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r) ATTEND_UNROLL
  for (int v = 0; v < NV; ++v) {
    acc[r][v] = _mm512_mul_ps(scale_packet, acc[r][v]);
    _mm512_storeu_ps(st + r * st_stride + v * kBf16Lanes, acc[r][v]);
  }
  if (tile_max != nullptr) fold_tile_max(acc, tile_max);
}

/// Score tile st (keys, lanes) = scale K_tile (keys, Dk) Q_tile^T from bf16 K read in place and
/// qt2 (pack_query_pairs), lanes a multiple of kBf16Lanes. `visible(i0, i1)` and tile_max are
/// as in score_tile: a block of keys is scored only for the packets of lanes whose range meets
/// it; entries left unscored are invisible, and the mask sets them to -inf.
template <class Visible>
void score_tile_bf16(const ConstMatrixRef<Eigen::bfloat16>& k, const std::uint32_t* qt2, Index qt2_stride, Index lanes,
                     float scale, float* st, Index st_stride, const Visible& visible, float* tile_max = nullptr) {
  constexpr Index W = kBf16Lanes;
  const Index keys = k.rows(), depth = k.cols(), packets = lanes / W;
  for (Index p0 = 0; p0 < packets; p0 += kBf16ScorePackets) {
    const Index np = std::min<Index>(kBf16ScorePackets, packets - p0);
    decltype(visible(0, 0)) seen[kBf16ScorePackets];  // keys each packet of the group may see
    for (Index p = 0; p < np; ++p) seen[p] = visible((p0 + p) * W, (p0 + p + 1) * W);
    for (Index j0 = 0; j0 < keys; j0 += kBf16ScoreRows) {
      const Index mr = std::min<Index>(kBf16ScoreRows, keys - j0);
      // The run of packets of the group that see a key of [j0, j0 + mr) (see score_tile).
      Index first = np, last = -1;
      for (Index p = 0; p < np; ++p)
        if (seen[p].begin < j0 + mr && seen[p].end > j0 && seen[p].begin < seen[p].end) {
          first = std::min(first, p);
          last = p;
        }
      if (last < first) continue;
      const Index lane0 = (p0 + first) * W;
      with_static_size<kBf16ScorePackets>(last - first + 1, [&](auto nv) {
        with_static_size<kBf16ScoreRows>(mr, [&](auto rows) {
          score_block_bf16<decltype(rows)::value, decltype(nv)::value>(k.data() + j0 * k.outerStride(), k.outerStride(),
                                                                       qt2 + lane0, qt2_stride, depth, scale,
                                                                       st + j0 * st_stride + lane0, st_stride,
                                                                       tile_max == nullptr ? nullptr : tile_max + lane0);
        });
      });
    }
  }
}

/// acc(i, :) = alpha_i acc(i, :) + sum_j2 pt2(j2, i) . v2(j2, :) for MR query rows i and NV
/// packets of 16 features; with Tail, the last packet holds only the features of `tail` (a lane
/// mask), and the others are neither read nor written.
template <int MR, int NV, bool Tail>
void value_block_bf16(const std::uint32_t* pt2, Index pt2_stride, Index pairs, const std::uint32_t* v2, Index v2_stride,
                      __mmask16 tail, const float* alpha, float* acc, Index acc_stride) {
  constexpr Index W = kBf16Lanes;
  const auto mask_of = [tail](int c) { return Tail && c == NV - 1 ? tail : __mmask16(0xFFFF); };
  __m512 o[std::size_t(MR)][std::size_t(NV)];
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c)
      o[r][c] = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(mask_of(c), acc + r * acc_stride + c * W));
  }
  for (Index j2 = 0; j2 < pairs; ++j2) {
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c) prefetch_at(v2, (j2 + kBf16ValuePrefetch) * v2_stride + c * W);
    __m512bh x[std::size_t(NV)];
    ATTEND_UNROLL
    for (int c = 0; c < NV; ++c)
      x[c] = as_bf16_pairs(Tail && c == NV - 1 ? _mm512_maskz_loadu_epi32(tail, v2 + j2 * v2_stride + c * W)
                                               : _mm512_loadu_si512(v2 + j2 * v2_stride + c * W));
    ATTEND_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512bh p = as_bf16_pairs(_mm512_set1_epi32(static_cast<int>(pt2[j2 * pt2_stride + r])));
      ATTEND_UNROLL
      for (int c = 0; c < NV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], p, x[c]);
    }
  }
  ATTEND_UNROLL
  for (int r = 0; r < MR; ++r) ATTEND_UNROLL
  for (int c = 0; c < NV; ++c) _mm512_mask_storeu_ps(acc + r * acc_stride + c * W, mask_of(c), o[r][c]);
}

/// acc (rows, Dv) = diag(alpha) acc + P V_tile with P held as pt2 (pack_weight_pairs) and V as
/// v2, the tile's rows of the pair layout (pack_value_pairs of the whole V, then
/// v2.middleRows(k0 / 2, (keys + 1) / 2) for a tile starting at an even key k0). Each block of
/// query rows [i0, i1) reads only the pairs that hold a key of `visible(i0, i1)` (see
/// value_tile): the range rounded outward to whole pairs, whose extra key has weight zero.
template <class Visible>
void value_tile_bf16(const std::uint32_t* pt2, Index pt2_stride, const ConstMatrixRef<std::uint32_t>& v2,
                     const float* alpha, MatrixRef<float> acc, const Visible& visible) {
  constexpr Index W = kBf16Lanes;
  const Index rows = acc.rows(), dim = v2.cols(), packets = (dim + W - 1) / W;
  ATTEND_ASSERT(acc.cols() == dim);
  const __mmask16 tail = dim % W == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (dim % W)) - 1);
  for (Index p0 = 0; p0 < packets; p0 += kBf16ValuePackets) {
    const Index np = std::min<Index>(kBf16ValuePackets, packets - p0);
    const bool has_tail = p0 + np == packets && dim % W != 0;
    for (Index i0 = 0; i0 < rows; i0 += kBf16ValueRows) {
      const Index mr = std::min<Index>(kBf16ValueRows, rows - i0);
      const auto seen = visible(i0, i0 + mr);
      const Index j2_begin = seen.begin / 2, pairs = std::max<Index>((seen.end + 1) / 2 - j2_begin, 0);
      float* acc_block = acc.data() + i0 * acc.outerStride() + p0 * W;
      const std::uint32_t* v_block = v2.data() + j2_begin * v2.outerStride() + p0 * W;
      const std::uint32_t* p_block = pt2 + j2_begin * pt2_stride + i0;
      with_static_size<kBf16ValueRows>(mr, [&](auto m) {
        with_static_size<kBf16ValuePackets>(np, [&](auto nv) {
          constexpr int MR = decltype(m)::value, NV = decltype(nv)::value;
          if (has_tail)
            value_block_bf16<MR, NV, true>(p_block, pt2_stride, pairs, v_block, v2.outerStride(), tail, alpha + i0,
                                           acc_block, acc.outerStride());
          else
            value_block_bf16<MR, NV, false>(p_block, pt2_stride, pairs, v_block, v2.outerStride(), tail, alpha + i0,
                                            acc_block, acc.outerStride());
        });
      });
    }
  }
}

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP

#endif  // ATTEND_HAS_BF16_DOT_KERNELS
