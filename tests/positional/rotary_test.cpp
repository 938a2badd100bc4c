// SPDX-License-Identifier: MIT
// Rotary position embedding against a scalar cos/sin reference written here, its algebraic
// properties, the scalings against their published formulas, and the layout permutation.
#include "support/expect.hpp"
#include "support/rope_reference.hpp"
#include "support/scalars.hpp"

#include <attend/positional/rotary.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using attend::test::expect_invalid;

using attend::Index;
using attend::Matrix;
using attend::RotaryEmbedding;
using attend::RotaryLayout;
using attend::RotaryOptions;
using attend::RotaryScaling;
using Real = long double;
using Positions = attend::Vector<Index>;

template <class T>
class RotaryTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(RotaryTest, Scalars);

constexpr Real kPi = 3.141592653589793238462643383279502884L;

template <class T>
Real eps() {
  return Real(std::numeric_limits<T>::epsilon());
}

const char* name_of(RotaryLayout layout) { return layout == RotaryLayout::HalfSplit ? "half-split" : "interleaved"; }

std::mt19937_64 seeded_rng() {
  return std::mt19937_64(static_cast<std::uint64_t>(::testing::UnitTest::GetInstance()->random_seed()));
}
#define TRACE_SEED() SCOPED_TRACE("seed " + std::to_string(::testing::UnitTest::GetInstance()->random_seed()))

template <class T>
Matrix<T> random_matrix(std::mt19937_64& rng, Index rows, Index cols) {
  std::normal_distribution<double> normal;
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(normal(rng));
  return m;
}

// theta_i = base^(-2i/r) (Su et al., eq. 15), before any scaling.
std::vector<Real> plain_frequencies(Index rotary_dim, Real base) {
  std::vector<Real> theta(static_cast<std::size_t>(rotary_dim / 2));
  for (std::size_t i = 0; i < theta.size(); ++i)
    theta[i] = std::pow(base, -Real(2 * i) / Real(rotary_dim));
  return theta;
}

// Feature offsets of pair i within a head, written out per layout.
Index first_of(RotaryLayout layout, Index i) { return layout == RotaryLayout::HalfSplit ? i : 2 * i; }
Index second_of(RotaryLayout layout, Index i, Index rotary_dim) {
  return layout == RotaryLayout::HalfSplit ? i + rotary_dim / 2 : 2 * i + 1;
}

// The scalar reference in long double: angle p theta_i, then (a, b) <- (a cos - b sin, b cos + a sin)
// on each pair of each head. With it, the error allowed per element of a result in T:
//   (|a| + |b|) (2 eps_T + 4 eps_d (1 + |p theta_i|)),
// i.e. rounding cos, sin and the rotation to T, plus the error of an angle computed in double (a
// few ulps of the angle; it dominates for double at large positions). An angle computed in float
// would be off by ~eps_f |p theta_i| (~4e-3 at p = 1e5) and fail this bound.
template <class T>
struct RotaryReference {
  Matrix<Real> value;
  Matrix<Real> bound;
};

// With an attention factor m (YaRN), cos and sin are multiplied by m, as HF transformers and ggml do:
// the rotated features are scaled by m, the others are not.
template <class T>
RotaryReference<T> scalar_rotary(const Matrix<T>& x, Index head_dim, Index rotary_dim, RotaryLayout layout,
                                 const std::vector<Index>& positions, const std::vector<Real>& theta,
                                 Real attention_factor = 1) {
  RotaryReference<T> ref{x.template cast<Real>(), Matrix<Real>::Constant(x.rows(), x.cols(), 0)};
  for (Index r = 0; r < x.rows(); ++r)
    for (Index head = 0; head < x.cols(); head += head_dim)
      for (Index i = 0; i < rotary_dim / 2; ++i) {
        const Real angle = Real(positions[static_cast<std::size_t>(r)]) * theta[static_cast<std::size_t>(i)];
        const Real c = attention_factor * std::cos(angle), s = attention_factor * std::sin(angle);
        const Index ia = head + first_of(layout, i), ib = head + second_of(layout, i, rotary_dim);
        const Real a = ref.value(r, ia), b = ref.value(r, ib);
        ref.value(r, ia) = a * c - b * s;
        ref.value(r, ib) = b * c + a * s;
        const Real bound = (std::fabs(a) + std::fabs(b)) * attention_factor *
                           (2 * eps<T>() + 4 * eps<double>() * (1 + std::fabs(angle)));
        ref.bound(r, ia) = ref.bound(r, ib) = bound;
      }
  return ref;
}

