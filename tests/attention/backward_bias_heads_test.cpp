// SPDX-License-Identifier: MIT
// Gradients of per-head score biases in multi-head backward calls (attention/backward.hpp,
// BiasGradients): a T5 table of one column per head (num_buckets, H), an AdditiveMask stacked per
// head (H Lq, Lk), and a table or mask every head shares (summed over the heads), with GQA, on
// both paths: finite differences in double, the long-double reference in float, bitwise thread
// invariance, empty problems, the layer's backward, and the refusal behind a score modifier.
#include "support/attention_case.hpp"
#include "support/finite_differences.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"

#include <attend/attention/backward.hpp>
#include <attend/attention/multi_head_training.hpp>
#include <attend/custom.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

using M = Matrix<double>;
using V = Vector<double>;

constexpr Index kHeads = 4, kBuckets = 8, kMaxDistance = 6;

std::vector<AttentionOptions> fd_paths() { return {materialized_path(), blocked_path(4, 5)}; }

struct HeadsProblem {
  M q, k, v, d_out;
};

HeadsProblem draw(Rng& rng, Index kv_heads, Index lq = 6, Index lk = 9, Index d = 3, Index dv = 2) {
  return {rng.normal<double>(lq, kHeads * d), rng.normal<double>(lk, kv_heads * d),
          rng.normal<double>(lk, kv_heads * dv), rng.normal<double>(lq, kHeads * dv)};
}

TEST(BackwardBiasHeadsTest, PerHeadTableAndStackedMaskMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index kv_heads : {Index(4), Index(2), Index(1)}) {
    HeadsProblem p = draw(rng, kv_heads);
    const Index lq = p.q.rows(), lk = p.k.rows();
    M stacked = rng.normal<double>(kHeads * lq, lk, 2.0);  // (H Lq, Lk)
    stacked(1 * lq + 2, 3) = -std::numeric_limits<double>::infinity();
    M table = rng.normal<double>(kBuckets, kHeads, 2.0);  // (num_buckets, H)
    const RelativePositionBuckets buckets{kBuckets, true, kMaxDistance, Alignment::BottomRight};
    for (const AttentionOptions& options : fd_paths()) {
      SCOPED_TRACE("H_kv=" + std::to_string(kv_heads) + " " + describe(options));
      const auto mask = AdditiveMask(stacked) & Causal(Alignment::BottomRight) & Alibi::for_heads(kHeads) &
                        RelativePositionBias(table, true, kMaxDistance, Alignment::BottomRight);
      const auto loss = [&] { return inner(p.d_out, multi_head_attention(p.q, p.k, p.v, kHeads, mask, options)); };
      const MultiHeadLseResult<double> f = multi_head_attention_with_lse(p.q, p.k, p.v, kHeads, mask, options);
      M d_stacked, d_tables, d_shared_bias;
      V d_shared_table;
      BiasGradients<double> request;
      request.d_bias_per_head = &d_stacked;
      request.d_table_per_head = &d_tables;
      request.d_bias = &d_shared_bias;
      request.d_table = &d_shared_table;
      request.table_buckets = buckets;
      const AttentionGradients<double> g =
          multi_head_attention_backward(p.q, p.k, p.v, kHeads, f, p.d_out, mask, options, request);
      EXPECT_EQ(d_stacked(1 * lq + 2, 3), 0.0) << "a hidden key has no gradient";
      expect_matches_finite_differences(loss, stacked, d_stacked, "d_bias_per_head");
      expect_matches_finite_differences(loss, table, d_tables, "d_table_per_head");
      expect_matches_finite_differences(loss, p.q, g.dq, "dq");
      expect_matches_finite_differences(loss, p.k, g.dk, "dk");
      // The shared forms are the per-head ones summed over the heads, in head order.
      M bias_sum = M::Zero(lq, lk);
      V table_sum = V::Zero(kBuckets);
      for (Index h = 0; h < kHeads; ++h) {
        bias_sum += d_stacked.middleRows(h * lq, lq);
        table_sum += d_tables.col(h);
      }
      EXPECT_TRUE(d_shared_bias == bias_sum);
      EXPECT_TRUE(d_shared_table == table_sum);
    }
  }
}

