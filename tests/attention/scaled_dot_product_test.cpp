// SPDX-License-Identifier: MIT
// Scaled dot-product attention against the long-double reference: a sampled grid of lengths,
// head dimensions, masks and memory layouts through both execution paths, and property tests
// with exact or eps-bounded answers.
#include "support/attention_case.hpp"
#include "support/overflow_case.hpp"
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/scaled_dot_product.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

const std::vector<Index> kLengths{0, 1, 2, 3, 7, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 257};
const std::vector<Index> kHeadDims{1, 3, 8, 31, 64, 96, 128};
const std::vector<Index> kTileSizes{1, 7, 16, 64};

template <class T>
class ScaledDotProductTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(ScaledDotProductTest, Scalars);

/// Materialized, blocked with default tiles, and blocked with tiles drawn from kTileSizes.
std::vector<AttentionOptions> sampled_paths(Rng& rng) {
  return {materialized_path(), blocked_path(), blocked_path(rng.pick(kTileSizes), rng.pick(kTileSizes))};
}

// Every length, each paired with two partner lengths (both ways round, so Lq < Lk and Lq > Lk),
// a rotating head dimension (d_v != d_k in every other case) and a rotating mask.
TYPED_TEST(ScaledDotProductTest, EveryLengthMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<MaskSpec> specs = all_mask_specs();
  for (std::size_t i = 0; i < kLengths.size(); ++i)
    for (std::size_t j = 0; j < 2; ++j) {
      const Index length = kLengths[i], partner = cycle(kLengths, i * 5 + j * 7 + 3);
      const Index dk = cycle(kHeadDims, i + j), dv = j == 0 ? dk : cycle(kHeadDims, i + j + 3);
      check_case<T>(length, partner, dk, dv, cycle(specs, 2 * i + j), sampled_paths(rng), rng);
      check_case<T>(partner, length, dk, dv, cycle(specs, 2 * i + j + 7), sampled_paths(rng), rng);
    }
}

// Every mask kind (both alignments) over square, nearly square and very unequal length pairs.
TYPED_TEST(ScaledDotProductTest, EveryMaskMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<std::pair<Index, Index>> pairs{{16, 16}, {31, 33}, {65, 17}, {3, 129}, {129, 128}};
  const std::vector<Index> dims{8, 31, 64, 3, 96};
  const std::vector<MaskSpec> specs = all_mask_specs();
  for (std::size_t s = 0; s < specs.size(); ++s)
    for (std::size_t p = 0; p < pairs.size(); ++p) {
      const Index dk = cycle(dims, s + p), dv = cycle(dims, s + 2 * p + 1);
      check_case<T>(pairs[p].first, pairs[p].second, dk, dv, specs[s], sampled_paths(rng), rng);
    }
}

// Every head dimension, with d_v = d_k and with d_v != d_k.
TYPED_TEST(ScaledDotProductTest, EveryHeadDimMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<MaskSpec> specs = all_mask_specs();
  for (std::size_t i = 0; i < kHeadDims.size(); ++i) {
    const Index dk = kHeadDims[i];
    check_case<T>(33, 65, dk, dk, cycle(specs, 3 * i), sampled_paths(rng), rng);
    check_case<T>(65, 33, dk, cycle(kHeadDims, i + 2), cycle(specs, 3 * i + 1), sampled_paths(rng), rng);
  }
}

// `a & b` and `b & a` for every pair of built-in masks and biases, with +inf, NaN and -inf planted
// in each operand's data where only the other hides the key: each order gives the intersection's
// reference on both paths (tiles small enough that most are partial), weights included. A NaN at
// one key both let through still makes its row NaN (output and log-sum-exp; the weights of a NaN
// row are not compared).
TYPED_TEST(ScaledDotProductTest, ComposedMasksHideWhateverTheOtherOperandHolds) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<OperandKind> kinds = all_operand_kinds();
  const std::vector<AttentionOptions> paths{materialized_path(), blocked_path(), blocked_path(7, 5)};
  for (std::size_t a = 0; a < kinds.size(); ++a)
    for (std::size_t b = a; b < kinds.size(); ++b) {
      const Index lq = (a + b) % 2 == 0 ? 19 : 40, lk = 40;
      const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 5);
      with_mask_pair<T>(
          kinds[a], kinds[b], lq, lk, Alignment::BottomRight, false, rng,
          [&](const auto& mask, const MaskCase& c) { check_inputs<T>(q, k, v, mask, c, paths, !c.bias.has_value()); });
      with_mask_pair<T>(
          kinds[a], kinds[b], lq, lk, Alignment::TopLeft, true, rng, [&](const auto& mask, const MaskCase& c) {
            SCOPED_TRACE(c.description + " Lq=" + std::to_string(lq));
            const Reference ref = reference_attention(q, k, v, 1 / std::sqrt(Real(8)), c.visible, c.bias);
            const Baseline<T> base = baseline_attention<T>(q, k, v, T(1) / std::sqrt(T(8)), c.visible, c.bias);
            for (const AttentionOptions& options : paths) {
              SCOPED_TRACE(describe(options));
              const AttentionResult<T> r = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
              expect_matches_reference<T>(r.output, r.lse, ref, base, false);
            }
            const AttentionResult<T> w = scaled_dot_product_attention_with_weights(q, k, v, mask);
            expect_matches_reference<T>(w.output, w.lse, ref, base, false);
          });
    }
}

