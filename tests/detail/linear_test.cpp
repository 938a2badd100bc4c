// SPDX-License-Identifier: MIT
// The projections of attend's layers (detail/linear.hpp): few_rows_product, the kernel that reads
// a decode step's W once in its own format (bf16, half, float, double) and widens it in
// registers, and linear_rows around it (widened x, bias, one rounding to S), against a
// long-double reference on the same rounded inputs. Rows 1..17 (the kernel's single-row path,
// its 4-row register blocks and their remainders, and one row past kFewProjectionRows), output
// features that fill neither a register block nor a task's block of 64, depths that exercise
// the unrolled packets, the remaining whole packets and the scalar tail; NaN propagation;
// bitwise invariance to the thread count and to a row's position among x's rows.
#include <attend/detail/linear.hpp>

#include "support/low_precision.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

namespace {

using attend::Index;
using attend::Matrix;
using attend::Vector;
using attend::test::Real;
using attend::test::RealMatrix;
namespace detail = attend::detail;
namespace test = attend::test;

template <class S>
using Acc = attend::accumulator_t<S>;

/// Rows of x: every single-row and register-block case, and one past kFewProjectionRows.
constexpr Index kMaxRows = detail::kFewProjectionRows + 1;

/// Depths: below one packet, exactly one, the unrolled loop with and without remaining whole
/// packets, and a scalar tail after each (16 float lanes with AVX-512: 4 unrolled = 64).
const Index kDepths[] = {1, 7, 16, 17, 67, 93, 200};
/// Output features: a partial register block, a task of 64 plus a partial block, three tasks.
const Index kFeatures[] = {1, 5, 67, 130};

/// A (rows, cols) matrix of N(0, 1) values rounded to S.
template <class S>
Matrix<S> random_matrix(test::Rng& rng, Index rows, Index cols) {
  return rng.normal<float>(rows, cols).template cast<S>();
}

/// v exactly in long double (bf16 and half through float, their exact widening).
template <class S>
Real exact(S v) {
  return Real(Acc<S>(v));
}

/// x W^T (+ b) in long double, from the values of x, W and b as stored.
template <class S>
RealMatrix reference_product(const Matrix<S>& x, const Matrix<S>& w, const Vector<S>* bias = nullptr) {
  RealMatrix y(x.rows(), w.rows());
  for (Index r = 0; r < x.rows(); ++r)
    for (Index f = 0; f < w.rows(); ++f) {
      Real sum = 0;
      for (Index c = 0; c < x.cols(); ++c) sum += exact(x(r, c)) * exact(w(f, c));
      y(r, f) = bias ? sum + exact((*bias)(f)) : sum;
    }
  return y;
}

/// The plainest same-precision computation (the baseline of the tolerance rules): each output
/// a dot product accumulated left to right in the accumulator type, plus the bias.
template <class S>
Matrix<Acc<S>> naive_product(const Matrix<S>& x, const Matrix<S>& w, const Vector<S>* bias = nullptr) {
  using T = Acc<S>;
  Matrix<T> y(x.rows(), w.rows());
  for (Index r = 0; r < x.rows(); ++r)
    for (Index f = 0; f < w.rows(); ++f) {
      T sum = 0;
      for (Index c = 0; c < x.cols(); ++c) sum += T(x(r, c)) * T(w(f, c));
      y(r, f) = bias ? sum + T((*bias)(f)) : sum;
    }
  return y;
}

/// few_rows_product(x widened to the accumulator type, W) into a view with a stride whose
/// columns past the features must stay untouched.
template <class S>
Matrix<Acc<S>> kernel_product(const Matrix<S>& x, const Matrix<S>& w) {
  using T = Acc<S>;
  constexpr Index pad = 3;
  const T sentinel = T(-12345);
  Matrix<T> wide_x_storage = Matrix<T>::Constant(x.rows(), x.cols() + pad, T(7));  // x with a stride
  wide_x_storage.leftCols(x.cols()) = x.template cast<T>();
  Matrix<T> y_storage = Matrix<T>::Constant(x.rows(), w.rows() + pad, sentinel);
  detail::few_rows_product<T>(y_storage.leftCols(w.rows()), wide_x_storage.leftCols(x.cols()), w);
  for (Index r = 0; r < x.rows(); ++r)
    for (Index j = w.rows(); j < w.rows() + pad; ++j)
      EXPECT_EQ(y_storage(r, j), sentinel) << "few_rows_product wrote past its output at (" << r << ", " << j << ")";
  return y_storage.leftCols(w.rows());
}

template <class S>
class LinearTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double, Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(LinearTest, Scalars);

// The kernel's sums, before any rounding to S, hold the accuracy of the accumulator type:
// within twice the error of a left-to-right dot product (reliability.md §4.2).
TYPED_TEST(LinearTest, FewRowsProductMatchesTheLongDoubleReference) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (Index rows = 1; rows <= kMaxRows; ++rows)
    for (const Index depth : kDepths)
      for (const Index features : kFeatures) {
        SCOPED_TRACE("rows " + std::to_string(rows) + ", in_features " + std::to_string(depth) + ", out_features " +
                     std::to_string(features));
        const Matrix<S> x = random_matrix<S>(rng, rows, depth), w = random_matrix<S>(rng, features, depth);
        const Matrix<Acc<S>> y = kernel_product(x, w);
        ASSERT_TRUE(test::within_tolerance<Acc<S>>(y, reference_product(x, w), naive_product(x, w)));
      }
}

