// SPDX-License-Identifier: MIT
// Gradients of additive (Bahdanau) attention: against the long-double reference on every mask
// and both paths (FlashAttention's 3x rule), against finite differences in double, zero where
// nothing is seen, bitwise the same for any thread count and view layout, and the shape checks.
#include "support/additive_gradient_reference.hpp"
#include "support/attention_case.hpp"
#include "support/expect.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"

#include <attend/attention/additive_backward.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class AdditiveBackwardTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(AdditiveBackwardTest, Scalars);

/// A layer with tanh arguments of order 1 (W entries N(0, 1/d), b and v N(0, 1)) and its inputs.
template <class T>
struct Problem {
  Matrix<T> w_query, w_key;
  Vector<T> v, bias;
  Matrix<T> q, k, values, d_out;

  Problem(Index lq, Index lk, Index dq, Index dk, Index h, Index dv, bool with_bias, Rng& rng)
      : w_query(rng.normal<T>(h, dq, 1 / std::sqrt(double(dq)))),
        w_key(rng.normal<T>(h, dk, 1 / std::sqrt(double(dk)))),
        v(rng.normal<T>(h, 1)),
        bias(with_bias ? Vector<T>(rng.normal<T>(h, 1)) : Vector<T>()),
        q(rng.normal<T>(lq, dq)),
        k(rng.normal<T>(lk, dk)),
        values(rng.normal<T>(lk, dv)),
        d_out(rng.normal<T>(lq, dv)) {}

  AdditiveAttention<T> layer() const { return {w_query, w_key, v, bias}; }

  template <class S>
  AdditiveGradientsOf<S> by_loops(const MaskCase& c) const {
    return additive_gradients<S>(w_query, w_key, v, bias, q, k, values, d_out, c.visible, c.bias);
  }
};

template <class T, class Mask>
AdditiveGradients<T> library_gradients(const Problem<T>& p, const Mask& mask, const AttentionOptions& options) {
  const AdditiveAttention<T> layer = p.layer();
  const AttentionResult<T> forward = layer.forward_with_lse(p.q, p.k, p.values, mask, options);
  return additive_attention_backward(layer, p.q, p.k, p.values, forward, p.d_out, mask, options);
}

template <class T>
void expect_gradients_within(const AdditiveGradients<T>& g, const AdditiveGradientsOf<Real>& ref,
                             const AdditiveGradientsOf<T>& naive) {
  const Real lse = ref.max_abs_lse();
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dq, ref.dq, naive.dq, ref.dq_terms, lse)) << "dq";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dk, ref.dk, naive.dk, ref.dk_terms, lse)) << "dk";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dv, ref.dv, naive.dv, ref.dv_terms, lse)) << "dv";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dw_query, ref.dw_query, naive.dw_query, ref.dw_query_terms, lse))
      << "dW_q";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dw_key, ref.dw_key, naive.dw_key, ref.dw_key_terms, lse)) << "dW_k";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dw_v, ref.dw_v, naive.dw_v, ref.dw_v_terms, lse)) << "dv (score vector)";
  EXPECT_TRUE(gradient_within_tolerance<T>(g.dbias, ref.dbias, naive.dbias, ref.dbias_terms, lse)) << "db";
}

std::vector<AttentionOptions> backward_paths() {
  return {materialized_path(), blocked_path(), blocked_path(7, 16), blocked_path(1, 1), blocked_path(64, 3)};
}

// (Lq, Lk, d_q, d_k, h, Dv): Lq != Lk, lengths around the tiles above, d_q != d_k, odd widths.
const std::vector<std::tuple<Index, Index, Index, Index, Index, Index>> kShapes{
    {16, 16, 8, 8, 8, 4}, {17, 65, 12, 5, 16, 3}, {33, 7, 3, 20, 1, 6}, {1, 70, 16, 16, 9, 8}, {65, 2, 4, 4, 5, 1}};

