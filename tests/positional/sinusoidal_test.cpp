// SPDX-License-Identifier: MIT
// Sinusoidal position encoding against its closed form, computed here in long double.
#include <attend/positional/sinusoidal.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>

namespace {

using attend::Index;
using attend::Matrix;
using Real = long double;

template <class T>
class SinusoidalTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SinusoidalTest, Scalars);

// The angle of column j at `position` from the definition: position / base^(2 floor(j/2) / d).
Real angle_of(Real position, Index j, Index width, Real base) {
  return position / std::pow(base, static_cast<Real>(2 * (j / 2)) / static_cast<Real>(width));
}

// PE(position, j): sine on even columns, cosine on odd ones.
Real closed_form(Real position, Index j, Index width, Real base) {
  const Real angle = angle_of(position, j, width, base);
  return j % 2 == 0 ? std::sin(angle) : std::cos(angle);
}

// Allowed |error| of one entry: rounding to T, plus the error of an angle computed in double,
// which is proportional to the angle itself (~eps_d |angle|; a float angle would be eps_f |angle|).
template <class T>
Real allowed_error(Real angle) {
  return 2 * Real(std::numeric_limits<T>::epsilon()) +
         4 * Real(std::numeric_limits<double>::epsilon()) * std::max(Real(1), std::fabs(angle));
}

// Every entry of `table` (row r at position offset + r) against the closed form.
template <class T>
::testing::AssertionResult matches_closed_form(const Matrix<T>& table, Index offset, Real base) {
  for (Index r = 0; r < table.rows(); ++r)
    for (Index j = 0; j < table.cols(); ++j) {
      const Real position = static_cast<Real>(offset + r);
      const Real expected = closed_form(position, j, table.cols(), base);
      const Real error = std::fabs(Real(table(r, j)) - expected);
      if (!(error <= allowed_error<T>(angle_of(position, j, table.cols(), base))))
        return ::testing::AssertionFailure() << "entry (" << r << ", " << j << ") at position " << offset + r
                                             << " is " << Real(table(r, j)) << ", expected " << expected
                                             << " (error " << error << ")";
    }
  return ::testing::AssertionSuccess();
}

template <class T>
Matrix<T> random_matrix(std::mt19937_64& rng, Index rows, Index cols) {
  std::normal_distribution<double> normal;
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(normal(rng));
  return m;
}

TYPED_TEST(SinusoidalTest, TableMatchesClosedForm) {
  using T = TypeParam;
  for (const Index width : {1, 2, 3, 7, 8, 33, 64, 512})
    for (const Index offset : {0, 1, 17, -9}) {
      SCOPED_TRACE("width " + std::to_string(width) + ", offset " + std::to_string(offset));
      EXPECT_TRUE(matches_closed_form(attend::sinusoidal_encoding<T>(40, width, offset), offset, 10000));
    }
}

TYPED_TEST(SinusoidalTest, LargePositionsMatchClosedForm) {
  // At position ~1e5 the fastest column turns ~1e5 rad: a float angle would be off by ~4e-3.
  using T = TypeParam;
  for (const Index offset : {99990, 65530, 1000000}) {
    SCOPED_TRACE("offset " + std::to_string(offset));
    EXPECT_TRUE(matches_closed_form(attend::sinusoidal_encoding<T>(11, 128, offset), offset, 10000));
  }
}

TYPED_TEST(SinusoidalTest, BaseIsConfigurable) {
  using T = TypeParam;
  for (const double base : {100.0, 500000.0, 1.0}) {
    SCOPED_TRACE("base " + std::to_string(base));
    EXPECT_TRUE(matches_closed_form(attend::sinusoidal_encoding<T>(30, 16, 3, base), 3, base));
  }
}

TYPED_TEST(SinusoidalTest, OddWidthEndsWithASine) {
  using T = TypeParam;
  const Matrix<T> table = attend::sinusoidal_encoding<T>(20, 5, 0);  // columns sin cos sin cos sin
  for (Index p = 0; p < 20; ++p) {
    const double last = std::sin(static_cast<double>(p) / std::pow(10000.0, 4.0 / 5.0));
    EXPECT_NEAR(table(p, 4), last, 2 * std::numeric_limits<T>::epsilon()) << "position " << p;
  }
  EXPECT_EQ(table(0, 4), T(0));  // sin(0): a cosine would give 1
}

TYPED_TEST(SinusoidalTest, FirstRowAtPositionZeroIsZeroOne) {
  using T = TypeParam;
  const Matrix<T> table = attend::sinusoidal_encoding<T>(1, 6);
  for (Index j = 0; j < 6; ++j) EXPECT_EQ(table(0, j), T(j % 2)) << "column " << j;
}

TYPED_TEST(SinusoidalTest, OffsetEqualsShiftingRows) {
  using T = TypeParam;
  const Matrix<T> longer = attend::sinusoidal_encoding<T>(45, 31, 0);
  const Matrix<T> shifted = attend::sinusoidal_encoding<T>(40, 31, 5);
  EXPECT_EQ(shifted, longer.bottomRows(40));
}

