// SPDX-License-Identifier: MIT
/// \file options.hpp
/// \brief Scalars and flags of an attention call, and the result struct.
#pragma once

#include "types.hpp"

#include <cmath>
#include <optional>
#include <string>

namespace attend {

/// How a causal mask or window lines up queries with keys when Lq != Lk.
enum class Alignment {
  TopLeft,     ///< query i is aligned with key i (PyTorch `is_causal`).
  BottomRight  ///< query i is aligned with key i + Lk - Lq (FlashAttention, KV caches).
};

/// Which execution path computes the attention.
enum class Algorithm {
  Auto,          ///< Blocked when the score matrix would be large, otherwise materialized.
  Materialized,  ///< Form S = scores(Q, K) whole, softmax, then P V. Returns weights.
  Blocked        ///< Tiles of Q against tiles of K/V with an online softmax; O(tile) memory.
};

/// Scalars and flags; tensors (masks, lengths, positions) are explicit arguments.
struct AttentionOptions {
  /// Multiplies the scores; unset means 1 / sqrt(d_k).
  std::optional<double> scale;
  /// Execution path.
  Algorithm algorithm = Algorithm::Auto;
  /// Query rows per tile of the blocked path; 0 picks the default; Lq or more is one tile.
  Index block_q = 0;
  /// Key rows per tile of the blocked path (per split of decode_attention_into); 0 picks the
  /// default; Lk or more is one tile.
  Index block_k = 0;
  /// Threads of this call (OpenMP); 0 = the default: OpenMP's max threads, shared among the
  /// caller's threads inside attend at the same moment, and 1 inside a parallel region of the
  /// caller's. Ignored without OpenMP. Results are bitwise the same for every count.
  int num_threads = 0;
  /// Decoding over a q8_0 cache (KVCache<Q8_0>, PagedKVCache<Q8_0>): round each head's scaled
  /// query to 8 bits, s_q round(q' / s_q) with s_q = max |q'| / 127 over the head's d values (as
  /// llama.cpp rounds queries for its 8-bit caches), and form the scores from whole integer dot
  /// products of blocks, with AVX512-VNNI where the target has it (detail/q8_kernels.hpp). A
  /// score then moves by at most (s_q / 2) sum_c |k^_c| (k^ the stored key); the score kernel
  /// runs 1.9x faster, a step (d = 128) 5-7%. Other formats and paths ignore it.
  bool quantize_queries = false;
};

/// Output of an attention call with its statistics. With bf16 or half inputs the output is
/// stored as the inputs are, and the log-sum-exp and weights in float.
template <class T>
struct AttentionResult {
  Matrix<T> output;                   ///< (Lq, Dv)
  Vector<accumulator_t<T>> lse;       ///< (Lq) log-sum-exp of each row's masked scores; -inf for a fully masked row
  Matrix<accumulator_t<T>> weights;  ///< (Lq, Lk) softmax weights when requested, else empty
};

namespace detail {

/// The scale of the options, defaulting to 1 / sqrt(d_k).
/// \throws attend::invalid_argument when the given scale is not finite once cast to T (NaN, Inf,
///         or a double beyond T's range such as 1e300 for float).
template <class T>
T resolve_scale(const AttentionOptions& options, Index head_dim) {
  if (!options.scale) return T(1) / std::sqrt(static_cast<T>(head_dim));
  const T scale = static_cast<T>(*options.scale);
  ATTEND_CHECK(std::isfinite(scale),
               "scale " + number_string(*options.scale) + " is not a finite " + scalar_name<T>());
  return scale;
}

}  // namespace detail
}  // namespace attend
