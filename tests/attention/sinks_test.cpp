// SPDX-License-Identifier: MIT
// Learned attention sinks: on the materialized and blocked paths of every entry point (single
// head, multi-head with and without SequenceRows, batched, with weights), in a contiguous decode
// step (one token and chunks) and in the merge, against their formula evaluated in long double:
//   p_ij = e^(x_ij) / (e^(s_h) + sum_j' e^(x_ij')),  o_i = sum_j p_ij v_j,  lse_i = log(e^(s_h) + sum_j e^(x_ij)).
#include <attend/attention/batched.hpp>
#include <attend/attention/kv_cache.hpp>
#include <attend/attention/sinks.hpp>

#include "support/baseline.hpp"
#include "support/expect.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/sinks_reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace attend::test {
namespace {

using attend::test::expect_invalid;

/// Every head of out (Lq, H d) and lse (Lq, H) against the formula, with visibility `visible`
/// for every head; the baseline is the plain same-precision attention merged with its sink.
template <class T>
void expect_sinks_formula(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Index heads, const Vector<T>& sinks,
                          const BoolMatrix& visible, const Matrix<T>& out, const Matrix<T>& lse) {
  const Index d = q.cols() / heads, kv_heads = k.cols() / d, lq = q.rows(), lk = k.rows();
  const Real scale = 1 / std::sqrt(Real(d));
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const Matrix<T> qh = q.middleCols(h * d, d), kg = k.middleCols(g * d, d), vg = v.middleCols(g * d, d);
    RealMatrix expected = RealMatrix::Zero(lq, d);
    RealMatrix expected_lse(lq, 1);
    for (Index i = 0; i < lq; ++i) {
      Real denominator = std::exp(Real(sinks(h)));
      std::vector<Real> e(std::size_t(lk), 0);
      for (Index j = 0; j < lk; ++j) {
        if (!visible(i, j)) continue;
        Real dot = 0;
        for (Index c = 0; c < d; ++c) dot += Real(qh(i, c)) * Real(kg(j, c));
        e[std::size_t(j)] = std::exp(scale * dot);
        denominator += e[std::size_t(j)];
      }
      if (denominator > 0)  // else: no key and no sink, zeros (the library's defined result)
        for (Index j = 0; j < lk; ++j)
          for (Index c = 0; c < d; ++c) expected(i, c) += e[std::size_t(j)] / denominator * Real(vg(j, c));
      expected_lse(i, 0) = std::log(denominator);
    }
    Baseline<T> base = baseline_attention<T>(qh, kg, vg, T(scale), visible);
    Matrix<T> base_lse(lq, 1);
    for (Index i = 0; i < lq; ++i) {
      const T b = base.lse(i);
      if (b == -std::numeric_limits<T>::infinity()) {  // no key: zeros, and the sink's lse
        base_lse(i, 0) = sinks(h);
        continue;
      }
      base.output.row(i) *= T(1) / (T(1) + std::exp(sinks(h) - b));
      base_lse(i, 0) = std::max(b, sinks(h)) + std::log1p(std::exp(-std::abs(b - sinks(h))));
    }
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(out.middleCols(h * d, d)), expected, base.output));
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(lse.col(h)), expected_lse, base_lse));
  }
}

template <class T>
class SinksTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(SinksTest, Scalars);

// Both paths, grouped-query heads, a causal mask with a row that sees no key (it keeps a zero
// output and gets lse = s_h), sinks from far below to far above the scores, and one of -inf.
TYPED_TEST(SinksTest, BothPathsMatchTheFormula) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, lq = 40, lk = 70;
  const Matrix<T> q = rng.normal<T>(lq, heads * d), k = rng.normal<T>(lq + lk, kv_heads * d).bottomRows(lk),
                  v = rng.normal<T>(lk, kv_heads * d);
  Vector<T> sinks(heads);
  sinks << T(-30), T(0.25), T(6), -std::numeric_limits<T>::infinity();
  BoolMatrix visible = window_visibility(lq, lk, -1, 0, Alignment::BottomRight);
  visible.row(3).setConstant(false);
  for (const Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
    SCOPED_TRACE(algorithm == Algorithm::Blocked ? "blocked" : "materialized");
    AttentionOptions o;
    o.algorithm = algorithm;
    o.block_q = 16;
    o.block_k = 32;
    Matrix<T> out(lq, heads * d), lse(lq, heads);
    multi_head_attention_with_sinks_into(q, k, v, heads, out, BooleanMask(visible), sinks, o, lse);
    expect_sinks_formula<T>(q, k, v, heads, sinks, visible, out, lse);
    for (Index h = 0; h < heads; ++h) {
      EXPECT_EQ(Matrix<T>(out.block(3, h * d, 1, d)), Matrix<T>::Zero(1, d));
      EXPECT_EQ(lse(3, h), sinks(h));
    }
  }
}