// Every element within its bound (untouched elements exactly equal); reports the worst one.
template <class T>
::testing::AssertionResult matches(const Matrix<T>& actual, const RotaryReference<T>& ref) {
  Index worst_r = 0, worst_c = 0;
  Real worst = -1;
  for (Index r = 0; r < actual.rows(); ++r)
    for (Index c = 0; c < actual.cols(); ++c) {
      const Real excess = std::fabs(Real(actual(r, c)) - ref.value(r, c)) - ref.bound(r, c);
      if (!(excess <= worst) || std::isnan(excess)) {
        worst = excess;
        worst_r = r;
        worst_c = c;
      }
    }
  if (worst <= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element (" << worst_r << ", " << worst_c << ") = "
                                       << Real(actual(worst_r, worst_c)) << ", reference "
                                       << ref.value(worst_r, worst_c) << ", allowed error "
                                       << ref.bound(worst_r, worst_c);
}

std::vector<Index> consecutive(Index start, Index count) {
  std::vector<Index> p(static_cast<std::size_t>(count));
  for (Index r = 0; r < count; ++r) p[static_cast<std::size_t>(r)] = start + r;
  return p;
}

Positions to_positions(const std::vector<Index>& p) {
  return Eigen::Map<const Positions>(p.data(), static_cast<Index>(p.size()));
}

RotaryOptions options_with(RotaryLayout layout, Index rotary_dim, double base = 10000.0) {
  RotaryOptions options;
  options.layout = layout;
  options.rotary_dim = rotary_dim;
  options.base = base;
  return options;
}

// Compares apply() (by start offset and by explicit positions) with the scalar reference.
template <class T>
void expect_matches_reference(std::mt19937_64& rng, Index heads, Index head_dim, Index rotary_dim,
                              RotaryLayout layout, const std::vector<Index>& positions, double base = 10000.0) {
  SCOPED_TRACE(std::string(name_of(layout)) + ", heads " + std::to_string(heads) + ", head_dim " +
               std::to_string(head_dim) + ", rotary_dim " + std::to_string(rotary_dim) + ", first position " +
               std::to_string(positions.front()));
  const Index length = static_cast<Index>(positions.size());
  const RotaryEmbedding<T> rope(head_dim, options_with(layout, rotary_dim, base));
  const Matrix<T> x = random_matrix<T>(rng, length, heads * head_dim);
  const std::vector<Real> theta = plain_frequencies(rotary_dim, base);
  const RotaryReference<T> expected = scalar_rotary(x, head_dim, rotary_dim, layout, positions, theta);

  Matrix<T> by_positions = x;
  rope.apply(by_positions, to_positions(positions));
  EXPECT_TRUE(matches(by_positions, expected));
  bool consecutive_positions = true;
  for (Index r = 1; r < length; ++r)
    consecutive_positions &= positions[static_cast<std::size_t>(r)] == positions.front() + r;
  if (consecutive_positions) {
    Matrix<T> by_offset = x;
    rope.apply(by_offset, positions.front());
    EXPECT_EQ(by_offset, by_positions);
  }
}

TYPED_TEST(RotaryTest, BothLayoutsMatchScalarReference) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  std::uniform_int_distribution<Index> any_position(0, 20000);
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved})
    for (const Index head_dim : {4, 16, 64, 128})
      for (const Index rotary_dim : {head_dim, head_dim / 2})  // rotary fraction 1 and 0.5
        for (const Index heads : {1, 3}) {
          for (const Index start : {0, 5, 4090})  // 4090 + 16 crosses the default cache of 4096
            expect_matches_reference<T>(rng, heads, head_dim, rotary_dim, layout, consecutive(start, 16));
          std::vector<Index> random_positions(9);
          for (Index& p : random_positions) p = any_position(rng);
          expect_matches_reference<T>(rng, heads, head_dim, rotary_dim, layout, random_positions);
        }
}

TYPED_TEST(RotaryTest, Llama3BaseMatchesScalarReference) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved})
    expect_matches_reference<T>(rng, 2, 128, 128, layout, consecutive(1000, 8), 500000.0);
}

TYPED_TEST(RotaryTest, LargePositionsMatchReference) {
  // At p ~ 1e5 pair 0 turns ~1e5 rad: an angle computed in float would be off by ~4e-3.
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const std::vector<Index> positions = {99990, 99999, 100000, 100001, 65536, 12345, 131071, 77777};
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved})
    for (const double base : {10000.0, 500000.0})
      expect_matches_reference<T>(rng, 2, 128, 128, layout, positions, base);
}

TYPED_TEST(RotaryTest, PreservesNormOfEveryHead) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
    SCOPED_TRACE(name_of(layout));
    const Index head_dim = 64, heads = 4;
    const RotaryEmbedding<T> rope(head_dim, options_with(layout, head_dim));
    const Matrix<T> x = random_matrix<T>(rng, 12, heads * head_dim);
    Matrix<T> y = x;
    rope.apply(y, 3000);
    for (Index r = 0; r < x.rows(); ++r)
      for (Index h = 0; h < heads; ++h) {
        const Real before = std::sqrt(x.row(r).segment(h * head_dim, head_dim).template cast<Real>().squaredNorm());
        const Real after = std::sqrt(y.row(r).segment(h * head_dim, head_dim).template cast<Real>().squaredNorm());
        EXPECT_LE(std::fabs(after - before), 8 * eps<T>() * before) << "row " << r << ", head " << h;
        EXPECT_NE(y.row(r).segment(h * head_dim, head_dim), x.row(r).segment(h * head_dim, head_dim));
      }
  }
}

