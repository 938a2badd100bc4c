// SPDX-License-Identifier: MIT
// The soft-cap wrapper on one tile: cap tanh(s / cap) of the wrapped score, bounded by the cap,
// and its argument check.
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"

#include <attend/scores.hpp>
#include <attend/scores/soft_cap.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class SoftCapTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(SoftCapTest, Scalars);

TYPED_TEST(SoftCapTest, CapsTheWrappedScore) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index bq = 6, bk = 11, d = 8;
  const Matrix<T> q = rng.normal<T>(bq, d, 4.0), k = rng.normal<T>(bk, d, 4.0);
  for (const T cap : {T(0.5), T(5), T(50)}) {
    const detail::SoftCapped<detail::ScaledDot<T>, T> score{{T(0.25)}, cap};
    Matrix<T> s(bq, bk), st(bk, bq);
    score(q, k, s);
    score(q, k, st.transpose());  // the blocked path's layout
    for (Index i = 0; i < bq; ++i)
      for (Index j = 0; j < bk; ++j) {
        const Real raw = Real(0.25) * (q.row(i).template cast<Real>().dot(k.row(j).template cast<Real>()));
        const Real expected = Real(cap) * std::tanh(raw / Real(cap));
        // The dot product's rounding scales with sum |q_c k_c|, not with |raw| (cancellation).
        const Real magnitude = Real(0.25) * (q.row(i).template cast<Real>().cwiseAbs().dot(
                                                k.row(j).template cast<Real>().cwiseAbs()));
        const Real bound = 8 * std::numeric_limits<T>::epsilon() * (Real(cap) + magnitude);
        EXPECT_LE(std::fabs(Real(s(i, j)) - expected), bound) << "cap " << cap << " raw " << raw;
        EXPECT_LE(std::fabs(Real(st(j, i)) - expected), bound) << "transposed; cap " << cap << " raw " << raw;
        EXPECT_LE(std::fabs(s(i, j)), cap);
      }
  }
}

TEST(SoftCap, RejectsCapsThatAreNotPositiveFiniteScalars) {
  for (const double cap : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::nan("")}) {
    EXPECT_THROW(detail::checked_soft_cap<float>(cap), attend::invalid_argument) << cap;
    EXPECT_THROW(detail::checked_soft_cap<double>(cap), attend::invalid_argument) << cap;
  }
  // Finite doubles that overflow or underflow float.
  for (const double cap : {1e300, 1e-300}) {
    EXPECT_THROW(detail::checked_soft_cap<float>(cap), attend::invalid_argument) << cap;
    EXPECT_EQ(detail::checked_soft_cap<double>(cap), cap);
  }
  EXPECT_EQ(detail::checked_soft_cap<float>(30.0), 30.0f);
}

}  // namespace