// A contiguous cache decoded token by token and in chunks, with a sink per head, equals the
// formula over the whole sequence; with a window too.
TYPED_TEST(SinksTest, DecodingMatchesTheFormula) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 1, d = 8, len = 45;
  const Matrix<T> q = rng.normal<T>(len, heads * d), k = rng.normal<T>(len, kv_heads * d),
                  v = rng.normal<T>(len, kv_heads * d);
  const Vector<T> sinks = rng.normal<T>(heads, 1, 2.0);
  for (const Index window : {Index(-1), Index(7)})
    for (const Index chunk : {Index(1), Index(6)}) {
      SCOPED_TRACE("window " + std::to_string(window) + ", chunk " + std::to_string(chunk));
      KVCache<T> cache(len, kv_heads, d, {window});
      AttentionOptions o;
      o.block_k = 8;  // several splits, merged before the sink
      Matrix<T> out(len, heads * d);
      for (Index t = 0; t < len; t += chunk) {
        const Index n = std::min(chunk, len - t);
        decode_step_into(cache, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), heads,
                         out.middleRows(t, n), NoMask{}, o, sinks);
      }
      // The log-sum-exps of the whole sequence, for the formula's check of the outputs.
      Matrix<T> full(len, heads * d), lse(len, heads);
      const BoolMatrix visible = window_visibility(len, len, window < 0 ? -1 : window - 1, 0, Alignment::TopLeft);
      multi_head_attention_with_sinks_into(q, k, v, heads, full, BooleanMask(visible), sinks, {}, lse);
      expect_sinks_formula<T>(q, k, v, heads, sinks, visible, out, lse);
    }
}

/// Head h of out (Lq, H d_v) (and of lse (Lq, H) unless empty) against sink_attention, each
/// query head reading kv head h / (H / H_kv), visibility `visible`.
template <class T>
void expect_heads_with_sinks(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Index heads,
                             const Vector<T>& sinks, const BoolMatrix& visible, const Matrix<T>& out,
                             const Matrix<T>& lse = Matrix<T>()) {
  const Index d = q.cols() / heads, kv_heads = k.cols() / d, dv = v.cols() / kv_heads;
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const SinkExpected<T> e = sink_attention<T>(Matrix<T>(q.middleCols(h * d, d)), Matrix<T>(k.middleCols(g * d, d)),
                                                Matrix<T>(v.middleCols(g * dv, dv)), 1 / std::sqrt(Real(d)),
                                                Real(sinks(h)), visible);
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(out.middleCols(h * dv, dv)), e.output, e.base_output));
    if (lse.size() != 0) {
      EXPECT_TRUE(within_tolerance<T>(Matrix<T>(lse.col(h)), e.lse, e.base_lse));
    }
  }
}

