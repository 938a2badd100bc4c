// SPDX-License-Identifier: MIT
// ALiBi and T5 relative position biases: slopes and buckets against values derived by hand and
// by integer arithmetic, and attention with each bias against the long-double reference.
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/scaled_dot_product.hpp>
#include <attend/biases.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class BiasTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BiasTest, Scalars);

void expect_throw(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << fragment;
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// The slopes published with ALiBi: 8 heads give 1/2, 1/4, ..., 1/256; 12 heads add the odd
// powers 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 of the 16-head sequence after the 8-head slopes.
TEST(AlibiSlopes, MatchThePaper) {
  std::vector<double> eight;
  for (int h = 1; h <= 8; ++h) eight.push_back(std::ldexp(1.0, -h));
  EXPECT_EQ(alibi_slopes(8), eight);
  std::vector<double> twelve = eight;
  for (const double e : {-0.5, -1.5, -2.5, -3.5}) twelve.push_back(std::pow(2.0, e));
  const std::vector<double> got = alibi_slopes(12);
  ASSERT_EQ(got.size(), twelve.size());
  for (std::size_t h = 0; h < got.size(); ++h) EXPECT_DOUBLE_EQ(got[h], twelve[h]) << "head " << h;
  EXPECT_EQ(alibi_slopes(1), std::vector<double>{std::ldexp(1.0, -8)});
  EXPECT_EQ(alibi_slopes(6), (std::vector<double>{0.25, 1.0 / 16, 1.0 / 64, 1.0 / 256, 0.5, 0.125}));
  expect_throw([] { alibi_slopes(0); }, "num_heads=0");
}

// Bidirectional, 32 buckets, max distance 128 (T5's default): buckets 0-15 for d <= 0 and 16-31
// for d > 0; |d| < 8 exact, then bucket 8 + m for the largest m with 8 * 2^(m/2) <= |d|, i.e.
// 64 * 2^m <= d^2 (integer arithmetic, no logarithm), capped at 15.
TEST(RelativePositionBucket, MatchesT5DefaultsExactly) {
  for (Index d = -400; d <= 400; ++d) {
    const Index a = std::abs(d);
    Index expected = a;
    if (a >= 8) {
      Index m = 0;
      while (m + 1 <= 7 && (Index(64) << (m + 1)) <= a * a) ++m;
      expected = 8 + m;
    }
    expected += d > 0 ? 16 : 0;
    EXPECT_EQ(relative_position_bucket(d), expected) << "d=" << d;
  }
  // Hand-checked points: the first log bucket, each doubling, and the cap.
  EXPECT_EQ(relative_position_bucket(-7), 7);
  EXPECT_EQ(relative_position_bucket(-8), 8);
  EXPECT_EQ(relative_position_bucket(-16), 10);
  EXPECT_EQ(relative_position_bucket(-64), 14);
  EXPECT_EQ(relative_position_bucket(-127), 15);
  EXPECT_EQ(relative_position_bucket(1000), 31);
}

// Unidirectional (decoder), 32 buckets, max distance 128: d > 0 is bucket 0; |d| < 16 exact;
// then 16 + floor(log(|d| / 16) / log(8) * 16), capped at 31. No integer |d| in (16, 128) sits on
// a bucket edge, so a long-double evaluation is exact here.
TEST(RelativePositionBucket, MatchesT5DecoderConfiguration) {
  for (Index d = -300; d <= 50; ++d) {
    const Index a = d < 0 ? -d : 0;
    Index expected = a;
    if (a >= 16)
      expected = std::min<Index>(31, 16 + Index(std::floor(std::log(Real(a) / 16) / std::log(Real(8)) * 16)));
    EXPECT_EQ(relative_position_bucket(d, false, 32, 128), expected) << "d=" << d;
  }
  expect_throw([] { relative_position_bucket(0, true, 3, 128); }, "num_buckets=3");
  expect_throw([] { relative_position_bucket(0, false, 32, 16); }, "max_distance=16");
}

// ---------------------------------------------------------------------------------------------
// Issue #11: extreme arguments are rejected or defined, never UB

// alibi_slopes(2^62) doubled n past INT64_MAX (UB; it never returned). More heads than any array
// of slopes can hold (PTRDIFF_MAX bytes) are an invalid argument.
TEST(AlibiSlopes, RejectHeadCountsBeyondAnyArray) {
  expect_throw([] { alibi_slopes(Index(1) << 62); }, "(4611686018427387904 x 1)");
  expect_throw([] { alibi_slopes(std::numeric_limits<Index>::max()); }, "PTRDIFF_MAX");
}

// |INT64_MIN| is no Index: the bucket of INT64_MIN came out negative. Every position beyond
// max_distance shares the last bucket of its half.
TEST(RelativePositionBucket, ExtremePositionsFallInTheLastBucket) {
  constexpr Index kMin = std::numeric_limits<Index>::min(), kMax = std::numeric_limits<Index>::max();
  EXPECT_EQ(relative_position_bucket(kMin), 15);
  EXPECT_EQ(relative_position_bucket(kMin + 1), 15);
  EXPECT_EQ(relative_position_bucket(kMax), 31);
  EXPECT_EQ(relative_position_bucket(kMin, false, 32, 128), 31);
  EXPECT_EQ(relative_position_bucket(kMax, false, 32, 128), 0);
  // max_distance / max_exact = 1 + 2^-60 rounds to 1: the logarithmic bin count is inf, which
  // used to be cast to an Index (UB, a negative bucket on x86).
  const Index buckets = Index(1) << 62, max_exact = Index(1) << 60;  // halves of 2^61 buckets
  EXPECT_EQ(relative_position_bucket(Index(1) << 61, true, buckets, max_exact + 1), buckets - 1);
  EXPECT_EQ(relative_position_bucket(-(Index(1) << 61), true, buckets, max_exact + 1), buckets / 2 - 1);
}

// A slope finite as a double but not as a float (1e39) turned every float score into NaN. A mask
// has no scalar type, so the slope must be finite as a float for both scalars, as scales and caps
// must be finite in T.
TYPED_TEST(BiasTest, RejectsAlibiSlopesBeyondFloat) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 2), k = Matrix<T>::Ones(4, 2), v = Matrix<T>::Random(4, 3);
  for (const double slope : {1e39, -1e39, std::numeric_limits<double>::infinity()})
    expect_throw([&] { scaled_dot_product_attention(q, k, v, Alibi(slope)); }, "finite as a float");
  expect_throw([&] { scaled_dot_product_attention(q, k, v, Alibi(1e39)); }, "ALiBi slope 1e+39");
  // The largest accepted slope: every key but the aligned one drops out of the softmax (float
  // -inf, double -3.4e38 |d|), so each query returns its aligned key's value exactly.
  const Matrix<T> out = scaled_dot_product_attention(q, k, v, Alibi(std::numeric_limits<float>::max()));
  EXPECT_EQ(out, v);
}

