// SPDX-License-Identifier: MIT
// DESIGN.md §4 for scaled dot-product attention, on both paths: invalid configurations throw
// attend::invalid_argument naming the shapes; degenerate input has its defined output; NaN
// propagates to the rows it touches; huge finite logits stay finite.
#include "support/expect.hpp"
#include "support/attention_case.hpp"
#include "support/scalars.hpp"

#include <attend/attend.hpp>

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
using Scalars = attend::test::TypedScalars;
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

// ---------------------------------------------------------------------------------------------
// Issue #11: sizes beyond the problem or beyond any array, and messages that name the values

constexpr Index kInt64Max = std::numeric_limits<Index>::max(), kTwoTo40 = Index(1) << 40;

// A tile larger than the problem is the whole problem. block_q = INT64_MAX overflowed the tile
// count and left the output unwritten; 2^40 allocated a 2^40-lane scratch (std::bad_alloc).
TYPED_TEST(AttentionErrorsTest, HugeTileSizesMeanTheWholeProblem) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<AttentionOptions> huge{blocked_path(kInt64Max, kInt64Max), blocked_path(kTwoTo40, 0),
                                           blocked_path(0, kTwoTo40), blocked_path(kInt64Max, 3),
                                           blocked_path(2, kInt64Max)};
  for (const MaskSpec& spec :
       {MaskSpec{MaskKind::None, Alignment::TopLeft}, MaskSpec{MaskKind::Causal, Alignment::BottomRight},
        MaskSpec{MaskKind::WindowRandom, Alignment::TopLeft}})
    check_case<T>(7, 9, 8, 3, spec, huge, rng);
}

// The batched and top-k paths size their scratch from the tiles too.
TYPED_TEST(AttentionErrorsTest, HugeTileSizesInBatchedAndTopK) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 6, lk = 11, d = 4, dv = 3;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const BoolMatrix causal = causal_visibility(lq, lk, Alignment::TopLeft);
  const Reference ref = reference_attention(q, k, v, 1 / std::sqrt(Real(d)), causal);
  const Baseline<T> base = baseline_attention<T>(q, k, v, T(1) / std::sqrt(T(d)), causal);
  for (const AttentionOptions& options : {blocked_path(kInt64Max, kInt64Max), blocked_path(kTwoTo40, kTwoTo40)}) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> batched = batched_attention(q, k, v, BatchLayout{1, 1}, Causal(), options);
    EXPECT_TRUE(within_tolerance<T>(batched, ref.output, base.output)) << "batched";
    const Matrix<T> top_k = top_k_attention(q, k, v, lk, Causal(), options);  // every key: plain attention
    EXPECT_TRUE(within_tolerance<T>(top_k, ref.output, base.output)) << "top-k";
  }
}

// A decode split longer than the keys is one split. block_k = INT64_MAX overflowed the split
// count (zeros, log-sum-exp -inf); 2^40 allocated a (heads, 2^40) scratch.
TYPED_TEST(AttentionErrorsTest, HugeDecodeSplitIsOneSplit) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lk = 37, d = 8;
  const Matrix<T> q = rng.normal<T>(1, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, d);
  const Reference ref = reference_attention(q, k, v, 1 / std::sqrt(Real(d)), all_visible(1, lk));
  const Baseline<T> base = baseline_attention<T>(q, k, v, T(1) / std::sqrt(T(d)), all_visible(1, lk));
  for (const Index split : {kInt64Max, kTwoTo40, lk + 1}) {
    SCOPED_TRACE("block_k=" + std::to_string(split));
    AttentionOptions options;
    options.block_k = split;
    Matrix<T> out(1, d);
    Vector<T> lse(1);
    decode_attention_into(q, k, v, 1, out, options, lse);
    expect_matches_reference<T>(out, lse, ref, base);
  }
}

// A KV cache whose row width H_kv d overflowed was built with 0 columns; one whose buffers exceed
// any array (more than PTRDIFF_MAX bytes) ended in std::bad_alloc. Both are invalid arguments.
TYPED_TEST(AttentionErrorsTest, RejectsKVCacheLargerThanAnyArray) {
  using T = TypeParam;
  const Index two_to_32 = Index(1) << 32;
  expect_invalid([&] { KVCache<T>(4, two_to_32, two_to_32); },
                 {"KV cache key row (kv_heads x head_dim)", "(4294967296 x 4294967296)", "PTRDIFF_MAX"});
  const KVCacheOptions wide_values{-1, Index(1) << 62};
  expect_invalid([&] { KVCache<T>(4, 2, 8, wide_values); }, {"KV cache value row", "(2 x 4611686018427387904)"});
  expect_invalid([&] { KVCache<T>(kTwoTo40, Index(1) << 22, 1); },
                 {"KV cache keys (capacity x kv_heads * head_dim)", "(1099511627776 x 4194304)"});
  expect_invalid([&] { KVCache<T>(kInt64Max, 1, 1); }, {"(9223372036854775807 x 1)"});
}

