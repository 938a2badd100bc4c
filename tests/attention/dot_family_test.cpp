// SPDX-License-Identifier: MIT
// The dot family (plain dot, bilinear, cosine) and soft-capped attention against long-double
// references of their scores, through both paths and every mask, plus their argument checks.
#include "support/overflow_case.hpp"
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/dot_family.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class DotFamilyTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(DotFamilyTest, Scalars);

template <class T>
std::vector<AttentionOptions> paths() {
  return {materialized_path(), blocked_path(), blocked_path(7, 16), blocked_path(16, 1)};
}

/// Runs an `_into` entry point `f(mask, options, out, lse)` and returns its output and lse.
template <class T, class F>
auto runner(Index lq, Index dv, F f) {
  return [=](const auto& mask, const AttentionOptions& options) {
    AttentionResult<T> r{Matrix<T>(lq, dv), Vector<T>(lq), {}};
    f(mask, options, r.output, r.lse);
    return r;
  };
}

/// s = scale * A B^T in long double.
template <class A, class B>
RealMatrix real_products(const A& a, const B& b, Real scale = 1) {
  return scale * (a.template cast<Real>() * b.template cast<Real>().transpose());
}

TYPED_TEST(DotFamilyTest, DotProductMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 33, lk = 65, d = 8, dv = 5;
  const Matrix<T> q = rng.normal<T>(lq, d, 0.5), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  check_scores<T>(real_products(q, k), Matrix<T>(q * k.transpose()), v, paths<T>(), rng,
                  runner<T>(lq, dv, [&](const auto& mask, const AttentionOptions& o, auto& out, auto& lse) {
                    dot_product_attention_into(q, k, v, out, mask, o, lse);
                  }));
  const BoolMatrix all = all_visible(lq, lk);
  EXPECT_TRUE(within_tolerance<T>(dot_product_attention(q, k, v),
                                  reference_from_scores(real_products(q, k), v, all).output,
                                  baseline_from_scores<T>(q * k.transpose(), v, all).output));
}

// s_ij = q_i^T W k_j with d_q != d_k.
TYPED_TEST(DotFamilyTest, BilinearMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 17, lk = 40, dq = 6, dk = 11, dv = 4;
  const Matrix<T> q = rng.normal<T>(lq, dq), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  const Matrix<T> w = rng.normal<T>(dq, dk, 1 / std::sqrt(double(dq * dk)));
  const RealMatrix ref_scores = q.template cast<Real>() * w.template cast<Real>() * k.template cast<Real>().transpose();
  const Matrix<T> base_scores = q * w * k.transpose();
  check_scores<T>(ref_scores, base_scores, v, paths<T>(), rng,
                  runner<T>(lq, dv, [&](const auto& mask, const AttentionOptions& o, auto& out, auto& lse) {
                    bilinear_attention_into(q, k, v, w, out, mask, o, lse);
                  }));
  const BoolMatrix causal = causal_visibility(lq, lk, Alignment::TopLeft);
  EXPECT_TRUE(within_tolerance<T>(bilinear_attention(q, k, v, w, Causal()),
                                  reference_from_scores(ref_scores, v, causal).output,
                                  baseline_from_scores<T>(base_scores, v, causal).output));
}

// s_ij = cos(q_i, k_j) / temperature; a zero query row has cosine 0 with every key.
TYPED_TEST(DotFamilyTest, CosineMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 20, lk = 37, d = 9, dv = 3;
  Matrix<T> q = rng.normal<T>(lq, d, 3.0);
  q.row(4).setZero();
  const Matrix<T> k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  for (const double temperature : {0.1, 1.0}) {
    SCOPED_TRACE("temperature " + std::to_string(temperature));
    RealMatrix ref_scores(lq, lk);
    Matrix<T> base_scores(lq, lk);
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < lk; ++j) {
        const Real nq = q.row(i).template cast<Real>().norm(), nk = k.row(j).template cast<Real>().norm();
        const Real dot = q.row(i).template cast<Real>().dot(k.row(j).template cast<Real>());
        ref_scores(i, j) = nq == 0 ? Real(0) : dot / (nq * nk) / Real(temperature);
        base_scores(i, j) = nq == 0 ? T(0) : q.row(i).dot(k.row(j)) / (q.row(i).norm() * k.row(j).norm()) / T(temperature);
      }
    check_scores<T>(ref_scores, base_scores, v, paths<T>(), rng,
                    runner<T>(lq, dv, [&](const auto& mask, const AttentionOptions& o, auto& out, auto& lse) {
                      cosine_attention_into(q, k, v, temperature, out, mask, o, lse);
                    }));
  }
}

// A row's scale does not change its cosine: rows of entries near 1e30 (whose squared norm
// overflows float) give the attention of the unscaled rows.
TYPED_TEST(DotFamilyTest, CosineKeepsTheDirectionOfHugeRows) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 7, lk = 11, d = 9, dv = 3;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const T huge = T(1e30);
  for (const AttentionOptions& options : paths<T>()) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> plain = cosine_attention(q, k, v, 0.5, NoMask{}, options);
    const Matrix<T> scaled = cosine_attention(Matrix<T>(huge * q), Matrix<T>(huge * k), v, 0.5, NoMask{}, options);
    ASSERT_TRUE(scaled.allFinite());
    EXPECT_LE(max_abs_error(scaled, plain), 64 * std::numeric_limits<T>::epsilon());
  }
}

