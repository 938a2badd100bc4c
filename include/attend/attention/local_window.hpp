// SPDX-License-Identifier: MIT
/// \file attention/local_window.hpp
/// \brief Local-window attention: each query sees the keys in [a - left, a + right] around its
/// aligned key a, at a cost linear in the sequence length.
///
/// The window is the `Window` mask policy, whose key range lets the blocked path visit only the
/// O(w) keys of each query tile: time O(L w d) and memory O(tile) instead of O(L^2). The
/// materialized path forms the whole (Lq, Lk) score matrix, so `Algorithm::Auto` picks the
/// blocked path whenever the window leaves most keys of a row unseen.
#pragma once

#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "scaled_dot_product.hpp"

#include <string>

namespace attend {

/// The causal sliding window of `size` keys ending at each query's aligned key (Mistral's
/// sliding window): `Window(size - 1, 0, alignment)`.
/// \throws attend::invalid_argument unless size >= 1.
inline Window sliding_window(Index size, Alignment alignment = Alignment::TopLeft) {
  ATTEND_CHECK(size >= 1, "a sliding window needs at least one key, got size " + std::to_string(size));
  return Window(size - 1, 0, alignment);
}

namespace detail {

/// `options` with Auto resolved to Blocked when a window row sees less than half of the keys:
/// 2 (left + right + 1) < Lk, i.e. left + right + 1 <= (Lk - 1) / 2, compared side by side so
/// that no sum overflows (a window of INT64_MAX keys is as good as unbounded).
inline AttentionOptions local_window_options(AttentionOptions options, const Window& window, Index num_keys) {
  const Index most_seen = (num_keys - 1) / 2;  // the most keys a row may see while seeing less than half
  const bool narrow =
      window.left >= 0 && window.right >= 0 && window.left < most_seen && window.right < most_seen - window.left;
  if (options.algorithm == Algorithm::Auto && narrow) options.algorithm = Algorithm::Blocked;
  return options;
}

}  // namespace detail

/// Writes scaled dot-product attention restricted to `window` (and to `mask`, if given) into
/// `out` (Lq, Dv), with each row's log-sum-exp in `lse` when non-empty. Shapes and options as
/// scaled_dot_product_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
void local_window_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                 const Eigen::MatrixBase<DV>& v, const Window& window,
                                 MatrixRef<typename DQ::Scalar> out, const MaskBase<Mask>& mask = NoMask{},
                                 const AttentionOptions& options = {},
                                 VectorRef<accumulator_t<typename DQ::Scalar>> lse = detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  scaled_dot_product_attention_into(q, k, v, out, window & mask,
                                    detail::local_window_options(options, window, k.rows()), lse);
}

/// Returns local-window attention, (Lq, Dv). See local_window_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> local_window_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                   const Eigen::MatrixBase<DV>& v, const Window& window,
                                                   const MaskBase<Mask>& mask = NoMask{},
                                                   const AttentionOptions& options = {}) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  local_window_attention_into(q, k, v, window, out, mask, options);
  return out;
}

}  // namespace attend