// Inputs as blocks of larger matrices, behind a padded outer stride, unaligned, and column-major;
// masks as column-major and sub-block views. Each path must match the reference and give exactly
// what it gives on contiguous copies.
TYPED_TEST(ScaledDotProductTest, StridedViewsMatchContiguousCopies) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 37, lk = 70, dk = 24, dv = 20;
  const Matrix<T> big_q = rng.normal<T>(lq + 5, dk + 9);
  const auto q = big_q.block(3, 4, lq, dk);  // sub-block
  const Matrix<T> k_storage = rng.normal<T>(lk * (dk + 13) + 1, 1);
  using StridedMap = Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
  const StridedMap k(k_storage.data() + 1, lk, dk, Eigen::OuterStride<>(dk + 13));  // padded, unaligned
  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> v = rng.normal<T>(lk, dv);
  const Matrix<T> q_copy = q, k_copy = k, v_copy = v;

  const Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> visible_cm = rng.bernoulli(lq, lk, 0.6);
  const BoolMatrix visible = visible_cm;
  Matrix<T> big_bias = rng.normal<T>(lq + 4, lk + 6, 3.0);
  const auto bias = big_bias.block(2, 5, lq, lk);
  const Matrix<T> bias_copy = bias;

  const std::vector<AttentionOptions> paths{materialized_path(), blocked_path(), blocked_path(16, 7)};
  const auto check = [&](const auto& mask, const auto& contiguous_mask, const MaskCase& c) {
    check_inputs<T>(q, k, v, mask, c, paths, !c.bias.has_value());
    for (const AttentionOptions& options : paths) {
      SCOPED_TRACE(describe(options) + " " + c.description);
      const AttentionResult<T> strided = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
      const AttentionResult<T> contiguous =
          scaled_dot_product_attention_with_lse(q_copy, k_copy, v_copy, contiguous_mask, options);
      EXPECT_TRUE(identical(strided.output, contiguous.output));
      EXPECT_TRUE(identical(strided.lse, contiguous.lse));
    }
  };
  check(NoMask{}, NoMask{}, MaskCase{"NoMask", all_visible(lq, lk), std::nullopt, false});
  check(BooleanMask(visible_cm), BooleanMask(visible),
        MaskCase{"column-major BooleanMask", visible, std::nullopt, false});
  check(AdditiveMask(bias), AdditiveMask(bias_copy),
        MaskCase{"sub-block AdditiveMask", all_visible(lq, lk), bias_copy.template cast<Real>(), false});
}

// ---------------------------------------------------------------------------------------------
// Properties

template <class T>
Real eps() {
  return std::numeric_limits<T>::epsilon();
}

template <class A>
Real max_abs(const A& a) {
  return a.size() == 0 ? Real(0) : Real(a.cwiseAbs().maxCoeff());
}

// Permuting keys and values together, with the mask's columns, permutes the terms of every sum:
// the output changes only by rounding.
TYPED_TEST(ScaledDotProductTest, PermutingKeysAndValuesChangesNothing) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 37, lk = 70, dk = 16, dv = 12;
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  const std::vector<Index> perm = rng.permutation(lk);
  Matrix<T> k_perm(lk, dk), v_perm(lk, dv);
  for (Index j = 0; j < lk; ++j) {
    k_perm.row(j) = k.row(perm[std::size_t(j)]);
    v_perm.row(j) = v.row(perm[std::size_t(j)]);
  }
  const auto permute_columns = [&](const auto& m) {
    std::decay_t<decltype(m)> p(m.rows(), m.cols());
    for (Index j = 0; j < lk; ++j) p.col(j) = m.col(perm[std::size_t(j)]);
    return p;
  };
  const BoolMatrix visible = window_visibility(lq, lk, 9, 4, Alignment::BottomRight).array() &&
                             rng.bernoulli(lq, lk, 0.8).array();
  const BoolMatrix visible_perm = permute_columns(visible);
  Matrix<T> bias = rng.normal<T>(lq, lk, 3.0);
  bias.col(5).setConstant(-std::numeric_limits<T>::infinity());
  const Matrix<T> bias_perm = permute_columns(bias);
  const Real bound = 2 * eps<T>() * Real(lk + dk) * max_abs(v);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(7, 16)}) {
    SCOPED_TRACE(describe(options));
    const auto expect_same = [&](const AttentionResult<T>& a, const AttentionResult<T>& b) {
      EXPECT_LE(max_abs_error(a.output, b.output), bound);
      EXPECT_LE(max_abs_error(a.lse, b.lse), 4 * eps<T>() * (1 + max_abs(a.lse)));
    };
    expect_same(scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options),
                scaled_dot_product_attention_with_lse(q, k_perm, v_perm, NoMask{}, options));
    expect_same(scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(visible), options),
                scaled_dot_product_attention_with_lse(q, k_perm, v_perm, BooleanMask(visible_perm), options));
    expect_same(scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(bias), options),
                scaled_dot_product_attention_with_lse(q, k_perm, v_perm, AdditiveMask(bias_perm), options));
  }
}

