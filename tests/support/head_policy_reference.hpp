// SPDX-License-Identifier: MIT
// The long-double reference of attention whose visibility and bias differ per head: head h of
// q (Lq, H d) reads kv head g = h / (H / H_kv) of k (Lk, H_kv d) and v (Lk, H_kv d_v), sees the
// keys `visible[h]` allows and adds `bias[h]` (empty: none) to its scaled scores. Written from
// the definition, sharing no code with the library, for the per-head and decoding tests.
#pragma once

#include "baseline.hpp"
#include "reference.hpp"
#include "tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace attend::test {

/// Visibility and bias of every head; bias[h] empty means no bias.
struct HeadPolicies {
  std::vector<BoolMatrix> visible;  // H of (Lq, Lk)
  std::vector<RealMatrix> bias;     // H of (Lq, Lk), or empty
};

/// Checks every head of `out` (Lq, H d_v) against the reference with the tolerance rule; the
/// baseline is the plain same-precision computation with the same visibility and bias.
template <class T, class Out>
void expect_heads_match_reference(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Index heads,
                                  const Out& out, const HeadPolicies& policies, Real scale) {
  const Index d = q.cols() / heads, kv_heads = k.cols() / d, dv = v.cols() / kv_heads;
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const Matrix<T> qh = q.middleCols(h * d, d), kg = k.middleCols(g * d, d), vg = v.middleCols(g * dv, dv);
    const std::size_t i = std::size_t(h);
    const std::optional<RealMatrix> bias =
        policies.bias.empty() || policies.bias[i].size() == 0 ? std::nullopt : std::optional<RealMatrix>(policies.bias[i]);
    const Reference ref = reference_attention(qh, kg, vg, scale, policies.visible[i], bias);
    const Baseline<T> base = baseline_attention<T>(qh, kg, vg, T(scale), policies.visible[i], bias);
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(out.middleCols(h * dv, dv)), ref.output, base.output));
  }
}

}  // namespace attend::test
