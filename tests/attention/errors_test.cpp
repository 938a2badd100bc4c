// SPDX-License-Identifier: MIT
// DESIGN.md §4 for scaled dot-product attention, on both paths: invalid configurations throw
// attend::invalid_argument naming the shapes; degenerate input has its defined output; NaN
// propagates to the rows it touches; huge finite logits stay finite.
#include "support/expect.hpp"
#include "support/attention_case.hpp"

#include <attend/attention/scaled_dot_product.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;
using ::testing::HasSubstr;

template <class T>
class AttentionErrorsTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(AttentionErrorsTest, Scalars);

/// Materialized, blocked with default tiles, and blocked with tiles smaller than the inputs.
std::vector<AttentionOptions> paths() { return {materialized_path(), blocked_path(), blocked_path(3, 5)}; }

// ---------------------------------------------------------------------------------------------
// Invalid configurations

TYPED_TEST(AttentionErrorsTest, RejectsQueryAndKeyOfDifferentHeadDims) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 7), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options); }, {"(4 x 8)", "(5 x 7)"});
  }
  expect_invalid([&] { scaled_dot_product_attention_with_weights(q, k, v); }, {"(4 x 8)", "(5 x 7)"});
}

TYPED_TEST(AttentionErrorsTest, RejectsKeysAndValuesOfDifferentLengths) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(6, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, NoMask{}, options); }, {"(5 x 8)", "(6 x 3)"});
  }
  expect_invalid([&] { scaled_dot_product_attention_with_weights(q, k, v); }, {"(5 x 8)", "(6 x 3)"});
}

TYPED_TEST(AttentionErrorsTest, RejectsOutputOfWrongShape) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    Matrix<T> out(4, 2);
    expect_invalid([&] { scaled_dot_product_attention_into(q, k, v, out, NoMask{}, options); }, {"(4 x 2)", "(4 x 3)"});
    Matrix<T> tall(5, 3);
    expect_invalid([&] { scaled_dot_product_attention_into(q, k, v, tall, NoMask{}, options); }, {"(5 x 3)", "(4 x 3)"});
  }
}

TYPED_TEST(AttentionErrorsTest, RejectsLseOfWrongSize) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    Matrix<T> out(4, 3);
    Vector<T> lse(5);
    expect_invalid([&] { scaled_dot_product_attention_into(q, k, v, out, NoMask{}, options, lse); }, {"5", "Lq = 4"});
  }
}

TYPED_TEST(AttentionErrorsTest, RejectsZeroHeadDim) {
  using T = TypeParam;
  const Matrix<T> q(4, 0), k(5, 0), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, NoMask{}, options); }, {"(4 x 0)"});
  }
}

TYPED_TEST(AttentionErrorsTest, RejectsMaskOfWrongShape) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  const BoolMatrix wide = BoolMatrix::Constant(4, 6, true), transposed = BoolMatrix::Constant(5, 4, true);
  const Matrix<T> short_bias = Matrix<T>::Zero(3, 5);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, BooleanMask(wide), options); }, {"(4 x 6)", "(4 x 5)"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, BooleanMask(transposed), options); },
                   {"(5 x 4)", "(4 x 5)"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, AdditiveMask(short_bias), options); },
                   {"(3 x 5)", "(4 x 5)"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, Causal() & BooleanMask(wide), options); },
                   {"(4 x 6)", "(4 x 5)"});
  }
  expect_invalid([&] { scaled_dot_product_attention_with_weights(q, k, v, BooleanMask(wide)); }, {"(4 x 6)", "(4 x 5)"});
}

TYPED_TEST(AttentionErrorsTest, RejectsNegativeWindowOtherThanMinusOne) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, Window(-2, 0), options); }, {"left=-2"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, Window(1, -3, Alignment::BottomRight), options); },
                   {"right=-3"});
    EXPECT_NO_THROW(scaled_dot_product_attention(q, k, v, Window(-1, -1), options));
  }
}

TYPED_TEST(AttentionErrorsTest, RejectsKeyPaddingOutOfRange) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, KeyPadding(6), options); }, {"6", "Lk=5"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, KeyPadding(-1), options); }, {"-1", "Lk=5"});
    EXPECT_NO_THROW(scaled_dot_product_attention(q, k, v, KeyPadding(5), options));
  }
}