// Every entry point of projected inputs takes sinks after its options (and after its lse), on
// both paths: multi_head_attention(_into), the varlen form with SequenceRows, batched_attention
// (_into), and the single-head calls with one logit; a row that sees no key keeps zeros and gets
// lse = s_h.
TYPED_TEST(SinksTest, EveryEntryPointTakesThemOnBothPaths) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, lq = 40, lk = 70;
  const Matrix<T> q = rng.normal<T>(lq, heads * d), k = rng.normal<T>(lk, kv_heads * d),
                  v = rng.normal<T>(lk, kv_heads * d);
  Vector<T> sinks(heads);
  sinks << T(-30), T(0.25), T(6), -std::numeric_limits<T>::infinity();
  BoolMatrix visible = window_visibility(lq, lk, -1, 0, Alignment::BottomRight);
  visible.row(3).setConstant(false);
  for (const Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
    SCOPED_TRACE(algorithm == Algorithm::Blocked ? "blocked" : "materialized");
    AttentionOptions o;
    o.algorithm = algorithm;
    o.block_q = 16;
    o.block_k = 32;
    {
      SCOPED_TRACE("multi_head_attention_into");
      Matrix<T> out(lq, heads * d), lse(lq, heads);
      multi_head_attention_into(q, k, v, heads, out, BooleanMask(visible), o, lse, sinks);
      expect_heads_with_sinks<T>(q, k, v, heads, sinks, visible, out, lse);
      EXPECT_TRUE(identical(multi_head_attention(q, k, v, heads, BooleanMask(visible), o, sinks), out));
      Matrix<T> old(lq, heads * d), old_lse(lq, heads);  // the older spelling: the same call
      multi_head_attention_with_sinks_into(q, k, v, heads, old, BooleanMask(visible), sinks, o, old_lse);
      EXPECT_TRUE(identical(old, out));
      EXPECT_TRUE(identical(old_lse, lse));
      for (Index h = 0; h < heads; ++h) {
        EXPECT_TRUE(Matrix<T>(out.block(3, h * d, 1, d)).isZero(0));
        EXPECT_EQ(lse(3, h), sinks(h));
      }
    }
    {
      SCOPED_TRACE("varlen: two packed sequences");
      const std::vector<Index> q_offsets{0, 15, lq}, k_offsets{0, 30, lk};
      Matrix<T> out(lq, heads * d), lse(lq, heads);
      multi_head_attention_into(q, k, v, heads, SequenceRows::packed(q_offsets), SequenceRows::packed(k_offsets), out,
                                Causal(Alignment::BottomRight), o, lse, sinks);
      for (std::size_t b = 0; b < 2; ++b) {
        const Index q0 = q_offsets[b], n = q_offsets[b + 1] - q0, k0 = k_offsets[b], m = k_offsets[b + 1] - k0;
        expect_heads_with_sinks<T>(q.middleRows(q0, n), k.middleRows(k0, m), v.middleRows(k0, m), heads, sinks,
                                   causal_visibility(n, m, Alignment::BottomRight), out.middleRows(q0, n),
                                   lse.middleRows(q0, n));
      }
    }
    {
      SCOPED_TRACE("single head");
      for (Index h = 0; h < heads; ++h) {
        const Index g = h / (heads / kv_heads);
        const Matrix<T> qh = q.middleCols(h * d, d), kg = k.middleCols(g * d, d), vg = v.middleCols(g * d, d);
        const AttentionResult<T> r =
            scaled_dot_product_attention_with_lse(qh, kg, vg, BooleanMask(visible), o, sinks.segment(h, 1));
        expect_heads_with_sinks<T>(qh, kg, vg, 1, sinks.segment(h, 1), visible, r.output, Matrix<T>(r.lse));
        EXPECT_TRUE(identical(scaled_dot_product_attention(qh, kg, vg, BooleanMask(visible), o, sinks.segment(h, 1)),
                              r.output));
        Matrix<T> out(lq, d);
        Vector<T> lse(lq);
        scaled_dot_product_attention_into(qh, kg, vg, out, BooleanMask(visible), o, lse, sinks.segment(h, 1));
        EXPECT_TRUE(identical(out, r.output));
        EXPECT_TRUE(identical(lse, r.lse));
      }
    }
    {
      SCOPED_TRACE("batched: B = 2, H = 4");
      const Index batch = 2, lkb = 35, lqb = 20;
      const Matrix<T> qb = rng.normal<T>(batch * lqb, heads * d), kb = rng.normal<T>(batch * lkb, heads * d),
                      vb = rng.normal<T>(batch * lkb, heads * d);
      const Matrix<T> out = batched_attention(qb, kb, vb, BatchLayout{heads, batch}, Causal(Alignment::BottomRight), o,
                                              sinks);
      for (Index b = 0; b < batch; ++b)
        expect_heads_with_sinks<T>(qb.middleRows(b * lqb, lqb), kb.middleRows(b * lkb, lkb),
                                   vb.middleRows(b * lkb, lkb), heads, sinks,
                                   causal_visibility(lqb, lkb, Alignment::BottomRight), out.middleRows(b * lqb, lqb));
      Matrix<T> into(batch * lqb, heads * d);
      batched_attention_into(qb, kb, vb, into, BatchLayout{heads, batch}, Causal(Alignment::BottomRight), o, sinks);
      EXPECT_TRUE(identical(into, out));
    }
  }
}