TYPED_TEST(AdditiveBackwardTest, EveryMaskBothPathsWithinThreeTimesTheNaiveError) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  std::size_t n = 0;
  for (const auto& shape : kShapes) {
    // (named copies: a lambda cannot capture structured bindings before C++20)
    const Index lq = std::get<0>(shape), lk = std::get<1>(shape), h = std::get<4>(shape);
    const Problem<T> p(lq, lk, std::get<2>(shape), std::get<3>(shape), h, std::get<5>(shape), n++ % 2 == 0, rng);
    for (const MaskSpec& spec : all_mask_specs())
      with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
        SCOPED_TRACE("Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " h=" + std::to_string(h) +
                     " mask " + c.description);
        const AdditiveGradientsOf<Real> ref = p.template by_loops<Real>(c);
        const AdditiveGradientsOf<T> naive = p.template by_loops<T>(c);
        for (const AttentionOptions& options : backward_paths()) {
          SCOPED_TRACE(describe(options));
          const AdditiveGradients<T> g = library_gradients(p, mask, options);
          expect_gradients_within(g, ref, naive);
          for (Index i = 0; i < lq; ++i)  // rows that see nothing: exactly zero
            if (!c.visible.row(i).any()) {
              ASSERT_TRUE(g.dq.row(i).isZero(0)) << "row " << i << " sees no key";
            }
        }
      });
  }
}

/// Central differences of sum(d_out * forward) in double, for every entry of every input and
/// parameter, against the analytic gradients of both paths.
TEST(AdditiveBackwardFiniteDifferences, MatchEveryGradient) {
  ATTEND_SEEDED_RNG(rng);
  Problem<double> p(5, 7, 3, 4, 6, 2, true, rng);
  const Matrix<double> bias = rng.normal<double>(5, 7);
  const auto mask = AdditiveMask<double>(bias) & Causal(Alignment::BottomRight);
  const auto loss = [&] {
    return (p.d_out.array() * p.layer().forward(p.q, p.k, p.values, mask).array()).sum();
  };
  for (const AttentionOptions& options : {materialized_path(), blocked_path(2, 3)}) {
    SCOPED_TRACE(describe(options));
    const AdditiveGradients<double> g = library_gradients(p, mask, options);
    const auto check = [&](auto& x, const auto& analytic, const char* what) {
      for (Index i = 0; i < x.rows(); ++i)
        for (Index j = 0; j < x.cols(); ++j) {
          const double saved = x(i, j), step = 1e-6;
          x(i, j) = saved + step;
          const double up = loss();
          x(i, j) = saved - step;
          const double down = loss();
          x(i, j) = saved;
          EXPECT_NEAR(analytic(i, j), (up - down) / (2 * step), 1e-8) << what << " (" << i << ", " << j << ")";
        }
    };
    check(p.q, g.dq, "dq");
    check(p.k, g.dk, "dk");
    check(p.values, g.dv, "dv");
    check(p.w_query, g.dw_query, "dW_q");
    check(p.w_key, g.dw_key, "dW_k");
    check(p.v, g.dw_v, "dv (score vector)");
    check(p.bias, g.dbias, "db");
  }
}

TYPED_TEST(AdditiveBackwardTest, NothingSeenGivesZeroGradients) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const AttentionOptions& options : backward_paths()) {
    SCOPED_TRACE(describe(options));
    const Problem<T> no_keys(4, 0, 3, 2, 5, 2, true, rng);
    const AdditiveGradients<T> g = library_gradients(no_keys, NoMask{}, options);
    EXPECT_TRUE(g.dq.isZero(0) && g.dw_query.isZero(0) && g.dw_key.isZero(0) && g.dw_v.isZero(0) &&
                g.dbias.isZero(0));
    EXPECT_EQ(g.dk.rows(), 0);
    const Problem<T> no_queries(0, 6, 3, 2, 5, 2, false, rng);
    const AdditiveGradients<T> e = library_gradients(no_queries, NoMask{}, options);
    EXPECT_TRUE(e.dk.isZero(0) && e.dv.isZero(0) && e.dw_key.isZero(0) && e.dw_v.isZero(0));
    EXPECT_EQ(e.dbias.size(), 0);
    // Lq = 0 with a bias b: its gradient sums no rows (no column sum of an empty matrix).
    const Problem<T> no_queries_bias(0, 6, 3, 2, 5, 2, true, rng);
    const AdditiveGradients<T> eb = library_gradients(no_queries_bias, Causal(), options);
    EXPECT_EQ(eb.dq.rows(), 0);
    EXPECT_EQ(eb.dbias.size(), 5);
    EXPECT_TRUE(eb.dk.isZero(0) && eb.dv.isZero(0) && eb.dw_query.isZero(0) && eb.dbias.isZero(0));
    // Every key padded away: forward zeros, lse -inf, every gradient zero.
    const Problem<T> padded(4, 6, 3, 2, 5, 2, true, rng);
    const AdditiveGradients<T> z = library_gradients(padded, KeyPadding(0), options);
    EXPECT_TRUE(z.dq.isZero(0) && z.dk.isZero(0) && z.dv.isZero(0) && z.dw_query.isZero(0) && z.dw_key.isZero(0) &&
                z.dw_v.isZero(0) && z.dbias.isZero(0));
  }
}

