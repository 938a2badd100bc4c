// SPDX-License-Identifier: MIT
// With ATTEND_TEST_EIGEN_ASSERTS, a violated Eigen assertion fails the test that trips it
// (support/eigen_assert.hpp); without it, this test is skipped.
#include <attend/types.hpp>

#include <gtest/gtest.h>

namespace {

TEST(EigenAssertions, ThrowAndFailTheRunningTest) {
#ifdef ATTEND_TEST_EIGEN_ASSERTS_THROW
  attend::Matrix<float> m = attend::Matrix<float>::Zero(2, 2);
  const attend::Index rows = m.rows() + 1;  // one row past the end: Eigen's block() asserts
  EXPECT_THROW(m.topRows(rows).setOnes(), attend::test::eigen_assertion_failure);
  EXPECT_TRUE(m.isZero()) << "the assertion fires before anything is written";
#else
  GTEST_SKIP() << "built without ATTEND_TEST_EIGEN_ASSERTS";
#endif
}

}  // namespace