// With sinks as without, the bits do not depend on the thread count (per head and per query
// tile, each merge is computed the same way on any thread).
TEST(Sinks, ResultsDoNotDependOnTheThreadCount) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, d = 16, lq = 70, lk = 90;
  const Matrix<float> q = rng.normal<float>(2 * lq, heads * d), k = rng.normal<float>(2 * lk, heads * d),
                      v = rng.normal<float>(2 * lk, heads * d);
  const Vector<float> sinks = rng.normal<float>(heads, 1, 2.0);
  for (const Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
    const auto run = [&](int threads) {
      AttentionOptions o;
      o.algorithm = algorithm;
      o.block_q = 16;
      o.block_k = 32;
      o.num_threads = threads;
      return std::make_pair(batched_attention(q, k, v, BatchLayout{heads, 2}, Causal(Alignment::BottomRight), o, sinks),
                            multi_head_attention(q, k, v, heads, Causal(), o, sinks));
    };
    const auto one = run(1);
    for (const int threads : {2, 3}) {
      const auto many = run(threads);
      EXPECT_TRUE(identical(many.first, one.first)) << threads << " threads";
      EXPECT_TRUE(identical(many.second, one.second)) << threads << " threads";
    }
  }
}

// The weights a call returns with a sink are e^(x_ij - lse_i), lse_i with the sink's term: each
// row sums to 1 - e^(s - lse_i) < 1, the rest going to the sink.
TYPED_TEST(SinksTest, WeightsSumToLessThanOne) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index d = 8, lq = 12, lk = 20;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, d);
  BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  visible.row(0).setConstant(false);
  for (const T sink : {T(-2), T(1.5), -std::numeric_limits<T>::infinity()}) {
    SCOPED_TRACE("sink " + std::to_string(double(sink)));
    const Vector<T> one = Vector<T>::Constant(1, sink);
    const AttentionResult<T> r = scaled_dot_product_attention_with_weights(q, k, v, BooleanMask(visible), {}, one);
    const SinkExpected<T> e = sink_attention<T>(q, k, v, 1 / std::sqrt(Real(d)), Real(sink), visible);
    EXPECT_TRUE(within_tolerance<T>(r.output, e.output, e.base_output));
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(r.lse), e.lse, e.base_lse));
    EXPECT_TRUE(within_tolerance<T>(r.weights, e.weights, e.base_weights));
    for (Index i = 1; i < lq; ++i) {
      const Real sum = Real(r.weights.row(i).sum()), rest = std::exp(Real(sink) - Real(r.lse(i)));
      EXPECT_NEAR(double(sum), double(1 - rest), 32 * std::numeric_limits<T>::epsilon()) << "row " << i;
      if (std::isfinite(sink)) {
        EXPECT_LT(sum, 1) << "row " << i;
      }
    }
    EXPECT_TRUE(r.weights.row(0).isZero(0));
    EXPECT_EQ(r.lse(0), sink);
  }
}

