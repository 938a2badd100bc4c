// SPDX-License-Identifier: MIT
// bf16 and half inputs through the forward entry points, against the long-double reference on
// the same rounded inputs with FlashAttention's rule (support/low_precision.hpp): lengths around
// the tile sizes, Lq != Lk, odd head dimensions, every mask kind, fully masked rows, strided
// views, both paths; the log-sum-exp within 1e-5 relative; long rows that break 16-bit
// accumulators; bitwise thread and layout invariance.
#include "support/low_precision.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"

#include <attend/attend.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class S>
class PrecisionTest : public ::testing::Test {};
using ReducedScalars = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(PrecisionTest, ReducedScalars);

/// A normal matrix rounded to S.
template <class S>
Matrix<S> draw(Rng& rng, Index rows, Index cols, double amplitude = 1) {
  return rng.normal<float>(rows, cols, amplitude).template cast<S>();
}

/// The S matrix exactly, in long double.
template <class S>
RealMatrix widen(const Matrix<S>& x) {
  return x.template cast<float>().template cast<Real>();
}

/// Paths: materialized; blocked with the default tiles; blocked with small tiles, odd and even.
std::vector<AttentionOptions> paths() {
  AttentionOptions materialized, blocked, small_even, small_odd;
  materialized.algorithm = Algorithm::Materialized;
  blocked.algorithm = small_even.algorithm = small_odd.algorithm = Algorithm::Blocked;
  small_even.block_q = 16;
  small_even.block_k = 32;
  small_odd.block_q = 7;
  small_odd.block_k = 9;
  return {materialized, blocked, small_even, small_odd};
}

TYPED_TEST(PrecisionTest, ScaledDotProductGridMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<Index> lengths{1, 15, 16, 17, 63, 64, 65, 255, 256, 257};
  const std::vector<Index> dims{1, 17, 64, 128};
  const std::vector<MaskSpec> specs = all_mask_specs();
  const std::vector<AttentionOptions> options = paths();
  for (std::size_t n = 0; n < 24; ++n) {
    const Index lq = rng.pick(lengths), lk = rng.pick(lengths), d = dims[n % dims.size()], dv = dims[(n + 1) % 4];
    const Matrix<S> q = draw<S>(rng, lq, d), k = draw<S>(rng, lk, d), v = draw<S>(rng, lk, dv);
    const float scale = 1.0f / std::sqrt(float(d));
    with_mask<float>(specs[n % specs.size()], lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
      const Reference ref = reference_attention(widen(q), widen(k), widen(v), Real(scale), c.visible, c.bias);
      const Matrix<float> naive = naive_low_precision_attention<S>(q, k, v, scale, c.visible, c.bias);
      for (const AttentionOptions& o : options) {
        SCOPED_TRACE("Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " d=" + std::to_string(d) + " " +
                     c.description + " block " + std::to_string(o.block_q) + "x" + std::to_string(o.block_k));
        Matrix<S> out(lq, dv);
        Vector<float> lse(lq);
        scaled_dot_product_attention_into(q, k, v, out, mask, o, lse);
        EXPECT_TRUE(within_low_precision_rule(out, ref.output, naive));
        for (Index i = 0; i < lq; ++i) {
          if (std::isinf(ref.lse(i))) {
            EXPECT_EQ(lse(i), -std::numeric_limits<float>::infinity());
          } else {
            EXPECT_LE(std::fabs(Real(lse(i)) - ref.lse(i)), 1e-5L * std::max(Real(1), std::fabs(ref.lse(i))));
          }
        }
        // The float output holds the same values before their rounding to S.
        Matrix<float> out_float(lq, dv);
        scaled_dot_product_attention_into(q, k, v, out_float, mask, o);
        EXPECT_TRUE(out_float.template cast<S>() == out);
      }
    });
  }
}

TYPED_TEST(PrecisionTest, StridedViewsAndThreadCountsGiveTheSameBits) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 130, lk = 300, d = 40;
  const Matrix<S> wide_q = draw<S>(rng, lq, 3 * d), wide_kv = draw<S>(rng, lk, 4 * d);
  const Matrix<S> q = wide_q.middleCols(d, d), k = wide_kv.leftCols(d), v = wide_kv.rightCols(d);
  AttentionOptions one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  const Matrix<S> contiguous = scaled_dot_product_attention(q, k, v, Causal(), one);
  EXPECT_TRUE(scaled_dot_product_attention(wide_q.middleCols(d, d), wide_kv.leftCols(d), wide_kv.rightCols(d),
                                           Causal(), two) == contiguous);
  Matrix<S> wide_out = Matrix<S>::Zero(lq, 2 * d);
  scaled_dot_product_attention_into(q, k, v, wide_out.rightCols(d), Causal(), two);
  EXPECT_TRUE(wide_out.rightCols(d) == contiguous);
  const Matrix<S> batched_one = batched_attention(wide_q, wide_kv.leftCols(3 * d), wide_kv.rightCols(3 * d),
                                                  BatchLayout{3, 1}, Causal(), one);
  EXPECT_TRUE(batched_attention(wide_q, wide_kv.leftCols(3 * d), wide_kv.rightCols(3 * d), BatchLayout{3, 1},
                                Causal(), two) == batched_one);
  EXPECT_TRUE(batched_one.middleCols(d, d) == scaled_dot_product_attention(
                                                  wide_q.middleCols(d, d), wide_kv.middleCols(d, d),
                                                  wide_kv.middleCols(4 * d - 2 * d, d), Causal(), one));
}