TYPED_TEST(AttentionErrorsTest, RejectsNegativeBlockSize) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  for (Algorithm algorithm : {Algorithm::Materialized, Algorithm::Blocked, Algorithm::Auto}) {
    AttentionOptions bad_q, bad_k;
    bad_q.algorithm = bad_k.algorithm = algorithm;
    bad_q.block_q = -1;
    bad_k.block_k = -4;
    SCOPED_TRACE(describe(bad_q));
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, NoMask{}, bad_q); }, {"block_q=-1"});
    expect_invalid([&] { scaled_dot_product_attention(q, k, v, NoMask{}, bad_k); }, {"block_k=-4"});
  }
}

// ---------------------------------------------------------------------------------------------
// Degenerate input

TYPED_TEST(AttentionErrorsTest, NoQueriesGiveEmptyOutput) {
  using T = TypeParam;
  const Matrix<T> q(0, 8), k = Matrix<T>::Ones(5, 8), v = Matrix<T>::Ones(5, 3);
  const BoolMatrix visible(0, 5);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    for (const AttentionResult<T>& r :
         {scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options),
          scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options),
          scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(visible), options)}) {
      EXPECT_EQ(r.output.rows(), 0);
      EXPECT_EQ(r.output.cols(), 3);
      EXPECT_EQ(r.lse.size(), 0);
    }
  }
  const AttentionResult<T> w = scaled_dot_product_attention_with_weights(q, k, v);
  EXPECT_EQ(w.output.rows(), 0);
  EXPECT_EQ(w.weights.rows(), 0);
  EXPECT_EQ(w.weights.cols(), 5);
}

/// Every row of r is exactly zero with lse -inf.
template <class T>
void expect_all_rows_empty(const AttentionResult<T>& r) {
  EXPECT_TRUE((r.output.array() == T(0)).all()) << r.output;
  EXPECT_TRUE((r.lse.array() == -std::numeric_limits<T>::infinity()).all()) << r.lse.transpose();
}

TYPED_TEST(AttentionErrorsTest, NoKeysGiveZerosAndLseMinusInfinity) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Matrix<T> q = rng.normal<T>(6, 8), k(0, 8), v(0, 3);
  const BoolMatrix visible(6, 0);
  const Matrix<T> bias(6, 0);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, Window(2, 2), options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(visible), options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(bias), options));
    EXPECT_EQ(scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options).output.rows(), 6);
  }
  const AttentionResult<T> w = scaled_dot_product_attention_with_weights(q, k, v);
  expect_all_rows_empty(w);
  EXPECT_EQ(w.weights.rows(), 6);
  EXPECT_EQ(w.weights.cols(), 0);
}

TYPED_TEST(AttentionErrorsTest, KeyPaddingZeroGivesZeros) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Matrix<T> q = rng.normal<T>(6, 8), k = rng.normal<T>(9, 8), v = rng.normal<T>(9, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, KeyPadding(0), options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, Causal() & KeyPadding(0), options));
  }
  const AttentionResult<T> w = scaled_dot_product_attention_with_weights(q, k, v, KeyPadding(0));
  expect_all_rows_empty(w);
  EXPECT_TRUE((w.weights.array() == T(0)).all());
}

TYPED_TEST(AttentionErrorsTest, FullyMaskedRowsGiveZeros) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 12, lk = 7;
  const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 3);
  const BoolMatrix none = BoolMatrix::Constant(lq, lk, false);
  const Matrix<T> minus_inf = Matrix<T>::Constant(lq, lk, -std::numeric_limits<T>::infinity());
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(none), options));
    expect_all_rows_empty(scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(minus_inf), options));
    // Bottom-right causal with Lq > Lk: the first Lq - Lk queries precede every key.
    const AttentionResult<T> causal =
        scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options);
    for (Index i = 0; i < lq; ++i) {
      if (i < lq - lk) {
        EXPECT_TRUE((causal.output.row(i).array() == T(0)).all()) << "row " << i;
        EXPECT_EQ(causal.lse(i), -std::numeric_limits<T>::infinity()) << "row " << i;
      } else {
        EXPECT_TRUE(std::isfinite(causal.lse(i))) << "row " << i;
      }
    }
    // A top-left window (1, 1): queries past Lk + 1 see no key.
    const AttentionResult<T> window = scaled_dot_product_attention_with_lse(q, k, v, Window(1, 1), options);
    for (Index i = lk + 1; i < lq; ++i) EXPECT_EQ(window.lse(i), -std::numeric_limits<T>::infinity()) << "row " << i;
    EXPECT_TRUE(std::isfinite(window.lse(lk)));
  }
}