TYPED_TEST(RotaryTest, ScoreDependsOnlyOnRelativePosition) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved})
    for (const Index rotary_dim : {64, 32}) {
      SCOPED_TRACE(std::string(name_of(layout)) + ", rotary_dim " + std::to_string(rotary_dim));
      const Index head_dim = 64;
      const RotaryEmbedding<T> rope(head_dim, options_with(layout, rotary_dim));
      const Matrix<T> q = random_matrix<T>(rng, 1, head_dim), k = random_matrix<T>(rng, 1, head_dim);
      const Real qk_norms = std::sqrt(q.template cast<Real>().squaredNorm() * k.template cast<Real>().squaredNorm());
      const auto score = [&](Index m, Index n) {
        Matrix<T> qm = q, kn = k;
        rope.apply(qm, m);
        rope.apply(kn, n);
        return qm.template cast<Real>().row(0).dot(kn.template cast<Real>().row(0));
      };
      const Index bases[] = {0, 100, 4095, 4096, 50000};
      for (const Index delta : {-3, 0, 7, 250}) {
        const Real first = score(bases[0] + delta + 300, bases[0] + 300);
        for (const Index m : bases) {
          // Rounding of cos/sin to T, plus the absolute angle error of p theta in double.
          const Real bound = (16 * eps<T>() + 4 * eps<double>() * Real(m + 300 + 250)) * qk_norms;
          EXPECT_LE(std::fabs(score(m + delta + 300, m + 300) - first), bound) << "m - n = " << delta << ", n = " << m + 300;
        }
      }
      EXPECT_GT(std::fabs(score(310, 300) - score(300, 300)), 1e-3L) << "the score must change with m - n";
    }
}

TYPED_TEST(RotaryTest, PartialRotaryLeavesTailUntouched) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
    SCOPED_TRACE(name_of(layout));
    const Index head_dim = 24, rotary_dim = 10, heads = 3;
    const RotaryEmbedding<T> rope(head_dim, options_with(layout, rotary_dim));
    const Matrix<T> x = random_matrix<T>(rng, 7, heads * head_dim);
    Matrix<T> y = x;
    rope.apply(y, 11);
    for (Index h = 0; h < heads; ++h) {
      EXPECT_EQ(y.middleCols(h * head_dim + rotary_dim, head_dim - rotary_dim),
                x.middleCols(h * head_dim + rotary_dim, head_dim - rotary_dim))
          << "head " << h;
      EXPECT_NE(y.middleCols(h * head_dim, rotary_dim), x.middleCols(h * head_dim, rotary_dim)) << "head " << h;
    }
  }
}

TYPED_TEST(RotaryTest, PositionZeroIsIdentity) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const RotaryEmbedding<T> rope(32);
  const Matrix<T> x = random_matrix<T>(rng, 1, 64);
  Matrix<T> y = x;
  rope.apply(y, 0);
  EXPECT_EQ(y, x);
}

TYPED_TEST(RotaryTest, CachedAndUncachedPositionsAreBitwiseEqual) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
    SCOPED_TRACE(name_of(layout));
    RotaryOptions uncached = options_with(layout, 64), cached = uncached;
    uncached.cache_length = 0;
    cached.cache_length = 6000;
    RotaryEmbedding<T> rope_uncached(64, uncached);
    const RotaryEmbedding<T> rope_cached(64, cached);
    EXPECT_EQ(rope_uncached.cache_length(), 0);
    const Matrix<T> x = random_matrix<T>(rng, 40, 128);
    Matrix<T> a = x, b = x, c = x;
    rope_uncached.apply(a, 5980);  // positions 5980..6019: cached up to 5999 in rope_cached
    rope_cached.apply(b, 5980);
    EXPECT_EQ(a, b);
    rope_uncached.extend_cache(7000);
    EXPECT_EQ(rope_uncached.cache_length(), 7000);
    rope_uncached.apply(c, 5980);
    EXPECT_EQ(c, b);
  }
}

TYPED_TEST(RotaryTest, NegativePositionsUndoPositiveOnes) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const RotaryEmbedding<T> rope(16);
  const Matrix<T> x = random_matrix<T>(rng, 1, 16);
  Matrix<T> y = x;
  rope.apply(y, 37);
  rope.apply(y, -37);
  EXPECT_TRUE(y.isApprox(x, 8 * std::numeric_limits<T>::epsilon()));
}

TYPED_TEST(RotaryTest, BlockOfLargerMatrixEqualsContiguousCopy) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const RotaryEmbedding<T> rope(8);
  const Matrix<T> big = random_matrix<T>(rng, 10, 35);
  Matrix<T> in_place = big;
  rope.apply(in_place.block(2, 3, 6, 16), 4);  // rows 2..7, heads at columns 3..10 and 11..18
  Matrix<T> copy = big.block(2, 3, 6, 16);
  rope.apply(copy, 4);
  EXPECT_EQ(Matrix<T>(in_place.block(2, 3, 6, 16)), copy);
  in_place.block(2, 3, 6, 16) = big.block(2, 3, 6, 16);
  EXPECT_EQ(in_place, big);  // nothing outside the block changed
}

