// SPDX-License-Identifier: MIT
#include <attend/softmax.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace {

using attend::Index;
using attend::Matrix;
using attend::Vector;

template <class T>
class SoftmaxTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SoftmaxTest, Scalars);

TYPED_TEST(SoftmaxTest, RowsSumToOneAndMatchClosedForm) {
  using T = TypeParam;
  Matrix<T> s(2, 3);
  s << 1, 2, 3, -1, 0, 1000;
  Vector<T> lse(2);
  attend::softmax_rows_inplace<T>(s, lse);
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  EXPECT_NEAR(s(0, 0), std::exp(1.0) / z, 1e-6);
  EXPECT_NEAR(s(0, 2), std::exp(3.0) / z, 1e-6);
  EXPECT_NEAR(lse(0), std::log(z), 1e-5);
  EXPECT_NEAR(s(1, 2), 1.0, 1e-6);  // a huge finite logit stays finite
  EXPECT_NEAR(lse(1), 1000.0, 1e-3);
}

TYPED_TEST(SoftmaxTest, FullyMaskedRowIsZeroWithLseMinusInfinity) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity();
  Matrix<T> s(2, 2);
  s << -inf, -inf, 0, -inf;
  Vector<T> lse(2);
  attend::softmax_rows_inplace<T>(s, lse);
  EXPECT_EQ(s(0, 0), T(0));
  EXPECT_EQ(s(0, 1), T(0));
  EXPECT_EQ(lse(0), -inf);
  EXPECT_EQ(s(1, 0), T(1));
  EXPECT_EQ(s(1, 1), T(0));
}

TYPED_TEST(SoftmaxTest, RowOfLowestIsUniform) {
  using T = TypeParam;
  Matrix<T> s = Matrix<T>::Constant(1, 4, std::numeric_limits<T>::lowest());
  attend::softmax_rows_inplace<T>(s);
  for (Index j = 0; j < 4; ++j) EXPECT_EQ(s(0, j), T(0.25));
}

TYPED_TEST(SoftmaxTest, NaNPropagatesToItsRowOnly) {
  using T = TypeParam;
  Matrix<T> s(2, 3);
  s << 0, std::numeric_limits<T>::quiet_NaN(), 1, 0, 1, 2;
  attend::softmax_rows_inplace<T>(s);
  for (Index j = 0; j < 3; ++j) EXPECT_TRUE(std::isnan(s(0, j)));
  EXPECT_TRUE(s.row(1).allFinite());
}

TYPED_TEST(SoftmaxTest, RejectsLseOfWrongSize) {
  using T = TypeParam;
  Matrix<T> s = Matrix<T>::Zero(3, 2);
  Vector<T> lse(2);
  EXPECT_THROW(attend::softmax_rows_inplace<T>(s, lse), attend::invalid_argument);
}

}  // namespace