// The rotary cos/sin cache is sized by cache_length the same way.
TYPED_TEST(AttentionErrorsTest, RejectsRotaryCacheLargerThanAnyArray) {
  using T = TypeParam;
  RotaryOptions options;
  options.cache_length = Index(1) << 62;
  expect_invalid([&] { RotaryEmbedding<T>(8, options); }, {"rotary cos/sin cache", "(4611686018427387904 x 4)"});
}

// Sizes an array can have but the allocator refuses (2^44 rows of 4: 2^48 bytes of float, more
// than x86-64's 47-bit user address space, so refused even where the kernel overcommits) ended
// in std::bad_alloc from deep inside the constructor; they are invalid arguments that name the
// buffer, and a failed extend_cache leaves the rotary cache as it was.
TYPED_TEST(AttentionErrorsTest, RejectsBuffersTheAllocatorRefuses) {
  using T = TypeParam;
  const Index two_to_44 = Index(1) << 44;
  RotaryOptions options;
  options.cache_length = two_to_44;
  expect_invalid([&] { RotaryEmbedding<T>(8, options); },
                 {"rotary cos/sin cache", "(17592186044416 x 4)", "cannot be allocated"});
  expect_invalid([&] { KVCache<T>(two_to_44, 1, 4); },
                 {"KV cache keys (capacity x kv_heads * head_dim)", "(17592186044416 x 4)", "cannot be allocated"});

  options.cache_length = 16;
  RotaryEmbedding<T> rotary(8, options);
  expect_invalid([&] { rotary.extend_cache(two_to_44); }, {"cannot be allocated"});
  EXPECT_EQ(rotary.cache_length(), 16);
  Matrix<T> cached = Matrix<T>::Ones(3, 8), uncached = cached;
  rotary.apply(cached, 5);
  RotaryEmbedding<T>(8, RotaryOptions{}).apply(uncached, 5);
  EXPECT_EQ(cached, uncached);
}

// Doubles in messages read back as the value given: std::to_string printed six fixed decimals
// (1.000000 for 0.9999999, 0.000000 for 2e-7), plain %g six significant digits (1).
TYPED_TEST(AttentionErrorsTest, MessagesPrintTheDoublesGiven) {
  using T = TypeParam;
  const auto rotary = [](double base, RotaryScaling scaling) {
    RotaryOptions options;
    options.base = base;
    options.scaling = scaling;
    return RotaryEmbedding<T>(8, options);
  };
  expect_invalid([&] { rotary(10000, RotaryScaling::linear(0.9999999)); }, {"got 0.9999999"});
  expect_invalid([&] { rotary(10000, RotaryScaling::yarn(4, 4096, 2e-7, 3e-7)); },
                 {"beta_fast 2e-07", "beta_slow 3e-07"});
  expect_invalid([&] { rotary(10000, RotaryScaling::llama3(8, 8192, 2e-7, 1e-7)); },
                 {"low_freq_factor 2e-07", "high_freq_factor 1e-07"});
  expect_invalid([&] { rotary(0.9999999, RotaryScaling::none()); },
                 {"base must be finite and greater than 1, got 0.9999999"});
  const Matrix<T> x = Matrix<T>::Ones(3, 4);
  AttentionOptions scaled;
  scaled.scale = 2e-7;
  expect_invalid([&] { cosine_attention(x, x, x, 0.5, NoMask{}, scaled); }, {"(got 2e-07)"});
  const AdditiveAttention<T> additive(Matrix<T>::Ones(2, 4), Matrix<T>::Ones(2, 4), Vector<T>::Ones(2));
  expect_invalid([&] { additive.forward(x, x, x, NoMask{}, scaled); }, {"(got 2e-07)"});
}

// forward_batch's key padding error names the sequence whose valid length is out of range.
TYPED_TEST(AttentionErrorsTest, ForwardBatchPaddingErrorNamesTheSequence) {
  using T = TypeParam;
  const Index e = 4;
  const auto layer =
      MultiHeadAttention<T>::from_packed(2, Matrix<T>::Ones(3 * e, e), Vector<T>(), Matrix<T>::Ones(e, e), Vector<T>());
  const std::vector<Matrix<T>> sequences{Matrix<T>::Ones(3, e), Matrix<T>::Ones(5, e), Matrix<T>::Ones(2, e)};
  const std::vector<Index> too_long{3, 6, 2}, negative{3, 5, -1};
  expect_invalid([&] { layer.forward_batch(sequences, {}, NoMask{}, too_long); },
                 {"key_valid_lengths[1] = 6", "Lk=5", "sequence 1"});
  expect_invalid([&] { layer.forward_batch(sequences, {}, NoMask{}, negative); }, {"key_valid_lengths[2] = -1"});
}

}  // namespace