TYPED_TEST(RotaryTest, ResultDoesNotDependOnThreadCount) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const RotaryEmbedding<T> rope(64);
  const Matrix<T> x = random_matrix<T>(rng, 300, 256);  // large enough for the parallel loop
  Matrix<T> one = x, many = x;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  rope.apply(one, 4070);
  omp_set_num_threads(std::max(2, threads));
  rope.apply(many, 4070);
  omp_set_num_threads(threads);
  EXPECT_EQ(one, many);
#endif
}

TYPED_TEST(RotaryTest, EmptyInputsAreNoOps) {
  using T = TypeParam;
  const RotaryEmbedding<T> rope(8);
  Matrix<T> no_rows(0, 16), no_cols(3, 0);
  rope.apply(no_rows, 5);
  rope.apply(no_cols, 5);
  EXPECT_EQ(no_rows.size(), 0);
  EXPECT_EQ(no_cols.size(), 0);
}

// ---- Frequency scaling: expected theta_i written from the published formulas. ----

// Checks frequencies() against `expected` and that apply() turns pair i at position p by
// p * expected_i and scales it by the attention factor m: a row with a_i = 1, b_i = 0 becomes
// (m cos, m sin).
template <class T>
void expect_frequencies(const RotaryEmbedding<T>& rope, const std::vector<Real>& expected, Real attention_factor = 1) {
  ASSERT_EQ(rope.frequencies().size(), static_cast<Index>(expected.size()));
  for (std::size_t i = 0; i < expected.size(); ++i)
    EXPECT_LE(std::fabs(Real(rope.frequencies()(static_cast<Index>(i))) - expected[i]), 1e-14L * expected[i]) << "pair " << i;
  const Index r = rope.rotary_dim(), position = 3000;
  Matrix<T> x = Matrix<T>::Zero(1, rope.head_dim());
  for (Index i = 0; i < r / 2; ++i) x(0, first_of(rope.layout(), i)) = 1;
  rope.apply(x, position);
  for (Index i = 0; i < r / 2; ++i) {
    const Real angle = Real(position) * expected[static_cast<std::size_t>(i)];
    const Real bound = (2 * eps<T>() + 1e-10L) * attention_factor;
    EXPECT_LE(std::fabs(Real(x(0, first_of(rope.layout(), i))) - attention_factor * std::cos(angle)), bound)
        << "pair " << i;
    EXPECT_LE(std::fabs(Real(x(0, second_of(rope.layout(), i, r))) - attention_factor * std::sin(angle)), bound)
        << "pair " << i;
  }
}

RotaryOptions scaled(const RotaryScaling& scaling, Index rotary_dim, double base, RotaryLayout layout) {
  RotaryOptions options = options_with(layout, rotary_dim, base);
  options.scaling = scaling;
  return options;
}

TYPED_TEST(RotaryTest, NoScalingUsesPlainFrequencies) {
  using T = TypeParam;
  const RotaryEmbedding<T> rope(64, scaled(RotaryScaling::none(), 64, 10000, RotaryLayout::HalfSplit));
  expect_frequencies(rope, plain_frequencies(64, 10000));
  EXPECT_EQ(rope.attention_factor(), 1.0);
}

TYPED_TEST(RotaryTest, LinearScalingDividesPositions) {
  using T = TypeParam;
  // Position interpolation (Chen et al. 2023): R(p / s), i.e. theta_i / s.
  const RotaryEmbedding<T> rope(64, scaled(RotaryScaling::linear(4), 64, 10000, RotaryLayout::Interleaved));
  std::vector<Real> expected = plain_frequencies(64, 10000);
  for (Real& t : expected) t /= 4;
  expect_frequencies(rope, expected);
  EXPECT_EQ(rope.attention_factor(), 1.0);
}

TYPED_TEST(RotaryTest, NtkAwareScalingRaisesBase) {
  using T = TypeParam;
  // NTK-aware (bloc97): base' = base * s^(r / (r - 2)).
  for (const Index r : {64, 16}) {
    const RotaryEmbedding<T> rope(64, scaled(RotaryScaling::ntk_aware(8), r, 10000, RotaryLayout::HalfSplit));
    expect_frequencies(rope, plain_frequencies(r, 10000 * std::pow(8.0L, Real(r) / Real(r - 2))));
  }
  // r = 2: the single pair has theta_0 = 1 whatever the base.
  const RotaryEmbedding<T> tiny(2, scaled(RotaryScaling::ntk_aware(8), 2, 10000, RotaryLayout::HalfSplit));
  expect_frequencies(tiny, {1.0L});
}