// The scale multiplies the queries before the dot products on every path (as the blocked path packs
// them): scores that <q, k> alone would overflow to inf are exact, through each entry point and
// through Auto on both sides of its switch (Lk = 3 materialized, Lk = 32769 blocked).
TYPED_TEST(ScaledDotProductTest, ScaleAppliesToQueriesBeforeTheProduct) {
  using T = TypeParam;
  for (const Index lk : {Index(3), Index(32769)}) {
    const OverflowCase<T> c = overflow_case<T>(lk);
    const BoolMatrix all = all_visible(2, lk);
    const Reference ref = reference_from_scores(c.scores, c.v, all);
    const Baseline<T> base = baseline_from_scores<T>(c.scores.template cast<T>(), c.v, all);
    AttentionOptions automatic;
    automatic.scale = c.scale;
    std::vector<AttentionOptions> paths{automatic, materialized_path(), blocked_path(), blocked_path(1, 2)};
    if (lk > 3) paths.resize(1);
    for (AttentionOptions& options : paths) {
      options.scale = c.scale;
      SCOPED_TRACE(describe(options) + " Lk=" + std::to_string(lk));
      // (Rows of 32769 float terms round like the baseline's: the unit-variance cap does not apply.)
      const AttentionResult<T> r = scaled_dot_product_attention_with_lse(c.q, c.k, c.v, NoMask{}, options);
      expect_matches_reference<T>(r.output, r.lse, ref, base, false);
      expect_matches_reference<T>(scaled_dot_product_attention(c.q, c.k, c.v, NoMask{}, options), Vector<T>(), ref,
                                  base, false);
    }
    if (lk > 3) continue;
    const AttentionResult<T> w = scaled_dot_product_attention_with_weights(c.q, c.k, c.v, NoMask{}, automatic);
    expect_matches_reference<T>(w.output, w.lse, ref, base);
    EXPECT_TRUE(within_tolerance<T>(w.weights, ref.weights, base.weights)) << "weights";
  }
}

// Scale 0 makes every visible score 0, so each row is the mean of the values of its visible keys.
TYPED_TEST(ScaledDotProductTest, ScaleZeroGivesMeanOfVisibleValues) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 29, lk = 45, dk = 8, dv = 6;
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  const BoolMatrix random = rng.bernoulli(lq, lk, 0.5);
  const auto check = [&](const auto& mask, const BoolMatrix& visible, const std::string& name) {
    for (AttentionOptions options : {materialized_path(), blocked_path(), blocked_path(4, 8)}) {
      SCOPED_TRACE(describe(options) + " " + name);
      options.scale = 0.0;
      const Matrix<T> out = scaled_dot_product_attention(q, k, v, mask, options);
      for (Index i = 0; i < lq; ++i) {
        RealVector mean = RealVector::Zero(dv);
        Index n = 0;
        for (Index j = 0; j < lk; ++j)
          if (visible(i, j)) {
            mean += v.row(j).transpose().template cast<Real>();
            ++n;
          }
        if (n > 0) mean /= Real(n);
        for (Index c = 0; c < dv; ++c)
          EXPECT_LE(std::fabs(Real(out(i, c)) - mean(c)), 4 * eps<T>() * Real(lk) * max_abs(v))
              << "row " << i << " col " << c;
      }
    }
  };
  check(NoMask{}, all_visible(lq, lk), "NoMask");
  check(Causal(Alignment::BottomRight), causal_visibility(lq, lk, Alignment::BottomRight), "Causal(BottomRight)");
  check(KeyPadding(17), padding_visibility(lq, lk, 17), "KeyPadding(17)");
  check(BooleanMask(random), random, "BooleanMask");
}

