// SPDX-License-Identifier: MIT
// Additive (Bahdanau) attention against a long-double reference of its scores, through both
// paths and every mask, plus its shape checks.
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/additive.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class AdditiveAttentionTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(AdditiveAttentionTest, Scalars);

/// Random parameters with tanh arguments of order 1: W entries N(0, 1/d), b and v N(0, 1).
template <class T>
struct Parameters {
  Matrix<T> w_query, w_key;  // (h, d_q), (h, d_k)
  Vector<T> v, bias;         // (h), (h) or empty

  Parameters(Index h, Index dq, Index dk, bool with_bias, Rng& rng)
      : w_query(rng.normal<T>(h, dq, 1 / std::sqrt(double(dq)))),
        w_key(rng.normal<T>(h, dk, 1 / std::sqrt(double(dk)))),
        v(rng.normal<T>(h, 1)),
        bias(with_bias ? Vector<T>(rng.normal<T>(h, 1)) : Vector<T>()) {}

  AdditiveAttention<T> layer() const { return {w_query, w_key, v, bias}; }

  /// s_ij = v^T tanh(W_q q_i + W_k k_j + b) in long double.
  template <class Q, class K>
  RealMatrix reference_scores(const Q& q, const K& k) const {
    const RealMatrix qp = q.template cast<Real>() * w_query.template cast<Real>().transpose();
    const RealMatrix kp = k.template cast<Real>() * w_key.template cast<Real>().transpose();
    RealMatrix s(q.rows(), k.rows());
    for (Index i = 0; i < q.rows(); ++i)
      for (Index j = 0; j < k.rows(); ++j) {
        Real sum = 0;
        for (Index c = 0; c < v.size(); ++c)
          sum += Real(v(c)) * std::tanh(qp(i, c) + kp(j, c) + (bias.size() ? Real(bias(c)) : Real(0)));
        s(i, j) = sum;
      }
    return s;
  }

  /// The same in T with plain loops and std::tanh: the baseline's scores.
  template <class Q, class K>
  Matrix<T> baseline_scores(const Q& q, const K& k) const {
    Matrix<T> qp = q * w_query.transpose();
    if (bias.size()) qp.rowwise() += bias.transpose();
    const Matrix<T> kp = k * w_key.transpose();
    Matrix<T> s(q.rows(), k.rows());
    for (Index i = 0; i < q.rows(); ++i)
      for (Index j = 0; j < k.rows(); ++j) {
        T sum = 0;
        for (Index c = 0; c < v.size(); ++c) sum += v(c) * std::tanh(qp(i, c) + kp(j, c));
        s(i, j) = sum;
      }
    return s;
  }
};

// (Lq, Lk, d_q, d_k, h, Dv): d_q != d_k, lengths around tile edges, h from 1 up.
const std::vector<std::tuple<Index, Index, Index, Index, Index, Index>> kShapes{
    {16, 16, 8, 8, 8, 4}, {17, 65, 12, 5, 16, 3}, {33, 7, 3, 20, 1, 6}, {1, 129, 16, 16, 32, 8}};

TYPED_TEST(AdditiveAttentionTest, EveryMaskBothPathsMatchReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  std::size_t n = 0;
  for (const auto& [lq, lk, dq, dk, h, dv] : kShapes) {
    SCOPED_TRACE("dq=" + std::to_string(dq) + " dk=" + std::to_string(dk) + " h=" + std::to_string(h));
    const Parameters<T> p(h, dq, dk, n++ % 2 == 0, rng);
    const Matrix<T> q = rng.normal<T>(lq, dq), k = rng.normal<T>(lk, dk), values = rng.normal<T>(lk, dv);
    const AdditiveAttention<T> layer = p.layer();
    check_scores<T>(p.reference_scores(q, k), p.baseline_scores(q, k), values,
                    {materialized_path(), blocked_path(), blocked_path(7, 16), blocked_path(1, 1)}, rng,
                    [&](const auto& mask, const AttentionOptions& options) {
                      AttentionResult<T> r{Matrix<T>(q.rows(), values.cols()), Vector<T>(q.rows()), {}};
                      layer.forward_into(q, k, values, r.output, mask, options, r.lse);
                      return r;
                    });
  }
}