TYPED_TEST(RotaryTest, YarnScalingRampsBetweenInterpolationAndExtrapolation) {
  using T = TypeParam;
  const Index r = 64;
  const Real base = 10000, s = 4, context = 4096;
  const RotaryEmbedding<T> rope(
      r, scaled(RotaryScaling::yarn(4, 4096), r, static_cast<double>(base), RotaryLayout::HalfSplit));
  // YaRN (Peng et al. 2023, eq. 17-19; HF `_compute_yarn_parameters`): the pair index that turns
  // b times over the original context is c(b) = r ln(N / (2 pi b)) / (2 ln base);
  // lo = floor(c(32)), hi = ceil(c(1)). Here c(32) = 10.47 and c(1) = 22.51, so lo = 10, hi = 23.
  const auto turns_to_dim = [&](Real b) { return Real(r) * std::log(context / (2 * kPi * b)) / (2 * std::log(base)); };
  ASSERT_EQ(std::floor(turns_to_dim(32)), 10);
  ASSERT_EQ(std::ceil(turns_to_dim(1)), 23);
  const std::vector<Real> theta = plain_frequencies(r, base);
  std::vector<Real> expected(theta.size());
  for (std::size_t i = 0; i < theta.size(); ++i) {
    const Real ramp = std::min(Real(1), std::max(Real(0), (Real(i) - 10) / 13));  // 0: extrapolate, 1: interpolate
    expected[i] = theta[i] / s * ramp + theta[i] * (1 - ramp);
  }
  // apply() multiplies cos and sin by the attention factor m = 0.1 ln(s) + 1 (eq. 22).
  expect_frequencies(rope, expected, 0.1L * std::log(s) + 1);
  // Spot checks: fast pairs keep theta, slow pairs are divided by s.
  EXPECT_NEAR(rope.frequencies()(5), double(theta[5]), 1e-15);
  EXPECT_NEAR(rope.frequencies()(30), double(theta[30] / 4), 1e-15);
  EXPECT_NEAR(rope.attention_factor(), 0.1 * std::log(4.0) + 1, 1e-15);
  EXPECT_NEAR(rope.attention_factor(), 1.1386294361119891, 1e-15);
}

TYPED_TEST(RotaryTest, YarnCustomBetasMoveTheRamp) {
  using T = TypeParam;
  const Index r = 128;
  const Real base = 500000, s = 16, context = 8192;
  const RotaryEmbedding<T> rope(
      r, scaled(RotaryScaling::yarn(16, 8192, 64, 2), r, static_cast<double>(base), RotaryLayout::Interleaved));
  const auto turns_to_dim = [&](Real b) { return Real(r) * std::log(context / (2 * kPi * b)) / (2 * std::log(base)); };
  const Real lo = std::max(Real(0), std::floor(turns_to_dim(64)));
  const Real hi = std::min(Real(r - 1), std::ceil(turns_to_dim(2)));
  const std::vector<Real> theta = plain_frequencies(r, base);
  std::vector<Real> expected(theta.size());
  for (std::size_t i = 0; i < theta.size(); ++i) {
    const Real ramp = std::min(Real(1), std::max(Real(0), (Real(i) - lo) / (hi - lo)));
    expected[i] = theta[i] / s * ramp + theta[i] * (1 - ramp);
  }
  expect_frequencies(rope, expected, 0.1L * std::log(s) + 1);
  EXPECT_NEAR(rope.attention_factor(), 0.1 * std::log(16.0) + 1, 1e-15);
}

// YaRN against Hugging Face transformers (support/rope_reference.hpp, written from
// `_compute_yarn_parameters` and `apply_rotary_pos_emb`), with partial rotary: the first r
// features turn by inv_freq with cos and sin multiplied by the attention factor m, features
// r..d-1 pass through unscaled. So the logits of rotated features scale by m^2 and the others
// do not, which no attention scale reproduces. Positions below and past the cos/sin cache.
TYPED_TEST(RotaryTest, YarnMatchesHuggingFaceWithPartialRotary) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  struct Case {
    Index head_dim, rotary_dim;
    double base;
    attend::test::HfYarnConfig yarn;
  };
  const std::vector<Index> positions = {0, 1, 17, 4095, 4096, 9000, 32767, 70001};
  for (const Case& c :
       {Case{64, 32, 10000, {4, 2048, 32, 1, std::nullopt}}, Case{80, 20, 500000, {16, 8192, 64, 2, std::nullopt}},
        Case{64, 64, 10000, {8, 4096, 32, 1, std::nullopt}}})
    for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
      SCOPED_TRACE(std::string(name_of(layout)) + ", head_dim " + std::to_string(c.head_dim) + ", rotary_dim " +
                   std::to_string(c.rotary_dim) + ", factor " + std::to_string(double(c.yarn.factor)));
      const attend::test::HfYarnParameters hf = attend::test::hf_yarn_parameters(c.rotary_dim, c.base, c.yarn);
      const RotaryEmbedding<T> rope(c.head_dim,
                                    scaled(RotaryScaling::yarn(double(c.yarn.factor), c.yarn.original_max_position,
                                                               double(c.yarn.beta_fast), double(c.yarn.beta_slow)),
                                           c.rotary_dim, c.base, layout));
      const Matrix<T> x = random_matrix<T>(rng, static_cast<Index>(positions.size()), 3 * c.head_dim);
      Matrix<T> y = x;
      rope.apply(y, to_positions(positions));
      EXPECT_TRUE(
          matches(y, scalar_rotary(x, c.head_dim, c.rotary_dim, layout, positions, hf.inv_freq, hf.attention_factor)));
      EXPECT_NEAR(rope.attention_factor(), double(hf.attention_factor), 1e-15);
    }
}

