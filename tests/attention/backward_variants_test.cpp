// SPDX-License-Identifier: MIT
// Gradients of every dot-family variant (attention/backward.hpp): dot, bilinear (and W),
// cosine (through the normalization, and the temperature), soft-capped, local window, top-k
// and hard attention, the bias of an AdditiveMask and a T5 table, and multi-head / GQA.
// Each is checked against central finite differences of its own forward in double, entry by
// entry, on both paths; in float against the long-double reference with the rule of
// support/gradient_reference.hpp where the reference covers the variant.
#include "support/attention_case.hpp"
#include "support/finite_differences.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"

#include <attend/attention/backward.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

using M = Matrix<double>;
using V = Vector<double>;

std::vector<AttentionOptions> fd_paths() { return {materialized_path(), blocked_path(4, 5)}; }

struct Problem {
  M q, k, v, d_out;
};

Problem draw(Rng& rng, Index lq = 7, Index lk = 11, Index dk = 5, Index dv = 3) {
  return {rng.normal<double>(lq, dk), rng.normal<double>(lk, dk), rng.normal<double>(lk, dv),
          rng.normal<double>(lq, dv)};
}

TEST(BackwardVariantsTest, ScaledDotWithEveryMaskMatchesFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  for (const MaskSpec& spec : all_mask_specs()) {
    Problem p = draw(rng);
    with_mask<double>(spec, p.q.rows(), p.k.rows(), rng, [&](const auto& mask, const MaskCase& c) {
      for (const AttentionOptions& options : fd_paths()) {
        SCOPED_TRACE(c.description + " " + describe(options));
        const auto loss = [&] { return inner(p.d_out, scaled_dot_product_attention(p.q, p.k, p.v, mask, options)); };
        const AttentionResult<double> f = scaled_dot_product_attention_with_lse(p.q, p.k, p.v, mask, options);
        const AttentionGradients<double> g =
            scaled_dot_product_attention_backward(p.q, p.k, p.v, f, p.d_out, mask, options);
        expect_matches_finite_differences(loss, p.q, g.dq, "dq");
        expect_matches_finite_differences(loss, p.k, g.dk, "dk");
        expect_matches_finite_differences(loss, p.v, g.dv, "dv");
      }
    });
  }
}

TEST(BackwardVariantsTest, AdditiveBiasAndRelativePositionTableGradientsMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  Problem p = draw(rng, 9, 12);
  M bias = rng.normal<double>(9, 12, 2.0);
  bias(3, 4) = -std::numeric_limits<double>::infinity();
  V table = rng.normal<double>(8, 1, 2.0);
  const RelativePositionBuckets buckets{8, true, 6, Alignment::BottomRight};
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(describe(options));
    const auto mask = AdditiveMask(bias) & Causal(Alignment::BottomRight) &
                      RelativePositionBias(table, buckets.bidirectional, buckets.max_distance, buckets.alignment);
    const auto loss = [&] { return inner(p.d_out, scaled_dot_product_attention(p.q, p.k, p.v, mask, options)); };
    const AttentionResult<double> f = scaled_dot_product_attention_with_lse(p.q, p.k, p.v, mask, options);
    M d_bias;
    V d_table;
    BiasGradients<double> request;
    request.d_bias = &d_bias;
    request.d_table = &d_table;
    request.table_buckets = buckets;
    const AttentionGradients<double> g =
        scaled_dot_product_attention_backward(p.q, p.k, p.v, f, p.d_out, mask, options, request);
    EXPECT_EQ(d_bias(3, 4), 0.0) << "a hidden key has no gradient";
    expect_matches_finite_differences(loss, bias, d_bias, "d_bias");
    expect_matches_finite_differences(loss, table, d_table, "d_table");
    expect_matches_finite_differences(loss, p.q, g.dq, "dq");
    expect_matches_finite_differences(loss, p.k, g.dk, "dk");
  }
}