TEST(BackwardBiasHeadsTest, SharedTableAndMaskMatchFiniteDifferences) {
  ATTEND_SEEDED_RNG(rng);
  HeadsProblem p = draw(rng, 2);
  M bias = rng.normal<double>(p.q.rows(), p.k.rows(), 2.0);  // (Lq, Lk), every head's
  V table = rng.normal<double>(kBuckets, 1, 2.0);            // one table, every head's
  const RelativePositionBuckets buckets{kBuckets, false, kMaxDistance, Alignment::TopLeft};
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(describe(options));
    const auto mask = AdditiveMask(bias) & RelativePositionBias(table, false, kMaxDistance) & Causal();
    const auto loss = [&] { return inner(p.d_out, multi_head_attention(p.q, p.k, p.v, kHeads, mask, options)); };
    const MultiHeadLseResult<double> f = multi_head_attention_with_lse(p.q, p.k, p.v, kHeads, mask, options);
    M d_bias;
    V d_table;
    BiasGradients<double> request;
    request.d_bias = &d_bias;
    request.d_table = &d_table;
    request.table_buckets = buckets;
    multi_head_attention_backward(p.q, p.k, p.v, kHeads, f, p.d_out, mask, options, request);
    expect_matches_finite_differences(loss, bias, d_bias, "d_bias");
    expect_matches_finite_differences(loss, table, d_table, "d_table");
  }
}