// HF's `attention_factor`, when given, replaces 0.1 ln(s) + 1.
TYPED_TEST(RotaryTest, YarnTakesAGivenAttentionFactor) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const Index head_dim = 48, rotary_dim = 24;
  const std::vector<Index> positions = {0, 5, 5000};
  for (const long double given : {1.0L, 0.75L, 1.5L}) {
    SCOPED_TRACE("attention_factor " + std::to_string(double(given)));
    const attend::test::HfYarnParameters hf =
        attend::test::hf_yarn_parameters(rotary_dim, 10000, {8, 4096, 32, 1, given});
    EXPECT_EQ(hf.attention_factor, given);
    const RotaryEmbedding<T> rope(head_dim, scaled(RotaryScaling::yarn(8, 4096, 32, 1, double(given)), rotary_dim,
                                                   10000, RotaryLayout::HalfSplit));
    EXPECT_EQ(rope.attention_factor(), double(given));
    const Matrix<T> x = random_matrix<T>(rng, 3, head_dim);
    Matrix<T> y = x;
    rope.apply(y, to_positions(positions));
    EXPECT_TRUE(
        matches(y, scalar_rotary(x, head_dim, rotary_dim, RotaryLayout::HalfSplit, positions, hf.inv_freq, given)));
  }
}

// apply_transpose is R(p)^T = R(-p), times the same attention factor m: the scalar reference at
// the negated positions, in both layouts, with partial rotary and YaRN's m, cached and uncached
// positions; with m = 1 it undoes apply.
TYPED_TEST(RotaryTest, TransposeRotatesByTheNegatedAngles) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const Index head_dim = 64, rotary_dim = 32;
  const std::vector<Index> positions = {0, 1, 17, 4095, 4096, 9000, -3, 70001};
  std::vector<Index> negated;
  for (const Index p : positions) negated.push_back(-p);
  for (const bool yarn : {false, true})
    for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
      SCOPED_TRACE(std::string(name_of(layout)) + (yarn ? ", YaRN" : ", no scaling"));
      const attend::test::HfYarnParameters hf =
          attend::test::hf_yarn_parameters(rotary_dim, 10000, {yarn ? Real(4) : Real(1), 2048, 32, 1, std::nullopt});
      RotaryOptions options = options_with(layout, rotary_dim);
      if (yarn) options.scaling = RotaryScaling::yarn(4, 2048);
      const RotaryEmbedding<T> rope(head_dim, options);
      const std::vector<Real> theta = yarn ? hf.inv_freq : plain_frequencies(rotary_dim, 10000);
      const Real m = yarn ? hf.attention_factor : Real(1);
      const Matrix<T> x = random_matrix<T>(rng, static_cast<Index>(positions.size()), 3 * head_dim);
      Matrix<T> y = x;
      rope.apply_transpose(y, to_positions(positions));
      EXPECT_TRUE(matches(y, scalar_rotary(x, head_dim, rotary_dim, layout, negated, theta, m)));

      Matrix<T> by_offset = x, by_positions = x;
      rope.apply_transpose(by_offset, 4090);
      rope.apply_transpose(by_positions, to_positions(consecutive(4090, by_positions.rows())));
      EXPECT_EQ(by_offset, by_positions);
      if (!yarn) {
        Matrix<T> round_trip = x;
        rope.apply(round_trip, 4090);
        rope.apply_transpose(round_trip, 4090);
        EXPECT_TRUE(round_trip.isApprox(x, 8 * std::numeric_limits<T>::epsilon()));
      }
    }
}

TYPED_TEST(RotaryTest, Llama3ScalingByWavelength) {
  using T = TypeParam;
  // Llama 3.1 (Meta `apply_scaling`; HF `_compute_llama3_parameters`) with its defaults:
  // base 500000, r = 128, s = 8, low 1, high 4, N = 8192. Wavelengths 2 pi / theta_i below
  // N / 4 = 2048 keep theta_i (pairs 0..28), above N / 1 = 8192 use theta_i / 8 (pairs 35..63),
  // and in between mix (1 - g) theta / s + g theta with g = (N / wavelength - 1) / (4 - 1).
  const Index r = 128;
  const RotaryEmbedding<T> rope(r, scaled(RotaryScaling::llama3(), r, 500000, RotaryLayout::HalfSplit));
  const std::vector<Real> theta = plain_frequencies(r, 500000);
  std::vector<Real> expected(theta.size());
  for (std::size_t i = 0; i < theta.size(); ++i) {
    const Real wavelength = 2 * kPi / theta[i];
    if (i <= 28) {
      EXPECT_LT(wavelength, 2048) << i;
      expected[i] = theta[i];
    } else if (i >= 35) {
      EXPECT_GT(wavelength, 8192) << i;
      expected[i] = theta[i] / 8;
    } else {
      const Real g = (8192 / wavelength - 1) / 3;
      expected[i] = (1 - g) * theta[i] / 8 + g * theta[i];
    }
  }
  expect_frequencies(rope, expected);
  EXPECT_EQ(rope.attention_factor(), 1.0);
}