template <class T>
std::vector<AttentionOptions> paths() {
  return {materialized_path(), blocked_path(), blocked_path(7, 16), blocked_path(1, 5)};
}

/// Runs scaled dot-product attention with `bias & mask` and returns output and lse.
template <class T, class Q, class K, class V, class Bias>
auto sdpa_with(const Q& q, const K& k, const V& v, const Bias& bias) {
  return [&q, &k, &v, bias](const auto& mask, const AttentionOptions& options) {
    return scaled_dot_product_attention_with_lse(q, k, v, bias & mask, options);
  };
}

TYPED_TEST(BiasTest, AlibiMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index d = 8, dv = 4;
  for (const auto& [lq, lk] : std::vector<std::pair<Index, Index>>{{33, 33}, {17, 70}, {40, 9}})
    for (const Alignment alignment : {Alignment::TopLeft, Alignment::BottomRight}) {
      const double slope = rng.pick(alibi_slopes(12));
      SCOPED_TRACE("slope " + std::to_string(slope) + " " + alignment_name(alignment));
      const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
      const Real scale = 1 / std::sqrt(Real(d));
      RealMatrix ref_scores = scale * (q.template cast<Real>() * k.template cast<Real>().transpose());
      Matrix<T> base_scores = T(scale) * (q * k.transpose());
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
          const Index distance = std::abs(j - aligned_key(i, lq, lk, alignment));
          ref_scores(i, j) -= Real(slope) * Real(distance);
          base_scores(i, j) -= T(slope) * T(distance);
        }
      check_scores<T>(ref_scores, base_scores, v, paths<T>(), rng, sdpa_with<T>(q, k, v, Alibi(slope, alignment)));
    }
  expect_throw([] { Alibi(std::nan("")).bind(2, 2); }, "slope");
}