TYPED_TEST(AdditiveAttentionTest, WeightsAndForwardMatchReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 9, lk = 21, dq = 6, dk = 10, h = 12, dv = 5;
  const Parameters<T> p(h, dq, dk, true, rng);
  const Matrix<T> q = rng.normal<T>(lq, dq), k = rng.normal<T>(lk, dk), values = rng.normal<T>(lk, dv);
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  const Reference ref = reference_from_scores(p.reference_scores(q, k), values, visible);
  const Baseline<T> base = baseline_from_scores<T>(p.baseline_scores(q, k), values, visible);
  const AdditiveAttention<T> layer = p.layer();
  const AttentionResult<T> w = layer.forward_with_weights(q, k, values, Causal(Alignment::BottomRight));
  expect_matches_reference<T>(w.output, w.lse, ref, base);
  EXPECT_TRUE(within_tolerance<T>(w.weights, ref.weights, base.weights)) << "weights";
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 8)}) {
    const Matrix<T> out = layer.forward(q, k, values, Causal(Alignment::BottomRight), options);
    EXPECT_TRUE(within_tolerance<T>(out, ref.output, base.output)) << describe(options);
  }
}

TYPED_TEST(AdditiveAttentionTest, EmptyInputsGiveDefinedResults) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Parameters<T> p(4, 3, 2, true, rng);
  const AdditiveAttention<T> layer = p.layer();
  for (const AttentionOptions& options : both_paths()) {
    EXPECT_EQ(layer.forward(Matrix<T>(0, 3), rng.normal<T>(5, 2), rng.normal<T>(5, 4), NoMask{}, options).rows(), 0);
    const Matrix<T> out = layer.forward(rng.normal<T>(3, 3), Matrix<T>(0, 2), Matrix<T>(0, 4), NoMask{}, options);
    EXPECT_EQ(out, Matrix<T>::Zero(3, 4)) << describe(options);
  }
}

// Every weight and input shape is checked, and the message names the shapes.
TYPED_TEST(AdditiveAttentionTest, BadShapesThrowNamingThem) {
  using T = TypeParam;
  const auto expect_throw = [](const auto& f, const std::string& fragment) {
    try {
      f();
      ADD_FAILURE() << "no exception; expected one mentioning " << fragment;
    } catch (const attend::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  const Matrix<T> wq = Matrix<T>::Ones(4, 3), wk = Matrix<T>::Ones(4, 2);
  const Vector<T> v = Vector<T>::Ones(4);
  expect_throw([&] { AdditiveAttention<T>(wq, Matrix<T>::Ones(5, 2), v); }, "W_k (5 x 2)");
  expect_throw([&] { AdditiveAttention<T>(wq, wk, Vector<T>::Ones(3)); }, "v (3)");
  expect_throw([&] { AdditiveAttention<T>(wq, wk, v, Vector<T>::Ones(2)); }, "b (2)");
  expect_throw([&] { AdditiveAttention<T>(Matrix<T>(0, 3), Matrix<T>(0, 2), Vector<T>()); }, "W_q (0 x 3)");
  const AdditiveAttention<T> layer(wq, wk, v);
  const Matrix<T> q = Matrix<T>::Ones(2, 3), k = Matrix<T>::Ones(5, 2), values = Matrix<T>::Ones(5, 6);
  expect_throw([&] { layer.forward(Matrix<T>::Ones(2, 4), k, values); }, "q (2 x 4)");
  expect_throw([&] { layer.forward(q, Matrix<T>::Ones(5, 3), values); }, "k (5 x 3)");
  expect_throw([&] { layer.forward(q, k, Matrix<T>::Ones(4, 6)); }, "values (4 x 6)");
  AttentionOptions scaled;
  scaled.scale = 0.5;
  expect_throw([&] { layer.forward(q, k, values, NoMask{}, scaled); }, "options.scale");
  const BoolMatrix wrong(2, 4);
  expect_throw([&] { layer.forward(q, k, values, BooleanMask(wrong)); }, "(2 x 4)");
}

}  // namespace