// ---- Weight permutation between layouts ----

// HF transformers' `permute` for Meta Llama checkpoints, written out: within each head, row
// t * (d/2) + i of the half-split weight is row 2i + t of the interleaved one.
template <class T>
Matrix<T> hf_permute(const Matrix<T>& w, Index head_dim) {
  Matrix<T> out(w.rows(), w.cols());
  for (Index head = 0; head < w.rows(); head += head_dim)
    for (Index i = 0; i < head_dim / 2; ++i)
      for (Index t = 0; t < 2; ++t) out.row(head + t * (head_dim / 2) + i) = w.row(head + 2 * i + t);
  return out;
}

TYPED_TEST(RotaryTest, WeightPermutationIsHfPermute) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  const Index head_dim = 8, heads = 3;
  const Matrix<T> w = random_matrix<T>(rng, heads * head_dim, 5);
  const Matrix<T> p = attend::permute_rotary_weight(w, head_dim, RotaryLayout::Interleaved, RotaryLayout::HalfSplit);
  EXPECT_EQ(p, hf_permute(w, head_dim));
  EXPECT_EQ(attend::permute_rotary_weight(p, head_dim, RotaryLayout::HalfSplit, RotaryLayout::Interleaved), w);
  EXPECT_EQ(attend::permute_rotary_weight(w, head_dim, RotaryLayout::HalfSplit, RotaryLayout::HalfSplit), w);
  // A bias permutes the same way.
  const attend::Vector<T> bias = w.col(0);
  const Matrix<T> permuted_bias =
      attend::permute_rotary_weight(bias, head_dim, RotaryLayout::Interleaved, RotaryLayout::HalfSplit);
  EXPECT_EQ(permuted_bias, p.col(0));
}

TYPED_TEST(RotaryTest, PermutedWeightsGiveSameRotaryScores) {
  using T = TypeParam;
  TRACE_SEED();
  auto rng = seeded_rng();
  for (const Index rotary_dim : {16, 8}) {
    SCOPED_TRACE("rotary_dim " + std::to_string(rotary_dim));
    const Index head_dim = 16, heads = 2, in = 24, length = 6;
    const Matrix<T> wq = random_matrix<T>(rng, heads * head_dim, in), wk = random_matrix<T>(rng, heads * head_dim, in);
    const Matrix<T> x = random_matrix<T>(rng, length, in);
    const auto to_half = [&](const Matrix<T>& w) {
      return attend::permute_rotary_weight(w, head_dim, RotaryLayout::Interleaved, RotaryLayout::HalfSplit, rotary_dim);
    };
    const RotaryEmbedding<T> interleaved(head_dim, options_with(RotaryLayout::Interleaved, rotary_dim));
    const RotaryEmbedding<T> half(head_dim, options_with(RotaryLayout::HalfSplit, rotary_dim));
    Matrix<T> q_i = x * wq.transpose(), k_i = x * wk.transpose();           // (L, H d), interleaved features
    Matrix<T> q_h = x * to_half(wq).transpose(), k_h = x * to_half(wk).transpose();  // half-split features
    interleaved.apply(q_i, 100);
    interleaved.apply(k_i, 90);
    half.apply(q_h, 100);
    half.apply(k_h, 90);
    // half(P W x) = P interleaved(W x): P permutes columns (features) here.
    const Matrix<T> p_q_i = to_half(Matrix<T>(q_i.transpose())).transpose();
    const Real tol = 64 * eps<T>() * std::max(Real(1), Real(q_i.cwiseAbs().maxCoeff()));
    EXPECT_LE(Real((q_h - p_q_i).cwiseAbs().maxCoeff()), tol);
    // Tail rows (features >= rotary_dim) keep their place.
    for (Index h = 0; h < heads; ++h)
      EXPECT_EQ(to_half(wq).middleRows(h * head_dim + rotary_dim, head_dim - rotary_dim),
                wq.middleRows(h * head_dim + rotary_dim, head_dim - rotary_dim));
    // Scores per head are the same.
    for (Index h = 0; h < heads; ++h) {
      const Matrix<T> s_i = q_i.middleCols(h * head_dim, head_dim) * k_i.middleCols(h * head_dim, head_dim).transpose();
      const Matrix<T> s_h = q_h.middleCols(h * head_dim, head_dim) * k_h.middleCols(h * head_dim, head_dim).transpose();
      EXPECT_LE(Real((s_i - s_h).cwiseAbs().maxCoeff()), 64 * eps<T>() * Real(s_i.cwiseAbs().maxCoeff()) * 16)
          << "head " << h;
    }
  }
}

// ---- Errors ----