// The table is one head's column of a (num_buckets, num_heads) row-major embedding: a strided
// view, as PyTorch's relative_attention_bias.weight loads.
TYPED_TEST(BiasTest, RelativePositionBiasMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index d = 8, dv = 3, heads = 3, head = 1;
  for (const bool bidirectional : {true, false})
    for (const auto& [lq, lk, alignment] : std::vector<std::tuple<Index, Index, Alignment>>{
             {40, 40, Alignment::TopLeft}, {9, 150, Alignment::BottomRight}, {70, 20, Alignment::TopLeft}}) {
      const Index num_buckets = 16, max_distance = 48;
      SCOPED_TRACE(std::string(bidirectional ? "bidirectional " : "causal ") + alignment_name(alignment));
      const Matrix<T> table = rng.normal<T>(num_buckets, heads);
      const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
      const Real scale = 1 / std::sqrt(Real(d));
      RealMatrix ref_scores = scale * (q.template cast<Real>() * k.template cast<Real>().transpose());
      Matrix<T> base_scores = T(scale) * (q * k.transpose());
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) {
          const Index b = relative_position_bucket(j - aligned_key(i, lq, lk, alignment), bidirectional, num_buckets,
                                                   max_distance);
          ref_scores(i, j) += Real(table(b, head));
          base_scores(i, j) += table(b, head);
        }
      check_scores<T>(ref_scores, base_scores, v, paths<T>(), rng,
                      sdpa_with<T>(q, k, v, RelativePositionBias(table.col(head), bidirectional, max_distance, alignment)));
    }
  const Matrix<T> table = Matrix<T>::Ones(4, 2);  // the tables of two heads, in a call of one
  expect_throw([&] { RelativePositionBias(table).bind(3, 3); }, "table of 2 heads (num_buckets x num_heads = 4 x 2)");
  const Vector<T> tiny = Vector<T>::Ones(2);
  expect_throw([&] { RelativePositionBias(tiny).bind(3, 3); }, "num_buckets=2");
}

// Biases compose with each other and with masks through `&`: both add, the mask hides.
TYPED_TEST(BiasTest, BiasesComposeWithEachOtherAndMasks) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 45, lk = 45, d = 8, dv = 4;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const Vector<T> table = rng.normal<T>(32, 1);
  const double slope = 0.25;
  RealMatrix ref_scores = (q.template cast<Real>() * k.template cast<Real>().transpose()) / std::sqrt(Real(d));
  Matrix<T> base_scores = (q * k.transpose()) / std::sqrt(T(d));
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      const T bias = table(relative_position_bucket(j - i)) - T(slope) * T(std::abs(j - i));
      ref_scores(i, j) += Real(table(relative_position_bucket(j - i))) - Real(slope) * Real(std::abs(j - i));
      base_scores(i, j) += bias;
    }
  const BoolMatrix causal = causal_visibility(lq, lk, Alignment::TopLeft);
  const Reference ref = reference_from_scores(ref_scores, v, causal);
  const Baseline<T> base = baseline_from_scores<T>(base_scores, v, causal);
  for (const AttentionOptions& options : paths<T>()) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> r =
        scaled_dot_product_attention_with_lse(q, k, v, Alibi(slope) & Causal() & RelativePositionBias(table), options);
    expect_matches_reference<T>(r.output, r.lse, ref, base);
  }
}

}  // namespace
