// SPDX-License-Identifier: MIT
/// \file detail/sinks.hpp
/// \brief The merge of a learned sink into a result (attention/sinks.hpp), shared by every entry
/// point that takes sinks: the multi-head, batched and single-head calls, the layer, the decode
/// steps and the paged cache.
#pragma once

#include "../types.hpp"
#include "checks.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace attend::detail {

/// Merges the partial of a sink, output 0 and log-sum-exp `sink`, into (out, lse), row by row
/// (see attention/sinks.hpp), as merge_partial_into would with a zero partial: with
/// lse' = log(e^lse + e^sink), out and the row of `weights` (when given) are scaled by
/// e^(lse - lse'), so the weights become e^(x_ij - lse') and sum to 1 - e^(sink - lse') < 1.
/// Rows where both are -inf stay zero with lse -inf; a NaN sink makes the row NaN.
/// \param out (L, d_v), lse (L), weights (L, Lk), or null for none
template <class T>
void merge_sink_into(MatrixRef<T> out, VectorRef<T> lse, T sink, MatrixRef<T>* weights = nullptr) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < out.rows(); ++i) {
    const T a = lse(i);
    const T m = std::isnan(sink) ? sink : std::max(a, sink);
    if (m == kNegInf) {  // neither the keys nor the sink
      out.row(i).setZero();
      continue;
    }
    const T wa = std::exp(a - m), wb = std::exp(sink - m), sum = wa + wb;
    out.row(i) *= wa / sum;
    if (weights != nullptr) weights->row(i) *= wa / sum;
    lse(i) = m + std::log(sum);
  }
}

/// Checks a sink vector against H heads: empty (no sinks) or H logits.
inline void check_sinks(Index sinks, Index heads) {
  ATTEND_CHECK(sinks == 0 || sinks == heads, "sinks of size " + std::to_string(sinks) +
                                                 " must be empty or have num_heads = " + std::to_string(heads) +
                                                 " entries");
}

}  // namespace attend::detail
