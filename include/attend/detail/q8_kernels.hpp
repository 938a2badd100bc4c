// SPDX-License-Identifier: MIT
/// \file detail/q8_kernels.hpp
/// \brief Queries rounded to 8 bits for a q8_0 cache (AttentionOptions::quantize_queries), and
/// the integer score kernel that reads them against the cache's blocks.
///
/// Each head row of the scaled query (d values of q' = scale q) is rounded with one scale:
///   s_q = max_c |q'_c| / 127,   q^_c = s_q round(q'_c / s_q)   (|q^_c - q'_c| <= s_q / 2),
/// as a q8_0 block is, but over the whole head row (llama.cpp rounds its queries per block of 32
/// for its 8-bit caches). A row holding a non-finite value gets s_q = NaN, so its scores are NaN.
/// A score is then s^_j = <q^, k^_j> with k^_j the cache's dequantized key: with key blocks b
/// of scale s_b and bytes k_bc,
///   s^_j = s_q sum_b s_b sum_c u_c k_bc,   u_c = round(q'_c / s_q) in [-127, 127],
/// where each inner sum of 32 byte products is an exact integer. Against the unrounded query
/// the score moves by at most (s_q / 2) sum_c |k^_jc|.
///
/// Where the target has AVX512-VNNI (and AVX512BW), ATTEND_HAS_Q8_DOT_KERNELS is 1 and
/// dot_block_q8 forms the inner sums with vpdpbusd, 64 byte products (a pair of blocks) at a
/// time; the query's bytes are stored offset to unsigned (u_c + 128), and 128 sum_c k_bc,
/// formed once per key and pair of blocks, is subtracted. Elsewhere the rounded query q^ runs through the float
/// kernels: the same scores up to float rounding.
#pragma once

#include "../quantized.hpp"
#include "../types.hpp"
#include "packet.hpp"

#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(EIGEN_VECTORIZE_AVX512)
#define ATTEND_HAS_Q8_DOT_KERNELS 1
#include <immintrin.h>
#else
#define ATTEND_HAS_Q8_DOT_KERNELS 0
#endif

namespace attend::detail {

/// Query head rows rounded to 8 bits (see the file comment): head row i (row r, head h at
/// i = r H + h) is q^ = scales[i] (bytes[i width + c] - 128), c < d, its bytes padded with 128
/// (a zero) to `width`, a multiple of 64.
struct Q8Queries {
  const std::uint8_t* bytes = nullptr;
  const float* scales = nullptr;
  Index width = 0;

  /// Whether it holds rows (a view for the kernel), or none (the float kernels run).
  explicit operator bool() const { return bytes != nullptr; }
  /// The head rows from head row `first` on (none from none).
  Q8Queries from(Index first) const {
    return bytes == nullptr ? Q8Queries{} : Q8Queries{bytes + first * width, scales + first, width};
  }
};

/// The rounded query head rows of a decode call over a q8_0 cache, and their storage.
class RoundedQueries {
 public:
  /// Rounds each head row of q_scaled (rows, H d), in place, to q^ (the file comment), and keeps
  /// its bytes for dot_block_q8 where the target has the kernel.
  RoundedQueries(MatrixRef<float> q_scaled, Index heads, Index d) {
    const Index head_rows = q_scaled.rows() * heads;
    width_ = (q8_blocks(d) + 1) / 2 * 2 * kQ8Block;
    if (ATTEND_HAS_Q8_DOT_KERNELS) {
      bytes_.assign(std::size_t(head_rows * width_), std::uint8_t(128));
      scales_.resize(std::size_t(head_rows));
    }
    Eigen::ArrayXf u(d);  // round(q' / s_q) of a head row, in [-127, 127]
    for (Index r = 0; r < q_scaled.rows(); ++r)
      for (Index h = 0; h < heads; ++h) {
        Eigen::Map<Eigen::ArrayXf> q(q_scaled.row(r).data() + h * d, d);  // q' of head row i
        const Index i = r * heads + h;
        const bool finite = q.isFinite().all();
        const float scale = finite ? q.abs().maxCoeff() / 127 : std::numeric_limits<float>::quiet_NaN();
        if (finite && scale != 0)  // q' / s_q, divided as the formula says (not times 1 / s_q: ties)
          u = (q / scale).round().max(-127.0f).min(127.0f);
        else
          u.setZero();
        q = scale * u;
        if (ATTEND_HAS_Q8_DOT_KERNELS) {
          Eigen::Map<Eigen::Array<std::uint8_t, Eigen::Dynamic, 1>>(bytes_.data() + i * width_, d) =
              (u + 128.0f).cast<std::uint8_t>();
          scales_[std::size_t(i)] = scale;
        }
      }
    if (ATTEND_HAS_Q8_DOT_KERNELS) view_ = {bytes_.data(), scales_.data(), width_};
  }
  RoundedQueries(const RoundedQueries&) = delete;  // view_ points into the vectors
  RoundedQueries& operator=(const RoundedQueries&) = delete;