// Row norms are floored at 1e-12, as torch.nn.functional.normalize does (not at 1e-8, as
// cosine_similarity does): rows of norm 1.1e-12 and 1e-10 keep their direction (unit rows), rows of
// norm 0.9e-12 and 0.5e-12 are divided by 1e-12. Expected scores from that formula in long double.
TYPED_TEST(DotFamilyTest, CosineFloorsRowNormsAtNormalizeEps) {
  using T = TypeParam;
  const Real floor = 1e-12L;
  Matrix<T> q(4, 2), k(3, 2);
  q << T(0.66e-12), T(0.88e-12),  // norm 1.1e-12, just above the floor
      T(0.54e-12), T(-0.72e-12),  // norm 0.9e-12, just below
      T(6e-11), T(-8e-11),        // norm 1e-10: above 1e-12, below cosine_similarity's 1e-8
      T(1), T(0);
  k << T(1), T(0), T(0), T(1), T(0.3e-12), T(0.4e-12);  // the last of norm 0.5e-12
  const Matrix<T> v = (Matrix<T>(3, 2) << T(1), T(0), T(0), T(1), T(-1), T(2)).finished();
  const auto unit = [&](const Matrix<T>& x) {
    RealMatrix u = x.template cast<Real>();
    for (Index i = 0; i < u.rows(); ++i) u.row(i) /= std::max(u.row(i).norm(), floor);
    return u;
  };
  const double temperature = 0.25;
  const RealMatrix ref_scores = unit(q) * unit(k).transpose() / Real(temperature);
  // The case tells the floors apart: under a 1e-8 floor, row 2's cosines would be at most 0.01.
  ASSERT_GT(std::fabs(ref_scores(2, 0)), Real(2));
  const BoolMatrix all = all_visible(4, 3);
  for (const AttentionOptions& options : paths<T>()) {
    SCOPED_TRACE(describe(options));
    AttentionResult<T> r{Matrix<T>(4, 2), Vector<T>(4), {}};
    cosine_attention_into(q, k, v, temperature, r.output, NoMask{}, options, r.lse);
    expect_matches_reference<T>(r.output, r.lse, reference_from_scores(ref_scores, v, all),
                                baseline_from_scores<T>(ref_scores.template cast<T>(), v, all));
  }
}

// s_ij = cap tanh(scale <q_i, k_j> / cap), with inputs amplified so that logits reach the cap.
TYPED_TEST(DotFamilyTest, SoftCappedMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 31, lk = 66, d = 16, dv = 6;
  const Matrix<T> k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  // Logits of about +-2 against a cap of 2 saturate the tanh; against 50 it is nearly linear.
  // (Logits much larger than the 2x rule's measured range make float order noise dominate.)
  for (const double cap : {2.0, 50.0}) {
    SCOPED_TRACE("cap " + std::to_string(cap));
    const Matrix<T> q = rng.normal<T>(lq, d, 2.0);
    const Real scale = 1 / std::sqrt(Real(d));
    const RealMatrix ref_scores = (real_products(q, k, scale) / Real(cap)).array().tanh() * Real(cap);
    // The baseline caps with Eigen's vectorized tanh, as a plain float program would: its few-ulp
    // error on scores of size ~cap is part of the input's float conditioning.
    Matrix<T> base_scores = (T(scale) * (q * k.transpose()));
    base_scores = (base_scores.array() / T(cap)).tanh() * T(cap);
    check_scores<T>(ref_scores, base_scores, v, paths<T>(), rng,
                    runner<T>(lq, dv, [&](const auto& mask, const AttentionOptions& o, auto& out, auto& lse) {
                      soft_capped_attention_into(q, k, v, cap, out, mask, o, lse);
                    }));
  }
}

// llama.cpp#29034: capping after masking turns -inf padding into a finite -cap. With 64 visible
// keys of 65 and a key tile of 64, the padded key sits alone in the second tile: if it leaked,
// its huge value row would dominate the output.
TYPED_TEST(DotFamilyTest, SoftCapKeepsMaskedKeysMasked) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 5, lk = 65, d = 8, dv = 3;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d);
  Matrix<T> v = rng.normal<T>(lk, dv);
  v.row(lk - 1).setConstant(T(1e6));
  const double cap = 1.0;
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 64), blocked_path(1, 1)}) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> out = soft_capped_attention(q, k, v, cap, KeyPadding(lk - 1), options);
    EXPECT_LT(out.cwiseAbs().maxCoeff(), v.topRows(lk - 1).cwiseAbs().maxCoeff() + T(1e-3));
    const Matrix<T> capped = soft_capped_attention(q, k, v, cap, Causal(Alignment::BottomRight), options);
    EXPECT_TRUE(capped.allFinite());
  }
}

