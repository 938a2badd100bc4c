// SPDX-License-Identifier: MIT
// Learned attention sinks: on the materialized and blocked paths, in a contiguous decode step
// (one token and chunks) and in the merge, against their formula evaluated in long double:
//   p_ij = e^(x_ij) / (e^(s_h) + sum_j' e^(x_ij')),  o_i = sum_j p_ij v_j,  lse_i = log(e^(s_h) + sum_j e^(x_ij)).
#include <attend/attention/kv_cache.hpp>
#include <attend/attention/sinks.hpp>

#include "support/baseline.hpp"
#include "support/expect.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
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
using Scalars = ::testing::Types<float, double>;
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
  KVCache<double> cache(4, heads, d);
  expect_invalid([&] { decode_step(cache, q.topRows(1), k.topRows(1), v.topRows(1), heads, NoMask{}, {}, Vector<double>(1)); },
                 {"sinks of size 1"});
  EXPECT_EQ(cache.size(), 0) << "a rejected step leaves the cache unchanged";
}

}  // namespace
}  // namespace attend::test