  /// The bytes for dot_block_q8; none where the target has no such kernel.
  Q8Queries kernel_view() const { return ATTEND_HAS_Q8_DOT_KERNELS ? view_ : Q8Queries{}; }

 private:
  std::vector<std::uint8_t> bytes_;
  std::vector<float> scales_;
  Index width_ = 0;
  Q8Queries view_;
};

#if ATTEND_HAS_Q8_DOT_KERNELS
/// For B rounded query head rows b (queries.from(b)) and J q8_0 key rows key_i = key + i *
/// key_stride (at a head's first block) of d values:
///   s[b * s_stride + i] = s_q(b) sum_blocks s_block sum_c u_c k_c   (the file comment),
/// two blocks per vpdpbusd; each block's exact integer sum is converted and scaled in float
/// lanes, and the B x J lane-wise sums reduced together (lane_sums).
template <int B, int J>
void dot_block_q8(const Q8Queries& queries, const BlockQ8_0* key, Index key_stride, Index d, float* s, Index s_stride) {
  const Index blocks = q8_blocks(d);
  const __m512i offset = _mm512_set1_epi8(char(-128));  // the bytes 0x80: 128 unsigned
  __m512 acc[std::size_t(B * J)];                       // acc[b J + i]: lane-wise partial sums of <q^_b, k^_i> / s_q(b)
  for (__m512& a : acc) a = _mm512_setzero_ps();
  for (Index c = 0; c < blocks; c += 2) {
    const bool pair = c + 1 < blocks;
    __m512i keys[std::size_t(J)], minus_offset[std::size_t(J)];
    __m512 scales[std::size_t(J)];  // lanes 0-7: block c's scale, lanes 8-15: block c + 1's
    for (int i = 0; i < J; ++i) {
      const BlockQ8_0* first = key + i * key_stride + c;
      const __m256i low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first[0].q));
      const __m256i high =
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(first[1].q)) : _mm256_setzero_si256();
      keys[i] = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
      minus_offset[i] =
          _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, keys[i]));
      scales[i] = _mm512_insertf32x8(_mm512_set1_ps(first[0].scale), _mm256_set1_ps(pair ? first[1].scale : 0.0f), 1);
      keep_in_register(keys[i]);
    }
    for (int b = 0; b < B; ++b) {
      __m512i query = _mm512_loadu_si512(queries.bytes + b * queries.width + c * kQ8Block);
      keep_in_register(query);
      for (int i = 0; i < J; ++i)
        acc[b * J + i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(minus_offset[i], query, keys[i])),
                                         scales[i], acc[b * J + i]);
    }
  }
  float sums[std::size_t(B * J)];
  lane_sums<float, B * J>(acc, sums);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < J; ++i) s[b * s_stride + i] = queries.scales[b] * sums[b * J + i];
}
#endif

}  // namespace attend::detail
