// SPDX-License-Identifier: MIT
#include <attend/detail/packet.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace {

using attend::Index;
using attend::Vector;
namespace detail = attend::detail;
namespace simd = Eigen::internal;

/// Lanes of the widest vector register for T that the compiler targets (from its own macros, not
/// from Eigen): the kernels must run on that width, not fall back to a scalar "packet".
template <class T>
constexpr Index expected_lanes() {
  constexpr Index bytes =
#if defined(__AVX512F__)
      64;
#elif defined(__AVX__)
      32;
#elif defined(__SSE2__) || defined(__aarch64__)
      16;  // SSE2; NEON (Packet4f, Packet2d)
#else
      Index(sizeof(T));
#endif
  return bytes / Index(sizeof(T));
}

/// exp(x) rounded once to double, from long double.
double exact_exp(long double x) { return static_cast<double>(std::exp(x)); }

template <class T>
class PacketTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(PacketTest, Scalars);

TYPED_TEST(PacketTest, IsTheTargetsWidestVector) {
  using T = TypeParam;
  EXPECT_EQ(detail::kLanes<T>, expected_lanes<T>());
  EXPECT_EQ(Index(sizeof(detail::Packet<T>)), expected_lanes<T>() * Index(sizeof(T)));
}

TYPED_TEST(PacketTest, ExpOrZeroIsExactlyZeroAtMinusInfinityAndKeepsNaN) {
  using T = TypeParam;
  using P = detail::Packet<T>;
  constexpr Index W = detail::kLanes<T>;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T pattern[] = {-inf, T(0), std::numeric_limits<T>::quiet_NaN(), T(1), T(-2), -inf, T(-20), T(0.5)};
  // Each pattern value visits every lane.
  for (Index shift = 0; shift < 8; ++shift) {
    Vector<T> x(W), e(W);
    for (Index i = 0; i < W; ++i) x(i) = pattern[(i + shift) % 8];
    simd::pstoreu(e.data(), detail::exp_or_zero(simd::ploadu<P>(x.data())));
    for (Index i = 0; i < W; ++i) {
      const T xi = x(i), ei = e(i);
      if (std::isnan(xi)) {
        EXPECT_TRUE(std::isnan(ei)) << "lane " << i;
      } else if (xi == -inf) {
        EXPECT_EQ(ei, T(0)) << "lane " << i;
        EXPECT_FALSE(std::signbit(ei)) << "lane " << i;
      } else {
        const double exact = exact_exp(xi);
        EXPECT_NEAR(ei, exact, 4 * std::numeric_limits<T>::epsilon() * exact) << "lane " << i << ", x " << xi;
      }
    }
  }
}