TYPED_TEST(AdditiveBackwardTest, NanPropagatesToTheRowsItTouches) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  Problem<T> p(6, 9, 3, 4, 5, 2, true, rng);
  p.q(2, 1) = std::numeric_limits<T>::quiet_NaN();
  for (const AttentionOptions& options : backward_paths()) {
    SCOPED_TRACE(describe(options));
    const AdditiveGradients<T> g = library_gradients(p, NoMask{}, options);
    EXPECT_TRUE(g.dq.row(2).array().isNaN().all());
    EXPECT_TRUE(g.dq.row(0).array().isFinite().all());
    EXPECT_TRUE(g.dw_query.array().isNaN().any());
  }
}

/// Bitwise the same on 1, 2 and 3 threads and for strided (blocks of larger matrices) inputs.
TYPED_TEST(AdditiveBackwardTest, BitwiseInvariantToThreadsAndViews) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Problem<T> p(70, 90, 6, 5, 7, 3, true, rng);
  const AdditiveAttention<T> layer = p.layer();
  const auto mask = Causal(Alignment::BottomRight);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(16, 32)}) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> forward = layer.forward_with_lse(p.q, p.k, p.values, mask, options);
    const auto run = [&] { return additive_attention_backward(layer, p.q, p.k, p.values, forward, p.d_out, mask, options); };
    const AdditiveGradients<T> first = run();
    const auto expect_same = [&](const AdditiveGradients<T>& g) {
      EXPECT_TRUE(identical(g.dq, first.dq));
      EXPECT_TRUE(identical(g.dk, first.dk));
      EXPECT_TRUE(identical(g.dv, first.dv));
      EXPECT_TRUE(identical(g.dw_query, first.dw_query));
      EXPECT_TRUE(identical(g.dw_key, first.dw_key));
      EXPECT_TRUE(identical(g.dw_v, first.dw_v));
      EXPECT_TRUE(identical(g.dbias, first.dbias));
    };
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    for (const int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      expect_same(run());
    }
    omp_set_num_threads(saved);
#endif
    Matrix<T> wide_q = rng.normal<T>(p.q.rows(), p.q.cols() + 3), wide_k = rng.normal<T>(p.k.rows(), p.k.cols() + 2);
    Matrix<T> wide_values = rng.normal<T>(p.values.rows(), p.values.cols() + 5);
    Matrix<T> wide_d_out = rng.normal<T>(p.d_out.rows(), p.d_out.cols() + 1);
    wide_q.middleCols(1, p.q.cols()) = p.q;
    wide_k.rightCols(p.k.cols()) = p.k;
    wide_values.middleCols(2, p.values.cols()) = p.values;
    wide_d_out.leftCols(p.d_out.cols()) = p.d_out;
    expect_same(additive_attention_backward(layer, wide_q.middleCols(1, p.q.cols()), wide_k.rightCols(p.k.cols()),
                                            wide_values.middleCols(2, p.values.cols()), forward,
                                            wide_d_out.leftCols(p.d_out.cols()), mask, options));
  }
}

TYPED_TEST(AdditiveBackwardTest, BadShapesThrowNamingThem) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Problem<T> p(3, 5, 4, 2, 6, 2, false, rng);
  const AdditiveAttention<T> layer = p.layer();
  const AttentionResult<T> forward = layer.forward_with_lse(p.q, p.k, p.values);
  expect_invalid([&] { additive_attention_backward(layer, p.q, p.k, p.values, forward, Matrix<T>(3, 3)); },
                 {"d_out (3 x 3)", "(3 x 2)"});
  expect_invalid(
      [&] { additive_attention_backward(layer, p.q, p.k, p.values, Matrix<T>(2, 2), forward.lse, p.d_out); },
      {"output (2 x 2)"});
  expect_invalid([&] { additive_attention_backward(layer, p.q, p.k, p.values, forward.output, Vector<T>(4), p.d_out); },
                 {"log-sum-exp of size 4", "Lq = 3"});
  expect_invalid([&] { additive_attention_backward(layer, Matrix<T>(3, 5), p.k, p.values, forward, p.d_out); },
                 {"q (3 x 5)"});
  expect_invalid([&] { additive_attention_backward(layer, p.q, p.k, p.values, forward, p.d_out, BooleanMask(BoolMatrix(3, 4))); },
                 {"(3 x 4)"});
}

}  // namespace