TEST(BackwardVariantsTest, DotBilinearCosineAndSoftCapMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  Problem p = draw(rng);
  M w = rng.normal<double>(5, 4, 0.5);  // (d_q, d_k): k of width 4
  M k4 = rng.normal<double>(11, 4);
  double temperature = 0.3;
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(describe(options));
    const Causal mask(Alignment::BottomRight);
    {
      SCOPED_TRACE("dot");
      const auto loss = [&] { return inner(p.d_out, dot_product_attention(p.q, p.k, p.v, mask, options)); };
      M out(7, 3);
      V lse(7);
      dot_product_attention_into(p.q, p.k, p.v, out, mask, options, lse);
      const AttentionGradients<double> g =
          dot_product_attention_backward(p.q, p.k, p.v, out, lse, p.d_out, mask, options);
      expect_matches_finite_differences(loss, p.q, g.dq, "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
    }
    {
      SCOPED_TRACE("bilinear");
      const auto loss = [&] { return inner(p.d_out, bilinear_attention(p.q, k4, p.v, w, mask, options)); };
      M out(7, 3);
      V lse(7);
      bilinear_attention_into(p.q, k4, p.v, w, out, mask, options, lse);
      const BilinearGradients<double> g =
          bilinear_attention_backward(p.q, k4, p.v, w, out, lse, p.d_out, mask, options);
      expect_matches_finite_differences(loss, p.q, g.dq, "dq");
      expect_matches_finite_differences(loss, k4, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
      expect_matches_finite_differences(loss, w, g.dw, "dw");
    }
    {
      SCOPED_TRACE("cosine");
      M q = p.q;
      q.row(2) *= 1e-13;  // below the norm floor: the gradient of x / 1e-12
      const auto loss = [&] { return inner(p.d_out, cosine_attention(q, p.k, p.v, temperature, mask, options)); };
      M out(7, 3);
      V lse(7);
      cosine_attention_into(q, p.k, p.v, temperature, out, mask, options, lse);
      const CosineGradients<double> g =
          cosine_attention_backward(q, p.k, p.v, temperature, out, lse, p.d_out, mask, options);
      expect_matches_finite_differences(loss, q.topRows(2), g.dq.topRows(2), "dq");
      // Step h = 1e-17 (scale 1e-11; the row's norm is about 2e-13, under the floor): the
      // difference's rounding error (eps |loss| / h) and truncation (h^2) both stay near 1e-7 of
      // this small gradient; h = 1e-19 let rounding reach 3e-6 for some seeds, h = 1e-16
      // truncation 5e-6, over the 1e-6 tolerance.
      expect_matches_finite_differences(loss, q.row(2), g.dq.row(2), "dq of the row below the floor", 1e-11);
      expect_matches_finite_differences(loss, q.bottomRows(4), g.dq.bottomRows(4), "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
      Eigen::Matrix<double, 1, 1> t, dt;
      t(0, 0) = temperature;
      dt(0, 0) = g.d_temperature;
      const auto loss_t = [&] { return inner(p.d_out, cosine_attention(q, p.k, p.v, t(0, 0), mask, options)); };
      expect_matches_finite_differences(loss_t, t, dt, "d_temperature");
    }
    {
      SCOPED_TRACE("soft cap");
      const double cap = 1.5;
      M q = 3 * p.q;  // scores past the cap
      const auto loss = [&] { return inner(p.d_out, soft_capped_attention(q, p.k, p.v, cap, mask, options)); };
      M out(7, 3);
      V lse(7);
      soft_capped_attention_into(q, p.k, p.v, cap, out, mask, options, lse);
      const AttentionGradients<double> g =
          soft_capped_attention_backward(q, p.k, p.v, cap, out, lse, p.d_out, mask, options);
      expect_matches_finite_differences(loss, q, g.dq, "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
    }
  }
}

TEST(BackwardVariantsTest, LocalWindowTopKAndHardMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  Problem p = draw(rng, 9, 13);
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(describe(options));
    {
      SCOPED_TRACE("local window");
      const Window window(2, 1, Alignment::BottomRight);
      const auto loss = [&] {
        return inner(p.d_out, local_window_attention(p.q, p.k, p.v, window, NoMask{}, options));
      };
      M out(9, 3);
      V lse(9);
      local_window_attention_into(p.q, p.k, p.v, window, out, NoMask{}, options, lse);
      const AttentionGradients<double> g =
          local_window_attention_backward(p.q, p.k, p.v, window, out, lse, p.d_out, NoMask{}, options);
      expect_matches_finite_differences(loss, p.q, g.dq, "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
    }
    {
      SCOPED_TRACE("top-k");
      const auto loss = [&] { return inner(p.d_out, top_k_attention(p.q, p.k, p.v, 4, Causal(), options)); };
      M out(9, 3);
      V lse(9);
      top_k_attention_into(p.q, p.k, p.v, 4, out, Causal(), options, lse);
      const AttentionGradients<double> g =
          top_k_attention_backward(p.q, p.k, p.v, 4, out, lse, p.d_out, Causal(), options);
      expect_matches_finite_differences(loss, p.q, g.dq, "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
    }
    {
      SCOPED_TRACE("hard");
      M out(9, 3);
      V lse(9);
      top_k_attention_into(p.q, p.k, p.v, 1, out, NoMask{}, options, lse);
      const AttentionGradients<double> g = hard_attention_backward(p.q, p.k, p.v, out, lse, p.d_out, NoMask{}, options);
      // One key per query has weight 1 whatever the scores: dq and dk are exactly zero, and dv_j
      // sums d_out over the queries that picked key j.
      EXPECT_TRUE(g.dq.isZero(0));
      EXPECT_TRUE(g.dk.isZero(0));
      const auto loss = [&] { return inner(p.d_out, hard_attention(p.q, p.k, p.v, NoMask{}, options)); };
      expect_matches_finite_differences(loss, p.v, g.dv, "dv");
    }
  }
}

TEST(BackwardVariantsTest, MultiHeadAndGroupedQueryMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, d = 3, dv = 2;
  const auto check = [&](Index kv_heads, const auto& mask, const std::string& name) {
    M q = rng.normal<double>(6, heads * d), k = rng.normal<double>(8, kv_heads * d),
      v = rng.normal<double>(8, kv_heads * dv);
    const M d_out = rng.normal<double>(6, heads * dv);
    for (const AttentionOptions& options : fd_paths()) {
      SCOPED_TRACE("H_kv=" + std::to_string(kv_heads) + " " + name + " " + describe(options));
      const auto loss = [&] { return inner(d_out, multi_head_attention(q, k, v, heads, mask, options)); };
      const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, heads, mask, options);
      EXPECT_TRUE(f.output.isApprox(multi_head_attention(q, k, v, heads, mask, options)));
      const AttentionGradients<double> g = multi_head_attention_backward(q, k, v, heads, f, d_out, mask, options);
      expect_matches_finite_differences(loss, q, g.dq, "dq");
      expect_matches_finite_differences(loss, k, g.dk, "dk");
      expect_matches_finite_differences(loss, v, g.dv, "dv");
    }
  };
  for (const Index kv_heads : {Index(4), Index(2), Index(1)}) check(kv_heads, Causal(), "Causal");
  // No queries or no keys: zero gradients.
  for (const auto& [lq, lk] : {std::pair<Index, Index>{0, 5}, {4, 0}}) {
    const M q = M::Ones(lq, heads * d), k = M::Ones(lk, 2 * d), v = M::Ones(lk, 2 * dv), d_out = M::Ones(lq, heads * dv);
    const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, heads, Causal());
    const AttentionGradients<double> g = multi_head_attention_backward(q, k, v, heads, f, d_out, Causal());
    EXPECT_TRUE(f.output.isZero(0) && (f.lse.array() == -std::numeric_limits<double>::infinity()).all());
    EXPECT_TRUE(g.dq.isZero(0) && g.dk.isZero(0) && g.dv.isZero(0)) << "Lq=" << lq << " Lk=" << lk;
  }
  // Policies bound per head: ALiBi's slopes and a T5 table of one column per head.
  const M table = rng.normal<double>(8, heads);
  check(2, Causal() & Alibi::for_heads(heads), "Causal & Alibi::for_heads");
  check(2, RelativePositionBias(table, true, 6), "RelativePositionBias (8 x H)");
}

// In float, against the long-double reference with the tolerance rule.

TEST(BackwardVariantsTest, SoftCapAndBiasGradientsInFloatMatchTheReference) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 40, lk = 70, dk = 24, dv = 16;
  const Matrix<float> q = rng.normal<float>(lq, dk), k = rng.normal<float>(lk, dk), v = rng.normal<float>(lk, dv);
  const Matrix<float> d_out = rng.normal<float>(lq, dv);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    {
      SCOPED_TRACE("soft cap");
      GradientCase c;
      c.scale = Real(float(2 / std::sqrt(double(dk))));  // scores past the cap; the scale the library uses
      c.cap = 2;
      const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
      AttentionOptions o = options;
      o.scale = double(c.scale);
      Matrix<float> out(lq, dv);
      Vector<float> lse(lq);
      soft_capped_attention_into(q, k, v, 2.0, out, Causal(Alignment::BottomRight), o, lse);
      const AttentionGradients<float> g =
          soft_capped_attention_backward(q, k, v, 2.0, out, lse, d_out, Causal(Alignment::BottomRight), o);
      expect_gradients_match<float>(g, reference_gradients(q, k, v, d_out, visible, c),
                                    baseline_gradients<float>(q, k, v, d_out, visible, c));
    }
    {
      SCOPED_TRACE("additive bias and T5 table");
      Matrix<float> bias = rng.normal<float>(lq, lk, 2.0);
      for (Index i = 0; i < lq; ++i) bias(i, (i * 7) % lk) = -std::numeric_limits<float>::infinity();
      const Vector<float> table = rng.normal<float>(32, 1, 2.0);
      const RelativePositionBuckets buckets{32, true, 16, Alignment::TopLeft};
      GradientCase c;
      c.scale = 1 / std::sqrt(Real(dk));
      RealMatrix total(lq, lk);
      BoolMatrix visible(lq, lk);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
          visible(i, j) = bias(i, j) != -std::numeric_limits<float>::infinity();
          total(i, j) = Real(bias(i, j)) + Real(table(relative_position_bucket(j - i, true, 32, 16)));
        }
      c.bias = total;
      const auto mask = AdditiveMask(bias) & RelativePositionBias(table, true, 16);
      const AttentionResult<float> f = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
      Matrix<float> d_bias;
      Vector<float> d_table;
      BiasGradients<float> request;
      request.d_bias = &d_bias;
      request.d_table = &d_table;
      request.table_buckets = buckets;
      const AttentionGradients<float> g =
          scaled_dot_product_attention_backward(q, k, v, f, d_out, mask, options, request);
      const RealGradients ref = reference_gradients(q, k, v, d_out, visible, c);
      const Gradients<float> base = baseline_gradients<float>(q, k, v, d_out, visible, c);
      expect_gradients_match<float>(g, ref, base);
      // dS is summed from the terms of dP - D: p (|dp| + |D|).
      RealMatrix ds_terms = RealMatrix::Constant(lq, lk, 1);
      RealVector table_ref = RealVector::Zero(32), table_terms = RealVector::Zero(32);
      Vector<float> table_base = Vector<float>::Zero(32);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
          const Index b = relative_position_bucket(j - i, true, 32, 16);
          table_ref(b) += ref.ds(i, j);
          table_terms(b) += std::fabs(ref.ds(i, j)) + 1;
          table_base(b) += base.ds(i, j);
        }
      EXPECT_TRUE(gradient_within_tolerance<float>(d_bias, ref.ds, base.ds, ds_terms, ref.max_abs_lse)) << "d_bias";
      EXPECT_TRUE(gradient_within_tolerance<float>(d_table, table_ref, table_base, table_terms, ref.max_abs_lse))
          << "d_table";
    }
  }
}