// bf16 inputs: the merge with the sink happens in float before the output is rounded to bf16,
// on the multi-head and batched calls and both paths: within bf16's rounding of the float call on
// the same (bf16) values, and far from the call without sinks.
TEST(Sinks, Bf16InputsMergeInFloatOnEveryPath) {
  ATTEND_SEEDED_RNG(rng);
  using B = Eigen::bfloat16;
  const Index heads = 4, d = 16, lq = 33, lk = 50;
  const Matrix<B> q = rng.normal<float>(lq, heads * d).cast<B>(), k = rng.normal<float>(lk, heads * d).cast<B>(),
                  v = rng.normal<float>(lk, heads * d).cast<B>();
  Vector<float> sinks(heads);
  sinks << 0.5f, 2.0f, -1.0f, 3.0f;
  const Vector<B> sinks_b = sinks.cast<B>();  // (exact in bf16)
  for (const Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked}) {
    SCOPED_TRACE(algorithm == Algorithm::Blocked ? "blocked" : "materialized");
    AttentionOptions o;
    o.algorithm = algorithm;
    o.block_q = 8;
    o.block_k = 16;
    const Matrix<float> expected =
        multi_head_attention(q.cast<float>(), k.cast<float>(), v.cast<float>(), heads, Causal(), o, sinks);
    const Matrix<float> plain = multi_head_attention(q.cast<float>(), k.cast<float>(), v.cast<float>(), heads, Causal(), o);
    const Matrix<B> multi = multi_head_attention(q, k, v, heads, Causal(), o, sinks_b);
    const Matrix<B> batched = batched_attention(q, k, v, BatchLayout{heads, 1}, Causal(), o, sinks_b);
    // P rounded to bf16 by the bf16 kernels (at most 2^-8 of the largest |v|) and the output once.
    const double bound = std::ldexp(1.0, -6) * double(v.cast<float>().cwiseAbs().maxCoeff());
    EXPECT_LE(double(max_abs_error(multi.cast<float>(), expected)), bound);
    EXPECT_LE(double(max_abs_error(batched.cast<float>(), expected)), bound);
    EXPECT_GT(double(max_abs_error(plain, expected)), 4 * bound) << "the sinks change the result";
  }
}

TEST(Sinks, AddingSinksToAResultIsTheMergeWithAnEmptyValuedPartial) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 3, d = 4, lq = 5, lk = 9;
  const Matrix<double> q = rng.normal<double>(lq, heads * d), k = rng.normal<double>(lk, heads * d),
                       v = rng.normal<double>(lk, heads * d);
  const Vector<double> sinks = rng.normal<double>(heads, 1);
  Matrix<double> out(lq, heads * d), lse(lq, heads), plain(lq, heads * d), plain_lse(lq, heads);
  multi_head_attention_with_sinks_into(q, k, v, heads, out, NoMask{}, sinks, {}, lse);
  multi_head_attention_with_sinks_into(q, k, v, heads, plain, NoMask{}, Vector<double>(), {}, plain_lse);
  Matrix<double> merged = plain, merged_lse = plain_lse;
  add_attention_sinks_into<double>(merged, merged_lse, sinks);
  EXPECT_TRUE(identical(merged, out));
  EXPECT_TRUE(identical(merged_lse, lse));
  for (Index h = 0; h < heads; ++h) {  // merge_partial_into with a zero partial gives the same
    Matrix<double> o = plain.middleCols(h * d, d);
    Vector<double> l = plain_lse.col(h);
    merge_partial_into<double>(o, l, Matrix<double>::Zero(lq, d), Vector<double>::Constant(lq, sinks(h)));
    EXPECT_LE(max_abs_error(o, Matrix<double>(out.middleCols(h * d, d))), 1e-15);
  }
  expect_invalid([&] { add_attention_sinks_into<double>(merged, merged_lse.leftCols(2), sinks); },
                 {"sinks of size 3", "(5 x 2)"});
  expect_invalid([&] { multi_head_attention_with_sinks_into(q, k, v, heads, out, NoMask{}, Vector<double>(2), {}, lse); },
                 {"sinks of size 2", "num_heads = 3"});
  expect_invalid([&] { multi_head_attention(q, k, v, heads, NoMask{}, {}, Vector<double>(4)); },
                 {"sinks of size 4", "num_heads = 3"});
  expect_invalid([&] { batched_attention(q, k, v, BatchLayout{heads, 1}, NoMask{}, {}, Vector<double>(2)); },
                 {"sinks of size 2", "num_heads = 3"});
  expect_invalid([&] { scaled_dot_product_attention(q, k, v, NoMask{}, {}, Vector<double>(3)); },
                 {"sinks of size 3", "num_heads = 1"});
  KVCache<double> cache(4, heads, d);
  expect_invalid([&] { decode_step(cache, q.topRows(1), k.topRows(1), v.topRows(1), heads, NoMask{}, {}, Vector<double>(1)); },
                 {"sinks of size 1"});
  EXPECT_EQ(cache.size(), 0) << "a rejected step leaves the cache unchanged";
}

}  // namespace
}  // namespace attend::test
