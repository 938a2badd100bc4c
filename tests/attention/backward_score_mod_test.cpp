// SPDX-License-Identifier: MIT
// The backward through the masks' score modifiers (custom.hpp): SoftCap's tanh and a ScoreMod
// given its derivative (as a second function or a member grad), alone, composed with masks and
// biases in either order and with each other (the chain rule in the order of `&`), per head in
// multi-head calls; finite differences in double on both paths, SoftCap in float against the
// long-double reference, and keys a ScoreMod drops (-inf) getting no gradient whatever the
// derivative says there.
#include "support/attention_case.hpp"
#include "support/finite_differences.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"

#include <attend/attention/backward.hpp>
#include <attend/custom.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

using M = Matrix<double>;

std::vector<AttentionOptions> fd_paths() { return {materialized_path(), blocked_path(4, 5)}; }

struct Problem {
  M q, k, v, d_out;
};

Problem draw(Rng& rng, Index lq = 7, Index lk = 11, Index dk = 5, Index dv = 3, double scale = 1) {
  return {rng.normal<double>(lq, dk, scale), rng.normal<double>(lk, dk, scale), rng.normal<double>(lk, dv),
          rng.normal<double>(lq, dv)};
}

/// Finite differences of scaled_dot_product_attention under `mask` for dq, dk and dv.
template <class Mask>
void check_single_head(Problem& p, const Mask& mask, const std::string& name) {
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(name + " " + describe(options));
    const auto loss = [&] { return inner(p.d_out, scaled_dot_product_attention(p.q, p.k, p.v, mask, options)); };
    const AttentionResult<double> f = scaled_dot_product_attention_with_lse(p.q, p.k, p.v, mask, options);
    const AttentionGradients<double> g =
        scaled_dot_product_attention_backward(p.q, p.k, p.v, f, p.d_out, mask, options);
    expect_matches_finite_differences(loss, p.q, g.dq, "dq");
    expect_matches_finite_differences(loss, p.k, g.dk, "dk");
    expect_matches_finite_differences(loss, p.v, g.dv, "dv");
  }
}

/// A modifier with a member grad: s + a sin(s) + a position term.
struct Wobble {
  double a;
  double operator()(double s, Index, Index q, Index k) const { return s + a * std::sin(s) + 0.05 * double(q - k); }
  double grad(double s, Index, Index, Index) const { return 1 + a * std::cos(s); }
};

TEST(BackwardScoreModTest, ScoreModWithItsDerivativeMatchesFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  Problem p = draw(rng, 7, 11, 5, 3, 1.5);
  const auto cube = [](double s, Index, Index q, Index k) {
    return s + 0.1 * s * s * s / (1 + s * s) + 0.02 * double(q + k);
  };
  const auto cube_grad = [](double s, Index, Index, Index) {
    const double t = 1 + s * s;
    return 1 + 0.1 * (3 * s * s * t - 2 * s * s * s * s) / (t * t);
  };
  check_single_head(p, ScoreMod(cube, cube_grad), "ScoreMod(cube, derivative)");
  check_single_head(p, Causal(Alignment::BottomRight) & ScoreMod(cube, cube_grad), "Causal & ScoreMod");
  check_single_head(p, ScoreMod(Wobble{0.4}), "ScoreMod(with member grad)");
  // Two modifiers chain in the order of `&`: SoftCap first, then the ScoreMod on capped scores.
  check_single_head(p, SoftCap(1.5) & ScoreMod(Wobble{0.4}) & Window(3, 2), "SoftCap & ScoreMod & Window");
  check_single_head(p, ScoreMod(Wobble{0.4}) & SoftCap(1.5), "ScoreMod & SoftCap");
}

TEST(BackwardScoreModTest, SoftCapMaskMatchesFiniteDifferencesBeforeAndAfterABias) {
  ATTEND_SEEDED_RNG(rng);
  Problem p = draw(rng, 9, 12, 4, 3, 2.0);  // scores past the cap
  const M bias = rng.normal<double>(9, 12, 2.0);
  check_single_head(p, SoftCap(2), "SoftCap");
  check_single_head(p, SoftCap(2) & AdditiveMask(bias) & Causal(), "SoftCap & AdditiveMask & Causal (Gemma 2)");
  check_single_head(p, AdditiveMask(bias) & SoftCap(2), "AdditiveMask & SoftCap");
  check_single_head(p, Alibi(0.3) & SoftCap(2) & KeyPadding(9), "Alibi & SoftCap & KeyPadding");
}