TEST(BackwardVariantsTest, TopKLocalWindowAndGroupedQueryInFloatMatchTheReference) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 45, lk = 80, dk = 16, dv = 8;
  const Matrix<float> q = rng.normal<float>(lq, dk), k = rng.normal<float>(lk, dk), v = rng.normal<float>(lk, dv);
  const Matrix<float> d_out = rng.normal<float>(lq, dv);
  GradientCase c;
  c.scale = 1 / std::sqrt(Real(dk));
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    {
      SCOPED_TRACE("top-k");
      const Index top = 6;
      // The reference selection: each row's 6 highest long-double scores among the causal keys.
      BoolMatrix visible = BoolMatrix::Constant(lq, lk, false);
      for (Index i = 0; i < lq; ++i) {
        std::vector<std::pair<Real, Index>> scores;
        for (Index j = 0; j <= std::min(i, lk - 1); ++j) {
          Real s = 0;
          for (Index x = 0; x < dk; ++x) s += Real(q(i, x)) * Real(k(j, x));
          scores.push_back({-s, j});
        }
        std::sort(scores.begin(), scores.end());
        for (std::size_t n = 0; n < scores.size() && n < std::size_t(top); ++n) visible(i, scores[n].second) = true;
      }
      Matrix<float> out(lq, dv);
      Vector<float> lse(lq);
      top_k_attention_into(q, k, v, top, out, Causal(), options, lse);
      const AttentionGradients<float> g = top_k_attention_backward(q, k, v, top, out, lse, d_out, Causal(), options);
      expect_gradients_match<float>(g, reference_gradients(q, k, v, d_out, visible, c),
                                    baseline_gradients<float>(q, k, v, d_out, visible, c));
    }
    {
      SCOPED_TRACE("local window");
      const Window window(9, 3, Alignment::BottomRight);
      const BoolMatrix visible = window_visibility(lq, lk, 9, 3, Alignment::BottomRight);
      Matrix<float> out(lq, dv);
      Vector<float> lse(lq);
      local_window_attention_into(q, k, v, window, out, NoMask{}, options, lse);
      const AttentionGradients<float> g =
          local_window_attention_backward(q, k, v, window, out, lse, d_out, NoMask{}, options);
      expect_gradients_match<float>(g, reference_gradients(q, k, v, d_out, visible, c),
                                    baseline_gradients<float>(q, k, v, d_out, visible, c));
    }
    {
      SCOPED_TRACE("grouped query");
      const Index heads = 4, kv_heads = 2, group = heads / kv_heads;
      const Matrix<float> mq = rng.normal<float>(lq, heads * dk), mk = rng.normal<float>(lk, kv_heads * dk);
      const Matrix<float> mv = rng.normal<float>(lk, kv_heads * dv), mdo = rng.normal<float>(lq, heads * dv);
      const MultiHeadLseResult<float> f = multi_head_attention_with_lse(mq, mk, mv, heads, Causal(), options);
      const AttentionGradients<float> g = multi_head_attention_backward(mq, mk, mv, heads, f, mdo, Causal(), options);
      const BoolMatrix visible = causal_visibility(lq, lk, Alignment::TopLeft);
      for (Index kv = 0; kv < kv_heads; ++kv) {
        RealGradients ref;
        Gradients<float> base;
        for (Index h = kv * group; h < (kv + 1) * group; ++h) {
          const Matrix<float> qh = mq.middleCols(h * dk, dk), kh = mk.middleCols(kv * dk, dk);
          const Matrix<float> vh = mv.middleCols(kv * dv, dv), doh = mdo.middleCols(h * dv, dv);
          const RealGradients r = reference_gradients(qh, kh, vh, doh, visible, c);
          const Gradients<float> b = baseline_gradients<float>(qh, kh, vh, doh, visible, c);
          const Matrix<float> dqh = g.dq.middleCols(h * dk, dk);
          EXPECT_TRUE(gradient_within_tolerance<float>(dqh, r.dq, b.dq, r.dq_terms, r.max_abs_lse)) << "dq head " << h;
          if (h == kv * group) {
            ref = r;
            base = b;
          } else {
            ref.dk += r.dk;
            ref.dv += r.dv;
            ref.dk_terms += r.dk_terms;
            ref.dv_terms += r.dv_terms;
            ref.max_abs_lse = std::max(ref.max_abs_lse, r.max_abs_lse);
            base.dk += b.dk;
            base.dv += b.dv;
          }
        }
        const Matrix<float> dkh = g.dk.middleCols(kv * dk, dk), dvh = g.dv.middleCols(kv * dv, dv);
        EXPECT_TRUE(gradient_within_tolerance<float>(dkh, ref.dk, base.dk, ref.dk_terms, ref.max_abs_lse))
            << "dk " << kv;
        EXPECT_TRUE(gradient_within_tolerance<float>(dvh, ref.dv, base.dv, ref.dv_terms, ref.max_abs_lse))
            << "dv " << kv;
      }
    }
  }
}