TEST(BackwardBiasHeadsTest, FloatGradientsMatchTheReferenceHeadByHead) {
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 37, lk = 70, d = 16, dv = 8, kv_heads = 2, buckets = 32, max_distance = 16;
  const Matrix<float> q = rng.normal<float>(lq, kHeads * d), k = rng.normal<float>(lk, kv_heads * d),
                      v = rng.normal<float>(lk, kv_heads * dv), d_out = rng.normal<float>(lq, kHeads * dv);
  Matrix<float> stacked = rng.normal<float>(kHeads * lq, lk, 2.0);
  for (Index r = 0; r < kHeads * lq; ++r) stacked(r, (r * 7) % lk) = -std::numeric_limits<float>::infinity();
  const Matrix<float> table = rng.normal<float>(buckets, kHeads, 2.0);
  const auto mask = AdditiveMask(stacked) & RelativePositionBias(table, true, max_distance);
  // Per head: the reference and the naive baseline of that head's problem.
  std::vector<RealGradients> refs;
  std::vector<Gradients<float>> bases;
  Real max_abs_lse = 0;
  for (Index h = 0; h < kHeads; ++h) {
    const Index g = h / (kHeads / kv_heads);
    GradientCase c;
    c.scale = 1 / std::sqrt(Real(d));
    RealMatrix total(lq, lk);
    BoolMatrix visible(lq, lk);
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < lk; ++j) {
        const float b = stacked(h * lq + i, j);
        visible(i, j) = b != -std::numeric_limits<float>::infinity();
        total(i, j) = Real(b) + Real(table(relative_position_bucket(j - i, true, buckets, max_distance), h));
      }
    c.bias = total;
    const Matrix<float> qh = q.middleCols(h * d, d), kh = k.middleCols(g * d, d), vh = v.middleCols(g * dv, dv),
                        doh = d_out.middleCols(h * dv, dv);
    refs.push_back(reference_gradients(qh, kh, vh, doh, visible, c));
    bases.push_back(baseline_gradients<float>(qh, kh, vh, doh, visible, c));
    max_abs_lse = std::max(max_abs_lse, refs.back().max_abs_lse);
  }
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    const MultiHeadLseResult<float> f = multi_head_attention_with_lse(q, k, v, kHeads, mask, options);
    Matrix<float> d_stacked, d_tables, d_bias;
    Vector<float> d_table;
    BiasGradients<float> request;
    request.d_bias_per_head = &d_stacked;
    request.d_table_per_head = &d_tables;
    request.d_bias = &d_bias;
    request.d_table = &d_table;
    request.table_buckets = {buckets, true, max_distance, Alignment::TopLeft};
    multi_head_attention_backward(q, k, v, kHeads, f, d_out, mask, options, request);
    ASSERT_EQ(d_stacked.rows(), kHeads * lq);
    ASSERT_EQ(d_tables.cols(), kHeads);
    RealMatrix bias_ref = RealMatrix::Zero(lq, lk), bias_terms = RealMatrix::Constant(lq, lk, 1);
    Matrix<float> bias_base = Matrix<float>::Zero(lq, lk);
    RealVector table_ref_sum = RealVector::Zero(buckets), table_terms_sum = RealVector::Zero(buckets);
    Vector<float> table_base_sum = Vector<float>::Zero(buckets);
    for (Index h = 0; h < kHeads; ++h) {
      SCOPED_TRACE("head " + std::to_string(h));
      const RealGradients& ref = refs[std::size_t(h)];
      const Gradients<float>& base = bases[std::size_t(h)];
      // dS is summed from the terms of dP - D: p (|dp| + |D|), at most a few units here.
      EXPECT_TRUE(gradient_within_tolerance<float>(Matrix<float>(d_stacked.middleRows(h * lq, lq)), ref.ds, base.ds,
                                                   bias_terms, max_abs_lse))
          << "d_bias_per_head";
      RealVector table_ref = RealVector::Zero(buckets), table_terms = RealVector::Zero(buckets);
      Vector<float> table_base = Vector<float>::Zero(buckets);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
          const Index b = relative_position_bucket(j - i, true, buckets, max_distance);
          table_ref(b) += ref.ds(i, j);
          table_terms(b) += std::fabs(ref.ds(i, j)) + 1;
          table_base(b) += base.ds(i, j);
        }
      EXPECT_TRUE(gradient_within_tolerance<float>(Vector<float>(d_tables.col(h)), table_ref, table_base, table_terms,
                                                   max_abs_lse))
          << "d_table_per_head";
      bias_ref += ref.ds;
      bias_base += base.ds;
      bias_terms.array() += 1;
      table_ref_sum += table_ref;
      table_terms_sum += table_terms;
      table_base_sum += table_base;
    }
    EXPECT_TRUE(gradient_within_tolerance<float>(d_bias, bias_ref, bias_base, bias_terms, max_abs_lse)) << "d_bias";
    EXPECT_TRUE(gradient_within_tolerance<float>(d_table, table_ref_sum, table_base_sum, table_terms_sum, max_abs_lse))
        << "d_table";
  }
}

TEST(BackwardBiasHeadsTest, BiasGradientsDoNotDependOnTheThreadCount) {
  ATTEND_SEEDED_RNG(rng);
  const HeadsProblem p = draw(rng, 2, 33, 41, 5, 4);
  const M stacked = rng.normal<double>(kHeads * 33, 41), table = rng.normal<double>(kBuckets, kHeads);
  const auto mask = AdditiveMask(stacked) & RelativePositionBias(table, true, kMaxDistance) & Causal();
  M first_bias, first_table;
  for (const int threads : {1, 2, 3}) {
    AttentionOptions options = blocked_path(4, 5);
    options.num_threads = threads;
    const MultiHeadLseResult<double> f = multi_head_attention_with_lse(p.q, p.k, p.v, kHeads, mask, options);
    M d_stacked, d_tables;
    BiasGradients<double> request;
    request.d_bias_per_head = &d_stacked;
    request.d_table_per_head = &d_tables;
    request.table_buckets = {kBuckets, true, kMaxDistance, Alignment::TopLeft};
    multi_head_attention_backward(p.q, p.k, p.v, kHeads, f, p.d_out, mask, options, request);
    if (threads == 1) {
      first_bias = d_stacked;
      first_table = d_tables;
      EXPECT_FALSE(d_stacked.isZero(0));
    } else {
      EXPECT_TRUE(d_stacked == first_bias) << threads << " threads";
      EXPECT_TRUE(d_tables == first_table) << threads << " threads";
    }
  }
}

