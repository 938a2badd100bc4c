// SPDX-License-Identifier: MIT
// The differential check of scaled dot-product attention: one drawn case (shapes, mask, data)
// against the long-double reference, through every requested execution path.
#pragma once

#include "baseline.hpp"
#include "masks.hpp"
#include "random.hpp"
#include "reference.hpp"
#include "tolerance.hpp"

#include <attend/attention/scaled_dot_product.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace attend::test {

inline AttentionOptions materialized_path() {
  AttentionOptions o;
  o.algorithm = Algorithm::Materialized;
  return o;
}

/// The blocked path with (block_q, block_k) tiles; 0 is the default size.
inline AttentionOptions blocked_path(Index block_q = 0, Index block_k = 0) {
  AttentionOptions o;
  o.algorithm = Algorithm::Blocked;
  o.block_q = block_q;
  o.block_k = block_k;
  return o;
}

inline std::string describe(const AttentionOptions& o) {
  if (o.algorithm == Algorithm::Materialized) return "Materialized";
  if (o.algorithm == Algorithm::Auto) return "Auto";
  return "Blocked(" + std::to_string(o.block_q) + ", " + std::to_string(o.block_k) + ")";
}

/// Both paths with their default tiles.
inline std::vector<AttentionOptions> both_paths() { return {materialized_path(), blocked_path()}; }

/// Checks attention of the given inputs (any Eigen expressions: blocks, strided maps, column-major)
/// with `mask` (described by `mask_case`) against the reference, through each of `paths`. The
/// materialized `_with_weights` entry point is checked too, weights included.
template <class T, class Q, class K, class V, class Mask>
void check_inputs(const Q& q, const K& k, const V& v, const Mask& mask, const MaskCase& mask_case,
                  const std::vector<AttentionOptions>& paths, bool unit_scale = true) {
  SCOPED_TRACE("Lq=" + std::to_string(q.rows()) + " Lk=" + std::to_string(k.rows()) + " Dk=" +
               std::to_string(q.cols()) + " Dv=" + std::to_string(v.cols()) + " mask " + mask_case.description);
  ASSERT_TRUE(mostly_visible(mask_case));
  const Real scale = 1 / std::sqrt(Real(q.cols()));
  const Reference ref = reference_attention(q, k, v, scale, mask_case.visible, mask_case.bias);
  const Baseline<T> base =
      baseline_attention<T>(q, k, v, T(1) / std::sqrt(T(q.cols())), mask_case.visible, mask_case.bias);
  for (const AttentionOptions& options : paths) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
    expect_matches_reference<T>(r.output, r.lse, ref, base, unit_scale);
  }
  const AttentionResult<T> w = scaled_dot_product_attention_with_weights(q, k, v, mask);
  SCOPED_TRACE("with_weights");
  expect_matches_reference<T>(w.output, w.lse, ref, base, unit_scale);
  EXPECT_TRUE(within_tolerance<T>(w.weights, ref.weights, base.weights, unit_scale)) << "weights";
}

/// Draws Q (Lq, Dk), K (Lk, Dk), V (Lk, Dv) from N(0, 1) and a mask of `spec`, then check_inputs.
template <class T>
void check_case(Index lq, Index lk, Index dk, Index dv, const MaskSpec& spec, const std::vector<AttentionOptions>& paths,
                Rng& rng) {
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
    check_inputs<T>(q, k, v, mask, c, paths, !c.bias.has_value());
  });
}

}  // namespace attend::test