TYPED_TEST(RotaryTest, RejectsBadDimensions) {
  using T = TypeParam;
  expect_invalid([] { RotaryEmbedding<T>(8, options_with(RotaryLayout::HalfSplit, 5)); }, {"rotary_dim 5", "head_dim 8"});
  expect_invalid([] { RotaryEmbedding<T>(8, options_with(RotaryLayout::Interleaved, 10)); },
                 {"rotary_dim 10", "head_dim 8"});
  expect_invalid([] { RotaryEmbedding<T>(7); }, {"rotary_dim 7", "head_dim 7"});  // odd head, full rotary
  expect_invalid([] { RotaryEmbedding<T>(8, options_with(RotaryLayout::HalfSplit, 0)); }, {"rotary_dim 0"});
  expect_invalid([] { RotaryEmbedding<T>(0); }, {"head_dim must be at least 1, got 0"});
  const RotaryEmbedding<T> rope(8);
  Matrix<T> x = Matrix<T>::Zero(3, 12);
  expect_invalid([&] { rope.apply(x, 0); }, {"(3 x 12)", "head_dim 8"});
  Matrix<T> y = Matrix<T>::Zero(3, 16);
  const Positions two = Positions::Constant(2, 1);
  expect_invalid([&] { rope.apply(y, two); }, {"2 positions", "(3 x 16)"});
}

// Row r sits at start_position + r: a start whose last row would pass INT64_MAX is rejected
// (the sum overflowed before), and the cache is untouched; the last valid positions work.
TYPED_TEST(RotaryTest, RejectsStartPositionsWhoseRowsOverflow) {
  using T = TypeParam;
  const Index max = std::numeric_limits<Index>::max();
  const RotaryEmbedding<T> rope(8);
  const Matrix<T> x = Matrix<T>::Ones(3, 16);
  Matrix<T> y = x;
  expect_invalid([&] { rope.apply(y, max - 1); },
                 {"start_position 9223372036854775806", "3 rows", "9223372036854775807"});
  expect_invalid([&] { rope.apply(y, max); }, {"start_position 9223372036854775807", "3 rows"});
  EXPECT_EQ(y, x);
  rope.apply(y, max - 2);  // rows at max - 2, max - 1, max
  Matrix<T> by_positions = x;
  rope.apply(by_positions, to_positions({max - 2, max - 1, max}));
  EXPECT_EQ(y, by_positions);
  Matrix<T> one_row = x.topRows(1), none = x.topRows(0);
  rope.apply(one_row, max);
  rope.apply(none, max);
  EXPECT_EQ(one_row, by_positions.bottomRows(1));
  Matrix<T> at_min = x;  // rows at INT64_MIN, INT64_MIN + 1, ...: no overflow
  rope.apply(at_min, std::numeric_limits<Index>::min());
  Matrix<T> at_min_by_positions = x;
  rope.apply(at_min_by_positions,
             to_positions({std::numeric_limits<Index>::min(), std::numeric_limits<Index>::min() + 1,
                           std::numeric_limits<Index>::min() + 2}));
  EXPECT_EQ(at_min, at_min_by_positions);
}

TYPED_TEST(RotaryTest, RejectsBadParameters) {
  using T = TypeParam;
  const auto with = [](const RotaryScaling& s) { return scaled(s, 8, 10000, RotaryLayout::HalfSplit); };
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::linear(0.5))); }, {"factor", "0.5"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::ntk_aware(0))); }, {"factor", "got 0"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(std::nan(""), 4096))); }, {"factor", "nan"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::llama3(-2))); }, {"factor", "-2"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(4, 4096, 1, 32))); },
                 {"beta_fast 1", "beta_slow 32"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(4, 0))); }, {"original_max_position", "got 0"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(4, 4096, 32, 1, 0.0))); },
                 {"attention_factor", "got 0"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(4, 4096, 32, 1, std::nan("")))); },
                 {"attention_factor", "nan"});
  if (std::is_same_v<T, float>)  // m cos and m sin must be finite in T
    expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::yarn(4, 4096, 32, 1, 1e39))); },
                   {"attention_factor 1e+39", "float"});
  expect_invalid([&] { RotaryEmbedding<T>(8, with(RotaryScaling::llama3(8, 8192, 4, 1))); },
                 {"low_freq_factor 4", "high_freq_factor 1"});
  RotaryOptions bad_base;
  bad_base.base = 1;
  expect_invalid([&] { RotaryEmbedding<T>(8, bad_base); }, {"base", "got 1"});
  RotaryOptions bad_cache;
  bad_cache.cache_length = -1;
  expect_invalid([&] { RotaryEmbedding<T>(8, bad_cache); }, {"cache_length", "-1"});
  const Matrix<T> w = Matrix<T>::Zero(12, 4);
  expect_invalid([&] { attend::permute_rotary_weight(w, 8, RotaryLayout::Interleaved, RotaryLayout::HalfSplit); },
                 {"(12 x 4)", "head_dim 8"});
  expect_invalid(
      [&] { attend::permute_rotary_weight(w, 4, RotaryLayout::Interleaved, RotaryLayout::HalfSplit, Index(3)); },
      {"rotary_dim 3", "head_dim 4"});
}

}  // namespace
