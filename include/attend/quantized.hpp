// SPDX-License-Identifier: MIT
/// \file quantized.hpp
/// \brief The 8-bit storage format of the KV caches: llama.cpp's q8_0, with a float scale.
///
/// `KVCache<attend::Q8_0>` and `PagedKVCache<attend::Q8_0>` store each row of a head in blocks of
/// 32 values, each block a float scale s and 32 signed bytes q_i (36 bytes for 32 values, 1.125
/// bytes a value against 4 for float), as llama.cpp's q8_0 does except that its scale is an IEEE
/// half (34 bytes): a float scale is exact and costs 6% more bytes. A block of x_0..x_31 stores
///   s = max_i |x_i| / 127,   q_i = round(x_i / s)  (half away from zero; 0 when s = 0),
/// and reads back as x^_i = s q_i, rounded to float. So |x^_i - x_i| <= s / 2 (1 + 2^-13), the
/// quantization step: half a step of the block's scale, from the rounding to an integer, and a few
/// float roundings of x_i / s and s q_i (|q_i| <= 127 keeps those below 2^-13 of a step). A block
/// holding a non-finite value reads back as NaN. A head of d values takes ceil(d / 32) blocks,
/// the last padded with zeros, so every head starts on a block.
#pragma once

#include "types.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace attend {

/// Storage tag of the 8-bit KV cache format (see the file comment): `KVCache<Q8_0>`. Queries,
/// keys and values given to such a cache, and its outputs, are float.
struct Q8_0 {};

/// One q8_0 block: 32 values x_i ~ scale * q[i].
struct BlockQ8_0 {
  float scale;
  std::int8_t q[32];
};
static_assert(sizeof(BlockQ8_0) == 36, "a q8_0 block is a float and 32 bytes");

namespace detail {

/// Values per q8_0 block.
inline constexpr Index kQ8Block = 32;

/// Blocks of a head of d values.
constexpr Index q8_blocks(Index d) { return (d + kQ8Block - 1) / kQ8Block; }

/// Quantizes the n <= 32 values x[0..n) into `block` (the rest of it zero), as the file comment says.
inline void quantize_q8_0(const float* x, Index n, BlockQ8_0& block) {
  float amax = 0;
  bool finite = true;
  for (Index i = 0; i < n; ++i) {
    finite = finite && std::isfinite(x[i]);
    amax = std::max(amax, std::fabs(x[i]));
  }
  std::fill(block.q, block.q + kQ8Block, std::int8_t(0));
  if (!finite) {  // reads back as NaN
    block.scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  block.scale = amax / 127;
  const float inverse = block.scale != 0 ? 1 / block.scale : 0.0f;
  for (Index i = 0; i < n; ++i)
    block.q[i] = std::int8_t(std::clamp(std::round(x[i] * inverse), -127.0f, 127.0f));
}

/// The value x^_i = s q_i of a block, rounded to float.
inline float dequantize_q8_0(const BlockQ8_0& block, Index i) { return block.scale * float(block.q[i]); }

}  // namespace detail
}  // namespace attend