TEST(BackwardVariantsTest, BilinearInFloatMatchesTheReferenceThroughTheChainRule) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 33, lk = 50, d_q = 12, d_k = 10, dv = 8;
  const Matrix<float> q = rng.normal<float>(lq, d_q), k = rng.normal<float>(lk, d_k), v = rng.normal<float>(lk, dv);
  const Matrix<float> w = rng.normal<float>(d_q, d_k, 0.3), d_out = rng.normal<float>(lq, dv);
  GradientCase c;  // scale 1
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  // Q' = Q W in long double and in float; the engine's gradients of Q', then dQ = dQ' W^T and
  // dW = Q^T dQ', with the terms of each sum carried along.
  const RealMatrix q_w = q.cast<Real>() * w.cast<Real>(), w_abs = w.cast<Real>().cwiseAbs();
  const Matrix<float> q_w_float = q * w;
  const RealGradients ref = reference_gradients(q_w, k, v, d_out, visible, c);
  const Gradients<float> base = baseline_gradients<float>(q_w_float, k, v, d_out, visible, c);
  const RealMatrix dq_ref = ref.dq * w.cast<Real>().transpose(), dw_ref = q.cast<Real>().transpose() * ref.dq;
  const RealMatrix dq_terms = ref.dq_terms * w_abs.transpose() + ref.dq.cwiseAbs() * w_abs.transpose();
  const RealMatrix dw_terms = q.cast<Real>().cwiseAbs().transpose() * (ref.dq_terms + ref.dq.cwiseAbs());
  const Matrix<float> dq_base = base.dq * w.transpose(), dw_base = q.transpose() * base.dq;
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    Matrix<float> out(lq, dv);
    Vector<float> lse(lq);
    bilinear_attention_into(q, k, v, w, out, Causal(Alignment::BottomRight), options, lse);
    const BilinearGradients<float> g =
        bilinear_attention_backward(q, k, v, w, out, lse, d_out, Causal(Alignment::BottomRight), options);
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dq, dq_ref, dq_base, dq_terms, ref.max_abs_lse)) << "dq";
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dk, ref.dk, base.dk, ref.dk_terms, ref.max_abs_lse)) << "dk";
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dv, ref.dv, base.dv, ref.dv_terms, ref.max_abs_lse)) << "dv";
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dw, dw_ref, dw_base, dw_terms, ref.max_abs_lse)) << "dw";
  }
}