// Every policy of the family scales the queries before the dot products, on both paths: scores
// that <q, k> alone would overflow to inf are exact (cosine needs no case: unit rows cannot
// overflow). Bilinear's W = 1 leaves Q W = Q.
TYPED_TEST(DotFamilyTest, ScaleAppliesToQueriesBeforeTheProduct) {
  using T = TypeParam;
  const OverflowCase<T> c = overflow_case<T>();
  const BoolMatrix all = all_visible(2, 3);
  const double cap = 3.0;
  const RealMatrix capped = (c.scores / Real(cap)).array().tanh() * Real(cap);
  const Matrix<T> capped_t = (c.scores.template cast<T>() / T(cap)).array().tanh() * T(cap);
  const Matrix<T> w = Matrix<T>::Ones(1, 1);
  for (AttentionOptions options : paths<T>()) {
    options.scale = c.scale;
    SCOPED_TRACE(describe(options));
    const auto expect_scores = [&](const RealMatrix& ref_scores, const Matrix<T>& base_scores, const auto& run) {
      AttentionResult<T> r{Matrix<T>(2, 2), Vector<T>(2), {}};
      run(r.output, r.lse);
      expect_matches_reference<T>(r.output, r.lse, reference_from_scores(ref_scores, c.v, all),
                                  baseline_from_scores<T>(base_scores, c.v, all));
    };
    const Matrix<T> scores_t = c.scores.template cast<T>();
    expect_scores(c.scores, scores_t, [&](auto& out, auto& lse) {
      SCOPED_TRACE("dot");
      dot_product_attention_into(c.q, c.k, c.v, out, NoMask{}, options, lse);
    });
    expect_scores(c.scores, scores_t, [&](auto& out, auto& lse) {
      SCOPED_TRACE("bilinear");
      bilinear_attention_into(c.q, c.k, c.v, w, out, NoMask{}, options, lse);
    });
    expect_scores(capped, capped_t, [&](auto& out, auto& lse) {
      SCOPED_TRACE("soft-capped");
      soft_capped_attention_into(c.q, c.k, c.v, cap, out, NoMask{}, options, lse);
    });
  }
}

TYPED_TEST(DotFamilyTest, BadArgumentsThrowNamingThem) {
  using T = TypeParam;
  const auto expect_throw = [](const auto& f, const std::string& fragment) {
    try {
      f();
      ADD_FAILURE() << "no exception; expected one mentioning " << fragment;
    } catch (const attend::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    }
  };
  const Matrix<T> q = Matrix<T>::Ones(3, 4), k = Matrix<T>::Ones(5, 4), v = Matrix<T>::Ones(5, 2);
  expect_throw([&] { bilinear_attention(q, k, v, Matrix<T>::Ones(4, 5)); }, "W (4 x 5)");
  expect_throw([&] { bilinear_attention(q, k, v, Matrix<T>::Ones(3, 4)); }, "q (3 x 4)");
  expect_throw([&] { cosine_attention(q, k, v, 0.0); }, "temperature");
  expect_throw([&] { cosine_attention(q, k, v, -1.0); }, "temperature");
  expect_throw([&] { cosine_attention(q, k, v, std::numeric_limits<double>::quiet_NaN()); }, "temperature");
  AttentionOptions scaled;
  scaled.scale = 2.0;
  expect_throw([&] { cosine_attention(q, k, v, 1.0, NoMask{}, scaled); }, "options.scale");
  expect_throw([&] { soft_capped_attention(q, k, v, 0.0); }, "soft cap");
  expect_throw([&] { soft_capped_attention(q, k, v, -3.0); }, "soft cap");
  expect_throw([&] { dot_product_attention(q, Matrix<T>::Ones(5, 3), v); }, "k (5 x 3)");
  expect_throw([&] { cosine_attention(q, k, Matrix<T>::Ones(4, 2), 1.0); }, "v (4 x 2)");
  expect_throw([&] { soft_capped_attention(q, k, Matrix<T>::Ones(4, 2), 1.0); }, "v (4 x 2)");
  // Scales that are not finite in T: given, or 1 / temperature, or a cap beyond T's range.
  for (const double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    AttentionOptions o;
    o.scale = bad;
    expect_throw([&] { scaled_dot_product_attention(q, k, v, NoMask{}, o); }, "scale");
    expect_throw([&] { dot_product_attention(q, k, v, NoMask{}, o); }, "scale");
    expect_throw([&] { soft_capped_attention(q, k, v, 1.0, NoMask{}, o); }, "scale");
  }
  if constexpr (std::is_same_v<T, float>) {
    AttentionOptions o;
    o.scale = 1e300;
    expect_throw([&] { scaled_dot_product_attention(q, k, v, NoMask{}, o); }, "scale 1e+300 is not a finite float");
    expect_throw([&] { cosine_attention(q, k, v, 1e-300); }, "temperature 1e-300");
    expect_throw([&] { soft_capped_attention(q, k, v, 1e300); }, "soft cap 1e+300");
    expect_throw([&] { soft_capped_attention(q, k, v, 1e-300); },
                 "soft cap 1e-300 must be a positive finite number in float");
  }
}

}  // namespace