TEST(BackwardBiasHeadsTest, StridedViewsGiveTheContiguousBits) {
  ATTEND_SEEDED_RNG(rng);
  const HeadsProblem p = draw(rng, 2, 21, 30, 5, 4);
  const M stacked = rng.normal<double>(kHeads * 21, 30), table = rng.normal<double>(kBuckets, kHeads);
  // Every input and the mask's matrices as blocks of larger ones (outer strides, offsets).
  M q_big = rng.normal<double>(23, p.q.cols() + 3), k_big = rng.normal<double>(32, p.k.cols() + 1),
    v_big = rng.normal<double>(31, p.v.cols() + 2), stacked_big = rng.normal<double>(kHeads * 21 + 1, 33),
    table_big = rng.normal<double>(kBuckets + 2, kHeads + 1);
  q_big.block(1, 2, 21, p.q.cols()) = p.q;
  k_big.block(2, 1, 30, p.k.cols()) = p.k;
  v_big.block(1, 0, 30, p.v.cols()) = p.v;
  stacked_big.block(1, 3, kHeads * 21, 30) = stacked;
  table_big.block(2, 1, kBuckets, kHeads) = table;
  const auto q_view = q_big.block(1, 2, 21, p.q.cols());
  const auto k_view = k_big.block(2, 1, 30, p.k.cols());
  const auto v_view = v_big.block(1, 0, 30, p.v.cols());
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 5)}) {
    SCOPED_TRACE(describe(options));
    const auto gradients = [&](const auto& q, const auto& k, const auto& v, const auto& bias, const auto& t) {
      const auto mask = AdditiveMask(bias) & RelativePositionBias(t, true, kMaxDistance) & Causal();
      const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, kHeads, mask, options);
      std::pair<M, M> out;
      BiasGradients<double> request;
      request.d_bias_per_head = &out.first;
      request.d_table_per_head = &out.second;
      request.table_buckets = {kBuckets, true, kMaxDistance, Alignment::TopLeft};
      multi_head_attention_backward(q, k, v, kHeads, f, p.d_out, mask, options, request);
      return out;
    };
    const std::pair<M, M> contiguous = gradients(p.q, p.k, p.v, stacked, table);
    const std::pair<M, M> views = gradients(q_view, k_view, v_view, stacked_big.block(1, 3, kHeads * 21, 30),
                                            table_big.block(2, 1, kBuckets, kHeads));
    EXPECT_TRUE(views.first == contiguous.first) << "d_bias_per_head";
    EXPECT_TRUE(views.second == contiguous.second) << "d_table_per_head";
  }
}

