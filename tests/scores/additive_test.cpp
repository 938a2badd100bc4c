// SPDX-License-Identifier: MIT
// The additive score policy on one tile, against long double, written into a plain tile and into
// a transposed view (as the blocked path passes it).
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"

#include <attend/scores/additive.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class AdditiveScoreTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(AdditiveScoreTest, Scalars);

TYPED_TEST(AdditiveScoreTest, TileMatchesLongDouble) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const Index h : {1, 7, 16, 33}) {
    const Index bq = 5, bk = 9;
    const Matrix<T> qp = rng.normal<T>(bq, h), kp = rng.normal<T>(bk, h), v = rng.normal<T>(1, h);
    const detail::AdditiveScore<T> score{{v.data(), h}};
    Matrix<T> s(bq, bk), st(bk, bq);
    score(qp, kp, s);
    score(qp, kp, st.transpose());
    EXPECT_EQ(s, st.transpose()) << "h=" << h;
    for (Index i = 0; i < bq; ++i)
      for (Index j = 0; j < bk; ++j) {
        Real expected = 0, magnitude = 0;
        for (Index c = 0; c < h; ++c) {
          expected += Real(v(0, c)) * std::tanh(Real(qp(i, c)) + Real(kp(j, c)));
          magnitude += std::fabs(Real(v(0, c)));
        }
        // Each term is within a few ulp: h terms, each |v_c| times a tanh within 4 eps, plus the sum.
        EXPECT_LE(std::fabs(Real(s(i, j)) - expected), 8 * Real(h) * std::numeric_limits<T>::epsilon() * magnitude)
            << "h=" << h << " (" << i << ", " << j << ")";
      }
  }
}

}  // namespace