TYPED_TEST(PrecisionTest, UniformAttentionOverLongRowsSumsToOne) {
  using S = TypeParam;
  // 65536 keys of V = 1 under equal scores: a 16-bit accumulator stops growing at 256 (bf16) or
  // 2048 (half) and returns a fraction of 1.
  const Index lk = 65536, d = 8;
  const Matrix<S> q = Matrix<S>::Zero(2, d), k = Matrix<float>::Ones(lk, d).template cast<S>();
  const Matrix<S> v = Matrix<float>::Ones(lk, 4).template cast<S>();
  AttentionOptions blocked, materialized;
  blocked.algorithm = Algorithm::Blocked;
  materialized.algorithm = Algorithm::Materialized;
  for (const AttentionOptions& o : {blocked, materialized}) {
    Matrix<float> out(2, 4);
    Vector<float> lse(2);
    scaled_dot_product_attention_into(q, k, v, out, NoMask{}, o, lse);
    EXPECT_LE((out.array() - 1).abs().maxCoeff(), 1e-3);
    EXPECT_NEAR(lse(0), std::log(float(lk)), 1e-5 * std::log(float(lk)));
  }
}

TYPED_TEST(PrecisionTest, LongRowOfUniformValuesMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 3, lk = 32768, d = 16;
  const Matrix<S> q = draw<S>(rng, lq, d), k = draw<S>(rng, lk, d);
  const Matrix<S> v = ((Matrix<float>::Random(lk, 8).array() + 1) / 2).matrix().template cast<S>();  // U(0, 1)
  const float scale = 0.25f;
  const BoolMatrix visible = all_visible(lq, lk);
  const Reference ref = reference_attention(widen(q), widen(k), widen(v), Real(scale), visible);
  const Matrix<float> naive = naive_low_precision_attention<S>(q, k, v, scale, visible);
  AttentionOptions o;
  o.scale = scale;
  o.algorithm = Algorithm::Blocked;
  EXPECT_TRUE(within_low_precision_rule(scaled_dot_product_attention(q, k, v, NoMask{}, o), ref.output, naive));
}