TEST(BackwardBiasHeadsTest, NoQueriesOrNoKeysGiveZeroBiasGradientsOfTheirShapes) {
  for (const auto& [lq, lk] : {std::pair<Index, Index>{0, 5}, {4, 0}, {0, 0}}) {
    SCOPED_TRACE("Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk));
    const M q = M::Ones(lq, kHeads * 3), k = M::Ones(lk, 2 * 3), v = M::Ones(lk, 2 * 2),
            d_out = M::Ones(lq, kHeads * 2);
    const M stacked = M::Ones(kHeads * lq, lk), table = M::Ones(kBuckets, kHeads);
    const auto mask = AdditiveMask(stacked) & RelativePositionBias(table, true, kMaxDistance);
    for (const AttentionOptions& options : {materialized_path(), blocked_path()}) {
      const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, kHeads, mask, options);
      M d_stacked, d_tables, d_bias;
      V d_table;
      BiasGradients<double> request;
      request.d_bias_per_head = &d_stacked;
      request.d_table_per_head = &d_tables;
      request.d_bias = &d_bias;
      request.d_table = &d_table;
      request.table_buckets = {kBuckets, true, kMaxDistance, Alignment::TopLeft};
      const AttentionGradients<double> g =
          multi_head_attention_backward(q, k, v, kHeads, f, d_out, mask, options, request);
      EXPECT_TRUE(g.dq.isZero(0) && g.dk.isZero(0) && g.dv.isZero(0));
      EXPECT_EQ(d_stacked.rows(), kHeads * lq);
      EXPECT_EQ(d_stacked.cols(), lk);
      EXPECT_EQ(d_bias.rows(), lq);
      EXPECT_EQ(d_bias.cols(), lk);
      EXPECT_EQ(d_tables.rows(), kBuckets);
      EXPECT_EQ(d_tables.cols(), kHeads);
      EXPECT_EQ(d_table.size(), kBuckets);
      EXPECT_TRUE(d_tables.isZero(0) && d_table.isZero(0));
    }
  }
}

TEST(BackwardBiasHeadsTest, LayerBackwardGivesThePerHeadTableGradient) {
  ATTEND_SEEDED_RNG(rng);
  const Index e = 8, d = 2, lq = 5;
  MultiHeadWeights<double> w{rng.normal<double>(kHeads * d, e, 0.6),
                             rng.normal<double>(2 * d, e, 0.6),
                             rng.normal<double>(2 * d, e, 0.6),
                             rng.normal<double>(e, kHeads * d, 0.6),
                             V(),
                             V(),
                             V(),
                             V()};
  const MultiHeadAttention<double> layer(kHeads, w, 2);
  const M x = rng.normal<double>(lq, e), d_out = rng.normal<double>(lq, e);
  M table = rng.normal<double>(kBuckets, kHeads);
  for (const AttentionOptions& options : fd_paths()) {
    SCOPED_TRACE(describe(options));
    const auto mask = Causal() & RelativePositionBias(table, true, kMaxDistance);
    const auto loss = [&] { return inner(d_out, multi_head_layer_forward(layer, x, mask, options).output); };
    const MultiHeadTrainingForward<double> f = multi_head_layer_forward(layer, x, mask, options);
    M d_tables;
    BiasGradients<double> request;
    request.d_table_per_head = &d_tables;
    request.table_buckets = {kBuckets, true, kMaxDistance, Alignment::TopLeft};
    multi_head_layer_backward(layer, f.context, d_out, mask, options, request);
    expect_matches_finite_differences(loss, table, d_tables, "d_table_per_head");
  }
}

TEST(BackwardBiasHeadsTest, BiasGradientsBehindAScoreModifierAreRefused) {
  Rng rng(7);
  const HeadsProblem p = draw(rng, 2);
  const M bias = rng.normal<double>(p.q.rows(), p.k.rows());
  const auto mask = SoftCap(5) & AdditiveMask(bias);
  const MultiHeadLseResult<double> f = multi_head_attention_with_lse(p.q, p.k, p.v, kHeads, mask);
  M d_bias;
  BiasGradients<double> request;
  request.d_bias = &d_bias;
  EXPECT_THROW(multi_head_attention_backward(p.q, p.k, p.v, kHeads, f, p.d_out, mask, {}, request), invalid_argument);
  const M q = p.q.leftCols(3), k = p.k.leftCols(3), v = p.v.leftCols(2), d_out = p.d_out.leftCols(2);
  const AttentionResult<double> single = scaled_dot_product_attention_with_lse(q, k, v, mask);
  EXPECT_THROW(scaled_dot_product_attention_backward(q, k, v, single, d_out, mask, {}, request), invalid_argument);
  // Without a request, the same mask differentiates (through SoftCap's derivative).
  EXPECT_NO_THROW(multi_head_attention_backward(p.q, p.k, p.v, kHeads, f, p.d_out, mask));
}

}  // namespace