TYPED_TEST(AttentionErrorsTest, WindowZeroSeesOnlyTheAlignedKey) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const auto& [lq, lk] : std::vector<std::pair<Index, Index>>{{9, 9}, {5, 9}, {9, 5}})
    for (Alignment a : {Alignment::TopLeft, Alignment::BottomRight}) {
      const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 3);
      for (const AttentionOptions& options : paths()) {
        SCOPED_TRACE(describe(options) + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " " +
                     alignment_name(a));
        const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, Window(0, 0, a), options);
        for (Index i = 0; i < lq; ++i) {
          const Index key = aligned_key(i, lq, lk, a);
          if (key < 0 || key >= lk) {
            EXPECT_TRUE((r.output.row(i).array() == T(0)).all()) << "row " << i;
            EXPECT_EQ(r.lse(i), -std::numeric_limits<T>::infinity());
            continue;
          }
          // A single visible key has weight exactly 1: the output is its value row.
          EXPECT_TRUE(identical(r.output.row(i), v.row(key))) << "row " << i;
          const Real s = Real(q.row(i).template cast<Real>().dot(k.row(key).template cast<Real>())) / std::sqrt(Real(8));
          EXPECT_LE(std::fabs(Real(r.lse(i)) - s), 16 * std::numeric_limits<T>::epsilon() * (1 + std::fabs(s)));
        }
      }
    }
}

TYPED_TEST(AttentionErrorsTest, WindowAtLeastLengthEqualsFullAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 23, lk = 31;
  const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 3);
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    check_inputs<T>(q, k, v, Window(lk, lk, Alignment::BottomRight),
                    MaskCase{"Window(Lk, Lk)", all_visible(lq, lk), std::nullopt, false}, {options});
  }
}

// pytorch#109517/#110213: a row whose bias is all lowest() is finite: the uniform average of V.
TYPED_TEST(AttentionErrorsTest, RowOfLowestBiasIsFiniteUniformAverage) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 10, lk = 21;
  const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 4);
  Matrix<T> bias = rng.normal<T>(lq, lk);
  bias.row(0).setConstant(std::numeric_limits<T>::lowest());
  bias.row(6).setConstant(std::numeric_limits<T>::lowest());
  bias.row(3).head(11).setConstant(std::numeric_limits<T>::lowest());  // those keys get weight 0
  const RealVector mean = v.template cast<Real>().colwise().mean().transpose();
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(3, 5), blocked_path(1, 1)}) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(bias), options);
    EXPECT_TRUE(r.output.allFinite());
    for (Index i : {0, 6})
      for (Index c = 0; c < v.cols(); ++c)
        EXPECT_LE(std::fabs(Real(r.output(i, c)) - mean(c)),
                  4 * std::numeric_limits<T>::epsilon() * Real(lk) * Real(v.cwiseAbs().maxCoeff()))
            << "row " << i;
    check_inputs<T>(q, k, v, AdditiveMask(bias),
                    MaskCase{"lowest() rows", all_visible(lq, lk), bias.template cast<Real>(), false}, {options},
                    false);
  }
}

// ---------------------------------------------------------------------------------------------
// Non-finite data

TYPED_TEST(AttentionErrorsTest, NaNInQueryRowAffectsOnlyThatRow) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 20, lk = 17;
  const Matrix<T> clean = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 4);
  Matrix<T> q = clean;
  q(4, 2) = std::numeric_limits<T>::quiet_NaN();
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, Causal(), options);
    const AttentionResult<T> expected = scaled_dot_product_attention_with_lse(clean, k, v, Causal(), options);
    EXPECT_TRUE(r.output.row(4).array().isNaN().all());
    EXPECT_TRUE(std::isnan(r.lse(4)));
    for (Index i = 0; i < lq; ++i) {
      if (i == 4) continue;
      EXPECT_TRUE(r.output.row(i).allFinite()) << "row " << i;
      EXPECT_LE(max_abs_error(r.output.row(i), expected.output.row(i)), 8 * std::numeric_limits<T>::epsilon());
    }
  }
}