/// x / max(||x||, 1e-12) per row, and the chain rule back through it, dx = (dy - y <y, dy>) / n
/// (dy / 1e-12 below the floor), with the terms of each entry (|dy| + |y| sum |y||dy|) / n.
template <class S>
struct UnitRows {
  Matrix<S> y;
  Vector<S> norm;
  template <class X>
  explicit UnitRows(const X& x) : y(x.rows(), x.cols()), norm(x.rows()) {
    for (Index i = 0; i < x.rows(); ++i) {
      norm(i) = std::max(S(x.row(i).norm()), S(1e-12));
      y.row(i) = x.row(i) / norm(i);
    }
  }
  Matrix<S> back(const Matrix<S>& dy) const {
    Matrix<S> dx(dy.rows(), dy.cols());
    for (Index i = 0; i < dy.rows(); ++i)
      dx.row(i) = norm(i) > S(1e-12) ? Matrix<S>((dy.row(i) - y.row(i) * y.row(i).dot(dy.row(i))) / norm(i))
                                     : Matrix<S>(dy.row(i) / S(1e-12));
    return dx;
  }
  Matrix<S> back_terms(const Matrix<S>& dy_terms) const {
    Matrix<S> t(dy_terms.rows(), dy_terms.cols());
    for (Index i = 0; i < dy_terms.rows(); ++i)
      t.row(i) = (dy_terms.row(i) + y.row(i).cwiseAbs() * y.row(i).cwiseAbs().dot(dy_terms.row(i))) / norm(i);
    return t;
  }
};