TYPED_TEST(SinusoidalTest, AddInPlaceEqualsInputPlusTable) {
  using T = TypeParam;
  const auto seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(static_cast<std::uint64_t>(seed));
  const Matrix<T> x = random_matrix<T>(rng, 25, 13);
  Matrix<T> y = x;
  attend::add_sinusoidal_encoding<T>(y, 7);
  const Matrix<T> expected = x + attend::sinusoidal_encoding<T>(25, 13, 7);
  EXPECT_EQ(y, expected);
  Matrix<T> deduced = x;
  attend::add_sinusoidal_encoding(deduced, 7);  // the scalar type deduced from a matrix
  EXPECT_EQ(deduced, expected);
}

TYPED_TEST(SinusoidalTest, AddToABlockLeavesTheRestUntouched) {
  using T = TypeParam;
  const auto seed = ::testing::UnitTest::GetInstance()->random_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(static_cast<std::uint64_t>(seed));
  const Matrix<T> before = random_matrix<T>(rng, 30, 20);
  Matrix<T> after = before;
  attend::add_sinusoidal_encoding<T>(after.block(4, 3, 21, 9), 2);  // rows 4..24, columns 3..11
  EXPECT_EQ(after.block(4, 3, 21, 9), Matrix<T>(before.block(4, 3, 21, 9) + attend::sinusoidal_encoding<T>(21, 9, 2)));
  after.block(4, 3, 21, 9) = before.block(4, 3, 21, 9);
  EXPECT_EQ(after, before);  // nothing outside the block changed
}

TYPED_TEST(SinusoidalTest, EmptyShapes) {
  using T = TypeParam;
  EXPECT_EQ(attend::sinusoidal_encoding<T>(0, 8).rows(), 0);
  EXPECT_EQ(attend::sinusoidal_encoding<T>(8, 0).cols(), 0);
  Matrix<T> empty(0, 4);
  attend::add_sinusoidal_encoding<T>(empty, 3);
  EXPECT_EQ(empty.size(), 0);
}

// Issue #11: row r sits at position_offset + r, which passes INT64_MAX in the last rows here; it
// used to overflow (UB) and wrap to position -2^63. In double both rows are position 2^63, and
// columns 0 and 1 turn by exactly the position (denominator base^0 = 1).
TYPED_TEST(SinusoidalTest, PositionsPastInt64MaxDoNotWrap) {
  using T = TypeParam;
  const Matrix<T> table = attend::sinusoidal_encoding<T>(2, 4, std::numeric_limits<Index>::max());
  EXPECT_EQ(table.row(1), table.row(0));
  const Real position = std::ldexp(Real(1), 63), tolerance = 2 * Real(std::numeric_limits<T>::epsilon());
  EXPECT_LE(std::fabs(Real(table(1, 0)) - std::sin(position)), tolerance);  // sin(2^63) = 0.99993..., not -0.99993...
  EXPECT_LE(std::fabs(Real(table(1, 1)) - std::cos(position)), tolerance);
}

// Issue #11: a table larger than any array (more than PTRDIFF_MAX bytes) is an invalid argument,
// not a std::bad_alloc from deep inside Eigen.
TYPED_TEST(SinusoidalTest, RejectsTablesLargerThanAnyArray) {
  using T = TypeParam;
  using ::testing::HasSubstr;
  using ::testing::ThrowsMessage;
  const Index length = Index(1) << 62;
  EXPECT_THAT([=] { attend::sinusoidal_encoding<T>(length, 4); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("(4611686018427387904 x 4)")));
  EXPECT_THAT([=] { attend::sinusoidal_encoding<T>(4, length); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("PTRDIFF_MAX")));
}

TYPED_TEST(SinusoidalTest, RejectsBadBaseAndShape) {
  using T = TypeParam;
  using ::testing::HasSubstr;
  using ::testing::ThrowsMessage;
  EXPECT_THAT([] { attend::sinusoidal_encoding<T>(4, 4, 0, 0.0); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("base must be finite and positive, got 0")));
  EXPECT_THAT([] { attend::sinusoidal_encoding<T>(4, 4, 0, -2.0); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("got -2")));
  // Issue #11: printed with %g, not std::to_string's six decimals ("got -0.000000").
  EXPECT_THAT([] { attend::sinusoidal_encoding<T>(4, 4, 0, -2e-7); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("got -2e-07")));
  EXPECT_THROW(attend::sinusoidal_encoding<T>(4, 4, 0, std::numeric_limits<double>::infinity()),
               attend::invalid_argument);
  EXPECT_THROW(attend::sinusoidal_encoding<T>(4, 4, 0, std::numeric_limits<double>::quiet_NaN()),
               attend::invalid_argument);
  EXPECT_THAT([] { attend::sinusoidal_encoding<T>(-1, 4); },
              ThrowsMessage<attend::invalid_argument>(HasSubstr("(-1 x 4)")));
  Matrix<T> x = Matrix<T>::Zero(2, 2);
  EXPECT_THROW(attend::add_sinusoidal_encoding<T>(x, 0, 0.0), attend::invalid_argument);
}

}  // namespace