TYPED_TEST(AttentionErrorsTest, NaNInKeyPropagatesToEveryRowThatSeesIt) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 20, lk = 17, bad = 6;
  const Matrix<T> q = rng.normal<T>(lq, 8), v = rng.normal<T>(lk, 4);
  Matrix<T> k = rng.normal<T>(lk, 8);
  k(bad, 5) = std::numeric_limits<T>::quiet_NaN();
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> full = scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options);
    EXPECT_TRUE(full.output.array().isNaN().all());
    EXPECT_TRUE(full.lse.array().isNaN().all());
    const AttentionResult<T> causal = scaled_dot_product_attention_with_lse(q, k, v, Causal(), options);
    for (Index i = bad; i < lq; ++i) EXPECT_TRUE(causal.output.row(i).array().isNaN().all()) << "row " << i;
  }
}

TYPED_TEST(AttentionErrorsTest, NaNInValuePropagatesToEveryRowThatSeesIt) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 20, lk = 17, bad = 6;
  const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8);
  Matrix<T> v = rng.normal<T>(lk, 4);
  v(bad, 2) = std::numeric_limits<T>::quiet_NaN();
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> full = scaled_dot_product_attention(q, k, v, NoMask{}, options);
    EXPECT_TRUE(full.col(2).array().isNaN().all());
    const Matrix<T> causal = scaled_dot_product_attention(q, k, v, Causal(), options);
    for (Index i = bad; i < lq; ++i) EXPECT_TRUE(std::isnan(causal(i, 2))) << "row " << i;
  }
}

/// A priori bound on the output and log-sum-exp error that rounding the logits alone can cause,
/// for inputs whose logits are so large that the baseline's own error is too noisy a yardstick for
/// the 2x rule. Each logit s_ij = scale <q_i, k_j> is off by |d_ij| <= g scale sum_c |q_ic k_jc|
/// with g = (d + 2) eps (dot product, scale, one more rounding); then, to first order,
/// o_i moves by sum_j p_ij (d_ij - mean_p d_i) v_j, at most 2 max|d| max|v|, and lse_i by at most max|d|.
struct LogitRoundingBound {
  Real output, lse;
};

template <class T>
LogitRoundingBound logit_rounding_bound(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Real scale) {
  const Real gamma = Real(q.cols() + 2) * std::numeric_limits<T>::epsilon();
  const RealMatrix magnitudes = q.template cast<Real>().cwiseAbs() * k.template cast<Real>().cwiseAbs().transpose();
  const Real logit_error = gamma * scale * magnitudes.maxCoeff();
  return {2 * logit_error * Real(v.cwiseAbs().maxCoeff()), logit_error};
}

// pytorch#121558: huge finite logits (inputs x30, logits in the thousands, and q = k = v = 3000)
// stay finite and match the reference within what rounding the logits can explain.
TYPED_TEST(AttentionErrorsTest, HugeFiniteLogitsStayFiniteAndMatchReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 40, lk = 70, d = 64;
  const Matrix<T> q = rng.normal<T>(lq, d, 30.0), k = rng.normal<T>(lk, d, 30.0), v = rng.normal<T>(lk, 16);
  const Real scale = 1 / std::sqrt(Real(d));
  const Reference ref = reference_attention(q, k, v, scale, causal_visibility(lq, lk, Alignment::BottomRight));
  const LogitRoundingBound bound = logit_rounding_bound(q, k, v, scale);
  const Real rounding = 8 * std::numeric_limits<T>::epsilon();
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options);
    ASSERT_TRUE(r.output.allFinite());
    ASSERT_TRUE(r.lse.allFinite());
    EXPECT_LE(max_abs_error(r.output, ref.output), bound.output + rounding * std::max<Real>(1, ref.output.cwiseAbs().maxCoeff()));
    EXPECT_LE(max_abs_error(r.lse, ref.lse), bound.lse + rounding * ref.lse.cwiseAbs().maxCoeff());
  }
  const Matrix<T> same = Matrix<T>::Constant(33, d, T(3000));
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r = scaled_dot_product_attention_with_lse(same, same, same, NoMask{}, options);
    EXPECT_LE(max_abs_error(r.output, Matrix<T>::Constant(33, d, T(3000))),
              4 * std::numeric_limits<T>::epsilon() * 33 * 3000);  // uniform weights 1/33
    EXPECT_TRUE(r.lse.allFinite());
  }
}

}  // namespace