TYPED_TEST(PrecisionTest, EveryVariantMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 70, lk = 90, d = 24, heads = 4;
  const Matrix<S> q = draw<S>(rng, lq, d), k = draw<S>(rng, lk, d), v = draw<S>(rng, lk, d);
  const RealMatrix qr = widen(q), kr = widen(k), vr = widen(v);
  const BoolMatrix all = all_visible(lq, lk), causal = causal_visibility(lq, lk, Alignment::TopLeft);
  {
    SCOPED_TRACE("dot product, scale 1");
    const Reference ref = reference_attention(qr, kr, vr, 1, causal);
    EXPECT_TRUE(within_low_precision_rule(dot_product_attention(q, k, v, Causal()), ref.output,
                                          naive_low_precision_attention<S>(q, k, v, 1.0f, causal)));
  }
  {
    SCOPED_TRACE("bilinear: Q W rounded to S, then dot product");
    const Matrix<S> w = draw<S>(rng, d, d, 0.3);
    const Matrix<S> q_w = (q.template cast<float>() * w.template cast<float>()).template cast<S>();
    const Reference ref = reference_attention(widen(q_w), kr, vr, 1, all);
    EXPECT_TRUE(within_low_precision_rule(bilinear_attention(q, k, v, w), ref.output,
                                          naive_low_precision_attention<S>(q_w, k, v, 1.0f, all)));
  }
  {
    SCOPED_TRACE("cosine: unit rows in float, rounded to S");
    const auto unit = [](const Matrix<S>& x) {
      Matrix<float> u = x.template cast<float>();
      for (Index i = 0; i < u.rows(); ++i) u.row(i) /= std::max(u.row(i).norm(), 1e-12f);
      return Matrix<S>(u.template cast<S>());
    };
    const Matrix<S> qu = unit(q), ku = unit(k);
    const Reference ref = reference_attention(widen(qu), widen(ku), vr, 1 / Real(0.1f), all);
    EXPECT_TRUE(within_low_precision_rule(cosine_attention(q, k, v, 0.1), ref.output,
                                          naive_low_precision_attention<S>(qu, ku, v, 10.0f, all)));
  }
  {
    SCOPED_TRACE("local window");
    const BoolMatrix window = window_visibility(lq, lk, 5, 2, Alignment::TopLeft);
    const float scale = 1 / std::sqrt(float(d));
    const Reference ref = reference_attention(qr, kr, vr, Real(scale), window);
    EXPECT_TRUE(within_low_precision_rule(local_window_attention(q, k, v, Window(5, 2)), ref.output,
                                          naive_low_precision_attention<S>(q, k, v, scale, window)));
  }
  {
    SCOPED_TRACE("top-k keeps k keys of every row");
    const Matrix<S> out = top_k_attention(q, k, v, 4);
    const Matrix<float> full = top_k_attention(q.template cast<float>(), k.template cast<float>(),
                                               v.template cast<float>(), 4);
    EXPECT_TRUE(out == full.template cast<S>());  // computed on float copies, rounded once
  }
  {
    SCOPED_TRACE("multi-head with GQA: heads are views");
    const Matrix<S> mq = draw<S>(rng, lq, heads * d), mk = draw<S>(rng, lk, 2 * d), mv = draw<S>(rng, lk, 2 * d);
    const Matrix<S> out = multi_head_attention(mq, mk, mv, heads, Causal());
    const float scale = 1 / std::sqrt(float(d));
    for (Index h = 0; h < heads; ++h) {
      const Index g = h / 2;
      const Matrix<S> qh = mq.middleCols(h * d, d), kh = mk.middleCols(g * d, d), vh = mv.middleCols(g * d, d);
      const Reference ref = reference_attention(widen(qh), widen(kh), widen(vh), Real(scale), causal);
      EXPECT_TRUE(within_low_precision_rule(Matrix<S>(out.middleCols(h * d, d)), ref.output,
                                            naive_low_precision_attention<S>(qh, kh, vh, scale, causal)))
          << "head " << h;
    }
  }
  {
    SCOPED_TRACE("with_weights: float weights and log-sum-exp");
    const float scale = 1 / std::sqrt(float(d));
    const Reference ref = reference_attention(qr, kr, vr, Real(scale), causal);
    const AttentionResult<S> r = scaled_dot_product_attention_with_weights(q, k, v, Causal());
    static_assert(std::is_same_v<decltype(r.weights), Matrix<float>>);
    EXPECT_LE(max_abs_error(r.weights, ref.weights), 1e-6);
    EXPECT_TRUE(within_low_precision_rule(r.output, ref.output, naive_low_precision_attention<S>(q, k, v, scale, causal)));
  }
}

TYPED_TEST(PrecisionTest, DecodeStepWritesAFloatLogSumExp) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 24, lk = 700;
  const Matrix<S> q = draw<S>(rng, 1, heads * d), k = draw<S>(rng, lk, kv_heads * d), v = draw<S>(rng, lk, kv_heads * d);
  Matrix<S> out(1, heads * d);
  Vector<float> lse(heads);  // float, as every log-sum-exp of reduced inputs
  decode_attention_into(q, k, v, heads, out, NoMask{}, {}, lse);
  const float scale = 1 / std::sqrt(float(d));
  for (Index h = 0; h < heads; ++h) {
    const Index g = h / (heads / kv_heads);
    const Matrix<S> qh = q.middleCols(h * d, d), kh = k.middleCols(g * d, d), vh = v.middleCols(g * d, d);
    const BoolMatrix all = all_visible(1, lk);
    const Reference ref = reference_attention(widen(qh), widen(kh), widen(vh), Real(scale), all);
    EXPECT_LE(std::fabs(Real(lse(h)) - ref.lse(0)), 1e-5L * std::max(Real(1), std::fabs(ref.lse(0)))) << "head " << h;
    EXPECT_TRUE(within_low_precision_rule(Matrix<S>(out.middleCols(h * d, d)), ref.output,
                                          naive_low_precision_attention<S>(qh, kh, vh, scale, all)))
        << "head " << h;
  }
}

TYPED_TEST(PrecisionTest, NaNPropagatesAndEmptyRowsAreZero) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  Matrix<S> q = draw<S>(rng, 20, 16), k = draw<S>(rng, 30, 16), v = draw<S>(rng, 30, 8);
  q(3, 2) = S(std::numeric_limits<float>::quiet_NaN());
  BoolMatrix visible = BoolMatrix::Constant(20, 30, true);
  visible.row(5).setConstant(false);
  for (const AttentionOptions& o : paths()) {
    Matrix<S> out(20, 8);
    Vector<float> lse(20);
    scaled_dot_product_attention_into(q, k, v, out, BooleanMask(visible), o, lse);
    EXPECT_TRUE(out.row(3).template cast<float>().array().isNaN().all());
    EXPECT_TRUE(std::isnan(lse(3)));
    EXPECT_TRUE(out.row(5).template cast<float>().isZero(0));
    EXPECT_EQ(lse(5), -std::numeric_limits<float>::infinity());
  }
}

}  // namespace