TEST(BackwardVariantsTest, CosineInFloatMatchesTheReferenceThroughTheNormalization) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 30, lk = 45, dk = 12, dv = 8;
  const double temperature = 0.2;
  const Matrix<float> q = rng.normal<float>(lq, dk), k = rng.normal<float>(lk, dk), v = rng.normal<float>(lk, dv);
  const Matrix<float> d_out = rng.normal<float>(lq, dv);
  GradientCase c;
  c.scale = Real(float(1 / temperature));  // the scale the library uses
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::TopLeft);
  const UnitRows<Real> q_unit(q.cast<Real>()), k_unit(k.cast<Real>());
  const UnitRows<float> q_unit_f(q), k_unit_f(k);
  const RealGradients ref = reference_gradients(q_unit.y, k_unit.y, v, d_out, visible, c);
  const Gradients<float> base = baseline_gradients<float>(q_unit_f.y, k_unit_f.y, v, d_out, visible, c);
  const RealMatrix dq_ref = q_unit.back(ref.dq), dk_ref = k_unit.back(ref.dk);
  const RealMatrix dq_terms = q_unit.back_terms(ref.dq_terms), dk_terms = k_unit.back_terms(ref.dk_terms);
  const Matrix<float> dq_base = q_unit_f.back(base.dq), dk_base = k_unit_f.back(base.dk);
  Eigen::Matrix<Real, 1, 1> dt_ref, dt_terms;
  Eigen::Matrix<float, 1, 1> dt_base;
  dt_ref(0, 0) = -(q_unit.y.cwiseProduct(ref.dq)).sum() / Real(temperature);
  dt_terms(0, 0) = (q_unit.y.cwiseAbs().cwiseProduct(ref.dq_terms)).sum() / Real(temperature);
  dt_base(0, 0) = -(q_unit_f.y.cwiseProduct(base.dq)).sum() / float(temperature);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    Matrix<float> out(lq, dv);
    Vector<float> lse(lq);
    cosine_attention_into(q, k, v, temperature, out, Causal(), options, lse);
    const CosineGradients<float> g =
        cosine_attention_backward(q, k, v, temperature, out, lse, d_out, Causal(), options);
    Eigen::Matrix<float, 1, 1> dt;
    dt(0, 0) = g.d_temperature;
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dq, dq_ref, dq_base, dq_terms, ref.max_abs_lse)) << "dq";
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dk, dk_ref, dk_base, dk_terms, ref.max_abs_lse)) << "dk";
    EXPECT_TRUE(gradient_within_tolerance<float>(g.dv, ref.dv, base.dv, ref.dv_terms, ref.max_abs_lse)) << "dv";
    EXPECT_TRUE(gradient_within_tolerance<float>(dt, dt_ref, dt_base, dt_terms, ref.max_abs_lse)) << "d_temperature";
  }
}