TEST(BackwardScoreModTest, PerHeadScoreModInMultiHeadCallsMatchesFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, d = 3, dv = 2;
  for (const Index kv_heads : {Index(4), Index(2)}) {
    M q = rng.normal<double>(6, heads * d), k = rng.normal<double>(8, kv_heads * d),
      v = rng.normal<double>(8, kv_heads * dv);
    const M d_out = rng.normal<double>(6, heads * dv);
    // Head h scales its scores by (1 + 0.3 h) and caps them at 2 + h: both depend on h.
    const auto modify = [](double s, Index h, Index, Index) {
      const double cap = 2.0 + double(h);
      return cap * std::tanh((1 + 0.3 * double(h)) * s / cap);
    };
    const auto derivative = [](double s, Index h, Index, Index) {
      const double cap = 2.0 + double(h), t = std::tanh((1 + 0.3 * double(h)) * s / cap);
      return (1 + 0.3 * double(h)) * (1 - t * t);
    };
    const auto mask = Causal() & ScoreMod(modify, derivative);
    for (const AttentionOptions& options : fd_paths()) {
      SCOPED_TRACE("H_kv=" + std::to_string(kv_heads) + " " + describe(options));
      const auto loss = [&] { return inner(d_out, multi_head_attention(q, k, v, heads, mask, options)); };
      const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, heads, mask, options);
      const AttentionGradients<double> g = multi_head_attention_backward(q, k, v, heads, f, d_out, mask, options);
      expect_matches_finite_differences(loss, q, g.dq, "dq");
      expect_matches_finite_differences(loss, k, g.dk, "dk");
      expect_matches_finite_differences(loss, v, g.dv, "dv");
    }
  }
}

TEST(BackwardScoreModTest, SoftCapMaskInFloatMatchesTheReference) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 40, lk = 70, dk = 24, dv = 16;
  const Matrix<float> q = rng.normal<float>(lq, dk, 1.5), k = rng.normal<float>(lk, dk, 1.5),
                      v = rng.normal<float>(lk, dv), d_out = rng.normal<float>(lq, dv);
  const Matrix<float> bias = rng.normal<float>(lq, lk);
  GradientCase c;
  c.scale = 1 / std::sqrt(Real(dk));
  c.cap = 2;
  c.bias = bias.cast<Real>();
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  const RealGradients ref = reference_gradients(q, k, v, d_out, visible, c);
  const Gradients<float> base = baseline_gradients<float>(q, k, v, d_out, visible, c);
  const auto mask = SoftCap(2) & AdditiveMask(bias) & Causal(Alignment::BottomRight);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<float> f = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
    expect_gradients_match<float>(scaled_dot_product_attention_backward(q, k, v, f, d_out, mask, options), ref, base);
  }
}

TEST(BackwardScoreModTest, DroppedKeysGetNoGradientWhateverTheDerivativeSays) {
  ATTEND_SEEDED_RNG(rng);
  const Problem p = draw(rng, 13, 17, 6, 4);
  const auto dropped = [](Index q, Index k) { return (q + 2 * k) % 3 == 0 || q == 4; };  // row 4 sees nothing
  const auto modify = [&](double s, Index, Index q, Index k) {
    return dropped(q, k) ? -std::numeric_limits<double>::infinity() : s;
  };
  const auto derivative = [&](double, Index, Index q, Index k) {
    return dropped(q, k) ? std::numeric_limits<double>::quiet_NaN() : 1.0;
  };
  const auto same_visibility = MaskMod([&](Index, Index q, Index k) { return !dropped(q, k); });
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 5), blocked_path()}) {
    SCOPED_TRACE(describe(options));
    const auto mask = ScoreMod(modify, derivative);
    const AttentionResult<double> f = scaled_dot_product_attention_with_lse(p.q, p.k, p.v, mask, options);
    const AttentionGradients<double> g =
        scaled_dot_product_attention_backward(p.q, p.k, p.v, f, p.d_out, mask, options);
    const AttentionResult<double> fm = scaled_dot_product_attention_with_lse(p.q, p.k, p.v, same_visibility, options);
    const AttentionGradients<double> gm =
        scaled_dot_product_attention_backward(p.q, p.k, p.v, fm, p.d_out, same_visibility, options);
    EXPECT_TRUE(g.dq.allFinite() && g.dk.allFinite() && g.dv.allFinite());
    EXPECT_TRUE(g.dq.row(4).isZero(0)) << "a query that sees no key has no gradient";
    EXPECT_TRUE(g.dq.isApprox(gm.dq, 1e-13) && g.dk.isApprox(gm.dk, 1e-13) && g.dv.isApprox(gm.dv, 1e-13));
  }
}

}  // namespace