// linear_rows end to end: x W^T + b, for bf16 and half rounded to S once after the bias. Its
// error is at most twice that of the naive same-precision projection (FlashAttention's rule
// for bf16 and half; the tolerance rule for float and double).
TYPED_TEST(LinearTest, LinearRowsMatchesTheLongDoubleReference) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (Index rows = 1; rows <= kMaxRows; ++rows)
    for (const Index depth : {Index(17), Index(93)})
      for (const Index features : {Index(5), Index(130)}) {
        SCOPED_TRACE("rows " + std::to_string(rows) + ", in_features " + std::to_string(depth) + ", out_features " +
                     std::to_string(features));
        const Matrix<S> x = random_matrix<S>(rng, rows, depth), w = random_matrix<S>(rng, features, depth);
        const Vector<S> b = random_matrix<S>(rng, features, 1);
        const Matrix<S> y = detail::linear_rows<S>(x, w, b);
        const RealMatrix expected = reference_product(x, w, &b);
        const Matrix<Acc<S>> naive = naive_product(x, w, &b);
        if constexpr (detail::is_reduced_precision<S>) {
          Matrix<float> naive_rounded(rows, features);
          for (Index i = 0; i < naive.size(); ++i) naive_rounded.data()[i] = test::round_to<S>(naive.data()[i]);
          EXPECT_TRUE(test::within_low_precision_rule(y, expected, naive_rounded));
        } else {
          EXPECT_TRUE(test::within_tolerance<S>(y, expected, naive));
        }
      }
}

// A NaN in x reaches every output of its row, a NaN in W every output of its feature, wherever
// they sit in the depth (unrolled packets, remaining whole packets, scalar tail); nothing else
// turns NaN, and an infinite weight gives an infinite (or NaN) output only in its feature.
TYPED_TEST(LinearTest, NaNAndInfinityPropagateToTheirRowsAndFeaturesOnly) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index depth = 93, features = 67;
  const S nan = S(std::numeric_limits<float>::quiet_NaN()), inf = S(std::numeric_limits<float>::infinity());
  for (const Index rows : {Index(1), Index(2), Index(5), kMaxRows})
    for (const Index column : {Index(0), Index(70), Index(92)}) {  // unrolled, remaining packet, tail (AVX-512)
      SCOPED_TRACE("rows " + std::to_string(rows) + ", column " + std::to_string(column));
      Matrix<S> x = random_matrix<S>(rng, rows, depth), w = random_matrix<S>(rng, features, depth);
      const Index bad_row = rows - 1, nan_feature = 3, inf_feature = 66;
      x(bad_row, column) = nan;
      w(nan_feature, column) = nan;
      w(inf_feature, (column + 1) % depth) = inf;
      const Matrix<S> y = detail::linear_rows<S>(x, w, Vector<S>());
      for (Index r = 0; r < rows; ++r)
        for (Index f = 0; f < features; ++f) {
          const float v = float(y(r, f));
          if (r == bad_row || f == nan_feature)
            ASSERT_TRUE(std::isnan(v)) << "(" << r << ", " << f << ") = " << v << " must be NaN";
          else if (f == inf_feature)
            ASSERT_FALSE(std::isfinite(v)) << "(" << r << ", " << f << ") = " << v << " must be infinite or NaN";
          else
            ASSERT_TRUE(std::isfinite(v)) << "(" << r << ", " << f << ") = " << v << " must be finite";
        }
    }
}

// Fixed blocks of output features: the bits are the same on 1 and 2 threads, for the single-row
// path, the register blocks, and past kFewProjectionRows (parallel_product).
TYPED_TEST(LinearTest, ResultsAreBitwiseTheSameOnOneAndTwoThreads) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index depth = 301, features = 1000;  // 16 tasks, the last partial
  const Matrix<S> w = random_matrix<S>(rng, features, depth);
  const Vector<S> b = random_matrix<S>(rng, features, 1);
  for (const Index rows : {Index(1), Index(3), Index(16), kMaxRows}) {
    const Matrix<S> x = random_matrix<S>(rng, rows, depth);
    Matrix<S> one, two;
    {
      detail::ThreadScope threads(1);
      one = detail::linear_rows<S>(x, w, b);
    }
    {
      detail::ThreadScope threads(2);
      two = detail::linear_rows<S>(x, w, b);
    }
    EXPECT_TRUE(test::identical(one, two)) << rows << " rows";
  }
}

// Each output is one sum whose order depends on the depth alone: a row of x gives the same bits
// at any position among 2..17 rows (the register blocks of 4 and their remainders).
TYPED_TEST(LinearTest, ARowsBitsDoNotDependOnItsPositionAmongSeveralRows) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index depth = 93, features = 67;
  const Matrix<S> x = random_matrix<S>(rng, kMaxRows, depth), w = random_matrix<S>(rng, features, depth);
  const Matrix<Acc<S>> all = kernel_product(x, w);
  for (const Index first : {Index(1), Index(3), Index(6)})
    for (const Index count : {Index(2), Index(3), Index(5), Index(11)}) {
      const Matrix<S> some = x.middleRows(first, count);
      EXPECT_TRUE(test::identical(kernel_product(some, w), Matrix<Acc<S>>(all.middleRows(first, count))))
          << "rows " << first << ".." << first + count - 1;
    }
}

// No input features: every output is the bias (rounded to S), for one row and several.
TYPED_TEST(LinearTest, NoInputFeaturesGiveTheBias) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Vector<S> b = random_matrix<S>(rng, 67, 1);
  for (const Index rows : {Index(0), Index(1), Index(3), kMaxRows}) {
    const Matrix<S> y = detail::linear_rows<S>(Matrix<S>(rows, 0), Matrix<S>(67, 0), b);
    ASSERT_EQ(y.rows(), rows);
    ASSERT_EQ(y.cols(), 67);
    for (Index r = 0; r < rows; ++r) EXPECT_TRUE(test::identical(y.row(r), b.transpose())) << "row " << r;
  }
}

}  // namespace