// Constant values give that constant on every row that sees a key, and 0 on the others.
TYPED_TEST(ScaledDotProductTest, ConstantValuesGiveConstantOutput) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 40, lk = 51, dk = 16, dv = 5;
  const T value = T(-1.75);
  const Matrix<T> q = rng.normal<T>(lq, dk, 2.0), k = rng.normal<T>(lk, dk, 2.0);
  const Matrix<T> v = Matrix<T>::Constant(lk, dv, value);
  for (const MaskSpec& spec : all_mask_specs())
    with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
      for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 7)}) {
        SCOPED_TRACE(describe(options) + " " + c.description);
        const Matrix<T> out = scaled_dot_product_attention(q, k, v, mask, options);
        for (Index i = 0; i < lq; ++i) {
          const Real expected = c.visible.row(i).any() ? Real(value) : Real(0);
          for (Index j = 0; j < dv; ++j)
            EXPECT_LE(std::fabs(Real(out(i, j)) - expected), 4 * eps<T>() * Real(lk) * std::fabs(Real(value)))
                << "row " << i;
        }
      }
    });
}

// A window reaching past both ends of the sequence (up to the largest Index) is no mask at all:
// exactly the same result.
TYPED_TEST(ScaledDotProductTest, WindowAtLeastLengthEqualsFullAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const auto& [lq, lk] : std::vector<std::pair<Index, Index>>{{50, 50}, {20, 70}, {70, 20}}) {
    const Matrix<T> q = rng.normal<T>(lq, 16), k = rng.normal<T>(lk, 16), v = rng.normal<T>(lk, 8);
    const Index length = std::max(lq, lk);
    for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(16, 7)})
      for (Alignment a : {Alignment::TopLeft, Alignment::BottomRight}) {
        SCOPED_TRACE(describe(options) + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " " +
                     alignment_name(a));
        const AttentionResult<T> full = scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options);
        constexpr Index kHuge = std::numeric_limits<Index>::max();  // must not overflow the band
        for (const Window& w : {Window(length, length, a), Window(length + 5, -1, a), Window(-1, -1, a),
                                Window(kHuge, kHuge, a), Window(-1, kHuge, a), Window(kHuge, -1, a)}) {
          const AttentionResult<T> windowed = scaled_dot_product_attention_with_lse(q, k, v, w, options);
          EXPECT_TRUE(identical(windowed.output, full.output)) << "Window(" << w.left << ", " << w.right << ")";
          EXPECT_TRUE(identical(windowed.lse, full.lse));
        }
      }
  }
}

// With one query, bottom-right causal aligns it with the last key, so it sees every key.
TYPED_TEST(ScaledDotProductTest, BottomRightCausalWithOneQueryEqualsFullAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (Index lk : {1, 17, 300}) {
    const Matrix<T> q = rng.normal<T>(1, 32), k = rng.normal<T>(lk, 32), v = rng.normal<T>(lk, 16);
    for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(1, 7)}) {
      SCOPED_TRACE(describe(options) + " Lk=" + std::to_string(lk));
      const AttentionResult<T> full = scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options);
      const AttentionResult<T> causal =
          scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options);
      EXPECT_TRUE(identical(causal.output, full.output));
      EXPECT_TRUE(identical(causal.lse, full.lse));
      EXPECT_TRUE(full.output.allFinite());
    }
  }
}

// Rows that see no key (at the start, middle and end) are exactly 0 with lse -inf; the rest are not.
TYPED_TEST(ScaledDotProductTest, FullyMaskedRowsAreExactlyZero) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 50, lk = 40;
  const Matrix<T> q = rng.normal<T>(lq, 8), k = rng.normal<T>(lk, 8), v = rng.normal<T>(lk, 4);
  BoolMatrix visible = rng.bernoulli(lq, lk, 0.7);
  const std::vector<Index> hidden{0, 1, 2, 24, 25, 49};
  for (Index i : hidden) visible.row(i).setConstant(false);
  Matrix<T> bias = rng.normal<T>(lq, lk);
  for (Index i : hidden) bias.row(i).setConstant(-std::numeric_limits<T>::infinity());
  for (const AttentionOptions& options : {materialized_path(), blocked_path(), blocked_path(3, 8), blocked_path(1, 1)}) {
    SCOPED_TRACE(describe(options));
    for (const AttentionResult<T>& r : {scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(visible), options),
                                        scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(bias), options)}) {
      for (Index i = 0; i < lq; ++i) {
        const bool is_hidden = std::find(hidden.begin(), hidden.end(), i) != hidden.end();
        if (is_hidden) {
          EXPECT_TRUE((r.output.row(i).array() == T(0)).all()) << "row " << i;
          EXPECT_EQ(r.lse(i), -std::numeric_limits<T>::infinity()) << "row " << i;
        } else {
          EXPECT_TRUE(r.output.row(i).allFinite()) << "row " << i;
          EXPECT_TRUE(std::isfinite(r.lse(i))) << "row " << i;
        }
      }
    }
  }
}

}  // namespace