// Floats from -125 to 90 (88 for Eigen's pexp) in steps of 2^-10, against exp in long double: results of
// at least FLT_MIN within kUlps units in the last place (the spacing of floats at the exact
// value); subnormal results (x in (-103.3, -87.3)) within one subnormal spacing with AVX-512's
// kernel, and at most FLT_MIN off elsewhere (Eigen's pexp flushes them to 0); overflow to inf.
TEST(PacketExpTest, FloatExpOrZeroIsAccurateOverTheWholeRange) {
  using P = detail::Packet<float>;
  constexpr Index W = detail::kLanes<float>;
#if defined(EIGEN_VECTORIZE_AVX512)
  constexpr double kUlps = 2, kSubnormalError = 0x1p-149;  // measured: 1.21 ulp on this grid
  constexpr float kUpper = 90.0f;
#else
  constexpr double kUlps = 6, kSubnormalError = 0x1p-126;  // Eigen's pexp (measured 4.5 ulp with AVX-512)
  constexpr float kUpper = 88.0f;                          // (it overflows from 88.38 on, below FLT_MAX)
#endif
  Vector<float> x(W), e(W);
  double worst_ulps = 0;
  for (float start = -125.0f; start < kUpper; start += 0x1p-10f * float(W)) {
    for (Index i = 0; i < W; ++i) x(i) = start + 0x1p-10f * float(i) + 0x1p-17f;
    simd::pstoreu(e.data(), detail::exp_or_zero(simd::ploadu<P>(x.data())));
    for (Index i = 0; i < W; ++i) {
      const long double exact = std::exp(static_cast<long double>(x(i)));
      if (exact > static_cast<long double>(std::numeric_limits<float>::max())) {
        EXPECT_EQ(e(i), std::numeric_limits<float>::infinity()) << "x " << x(i);
      } else if (exact >= static_cast<long double>(std::numeric_limits<float>::min())) {
        const float rounded = static_cast<float>(exact);
        const long double ulp = std::nextafter(rounded, std::numeric_limits<float>::infinity()) - rounded;
        const double ulps = static_cast<double>(std::fabs(static_cast<long double>(e(i)) - exact) / ulp);
        worst_ulps = std::max(worst_ulps, ulps);
        EXPECT_LE(ulps, kUlps) << "x " << x(i) << ": " << e(i) << " against " << static_cast<double>(exact);
      } else {
        EXPECT_LE(static_cast<double>(std::fabs(static_cast<long double>(e(i)) - exact)), kSubnormalError)
            << "x " << x(i);
      }
    }
  }
  RecordProperty("worst_ulps", std::to_string(worst_ulps));
  // The ends: exp(+-0) = 1 exactly, exp(1000) = exp(inf) = inf, exp(-1000) within the
  // subnormal error of 0 (-inf and NaN: the typed test above).
  const float special[] = {0.0f, -0.0f, std::numeric_limits<float>::infinity(), 1000.0f, -1000.0f};
  for (const float value : special) {
    simd::pstoreu(e.data(), detail::exp_or_zero(simd::pset1<P>(value)));
    if (value < 0)
      EXPECT_LE(double(e(0)), kSubnormalError) << "x " << value;
    else
      EXPECT_EQ(e(0), value == 0 ? 1.0f : std::numeric_limits<float>::infinity()) << "x " << value;
  }
}

TYPED_TEST(PacketTest, SumOfLanesAddsLaneZeroFirst) {
  using T = TypeParam;
  using P = detail::Packet<T>;
  constexpr Index W = detail::kLanes<T>;
  // big + 1 rounds back to big, so the sum depends on the order: lane 0 first it is
  // ((big + 1) - big) + 1 + ... = W - 3 (the 1 of lane 1 is lost); a halving tree, as in
  // (l0 + l2) + (l1 + l3), keeps it.
  const T big = T(2) / std::numeric_limits<T>::epsilon();
  Vector<T> lanes = Vector<T>::Ones(W);
  lanes(0) = big;
  if (W > 2) lanes(2) = -big;
  T in_order = 0;
  for (const T lane : lanes) in_order += lane;
  EXPECT_EQ(detail::sum_of_lanes(simd::ploadu<P>(lanes.data())), in_order);
  if (W > 2) {
    EXPECT_EQ(in_order, T(W - 3));
  }
}

TYPED_TEST(PacketTest, ExpShiftedSumMatchesTheExactSumOnEveryTailLength) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T shift = T(0.75);
  for (Index n = 0; n <= 3 * detail::kLanes<T> + 1; ++n) {
    Vector<T> x(n);
    double exact_sum = 0;
    for (Index i = 0; i < n; ++i) {
      x(i) = i % 5 == 3 ? -inf : T(0.125) * T(i % 7) - T(0.5);
      if (x(i) != -inf) exact_sum += exact_exp(static_cast<long double>(x(i)) - shift);
    }
    const Vector<T> input = x;
    const T sum = detail::exp_shifted_sum_inplace(x.data(), n, shift);
    EXPECT_NEAR(sum, exact_sum, 8 * std::numeric_limits<T>::epsilon() * (exact_sum + 1)) << "n " << n;
    for (Index i = 0; i < n; ++i) {
      if (input(i) == -inf) {
        EXPECT_EQ(x(i), T(0)) << "n " << n << ", i " << i;
      } else {
        const double exact = exact_exp(static_cast<long double>(input(i)) - shift);
        EXPECT_NEAR(x(i), exact, 4 * std::numeric_limits<T>::epsilon() * exact) << "n " << n << ", i " << i;
      }
    }
  }
}

}  // namespace