TEST(BackwardVariantsTest, BadArgumentsThrowWithTheirValues) {
  const M q = M::Ones(3, 4), k = M::Ones(5, 4), v = M::Ones(5, 2), out = M::Zero(3, 2), d_out = M::Ones(3, 2);
  const V lse = V::Zero(3);
  EXPECT_THROW(bilinear_attention_backward(q, k, v, M::Ones(3, 4), out, lse, d_out), attend::invalid_argument);
  EXPECT_THROW(cosine_attention_backward(q, k, v, 0.0, out, lse, d_out), attend::invalid_argument);
  EXPECT_THROW(soft_capped_attention_backward(q, k, v, -1.0, out, lse, d_out), attend::invalid_argument);
  EXPECT_THROW(top_k_attention_backward(q, k, v, 0, out, lse, d_out), attend::invalid_argument);
  M dq(3, 8), dk(5, 8), dv(5, 4);
  try {
    multi_head_attention_backward_into(M::Ones(3, 8), M::Ones(5, 8), M::Ones(5, 4), 2, M::Zero(3, 4), M::Zero(3, 3),
                                       M::Ones(3, 4), dq, dk, dv);
    FAIL() << "no throw";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("(3 x 3) must be (3 x 2)"), std::string::npos) << e.what();
  }
}

}  // namespace
