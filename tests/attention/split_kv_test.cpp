// SPDX-License-Identifier: MIT
// Split-KV partials and their log-sum-exp merge, and the split-KV decode step, against the
// long-double reference over all keys.
#include <attend/attention/split_kv.hpp>

#include "support/expect.hpp"
#include "support/baseline.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace attend::test {
namespace {

using attend::test::expect_invalid;

template <class T>
class SplitKvTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(SplitKvTest, Scalars);

/// Key boundaries of the chunks used below: uneven sizes, one of a single key.
const std::vector<Index> kBounds{0, 17, 40, 41, 100};

template <class T>
std::vector<AttentionResult<T>> chunk_partials(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v,
                                               const BoolMatrix& visible) {
  std::vector<AttentionResult<T>> parts;
  for (std::size_t c = 0; c + 1 < kBounds.size(); ++c) {
    const Index k0 = kBounds[c], n = kBounds[c + 1] - k0;
    parts.push_back(scaled_dot_product_attention_with_lse(q, k.middleRows(k0, n), v.middleRows(k0, n),
                                                          BooleanMask(visible.middleCols(k0, n))));
  }
  return parts;
}

TYPED_TEST(SplitKvTest, MergedPartialsEqualFullAttentionInEveryOrder) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 6, lk = kBounds.back(), d = 16;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, 12);
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "bottom-right causal" : "no mask");
    const BoolMatrix visible = causal ? causal_visibility(lq, lk, Alignment::BottomRight) : all_visible(lq, lk);
    const Reference ref = reference_attention(q, k, v, 1 / std::sqrt(Real(d)), visible);
    const Baseline<T> base = baseline_attention<T>(q, k, v, T(1) / std::sqrt(T(d)), visible);
    const std::vector<AttentionResult<T>> parts = chunk_partials<T>(q, k, v, visible);
    std::vector<std::size_t> order{0, 1, 2, 3};
    do {  // every order of a left fold
      std::vector<AttentionResult<T>> permuted;
      for (const std::size_t i : order) permuted.push_back(parts[i]);
      const AttentionResult<T> merged = merge_partials(permuted);
      EXPECT_TRUE(within_tolerance<T>(merged.output, ref.output, base.output));
      EXPECT_TRUE(within_tolerance<T>(merged.lse, ref.lse, base.lse));
    } while (std::next_permutation(order.begin(), order.end()));
    // Other groupings: ((0 1)(2 3)) and (0 (1 (2 3))).
    const AttentionResult<T> pairs =
        merge_partials(merge_partials(parts[0], parts[1]), merge_partials(parts[2], parts[3]));
    const AttentionResult<T> right =
        merge_partials(parts[0], merge_partials(parts[1], merge_partials(parts[2], parts[3])));
    for (const AttentionResult<T>* r : {&pairs, &right}) {
      EXPECT_TRUE(within_tolerance<T>(r->output, ref.output, base.output));
      EXPECT_TRUE(within_tolerance<T>(r->lse, ref.lse, base.lse));
    }
  }
}

TYPED_TEST(SplitKvTest, EmptyPartialIsTheIdentity) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Matrix<T> q = rng.normal<T>(4, 8), k = rng.normal<T>(9, 8), v = rng.normal<T>(9, 8);
  const AttentionResult<T> a = scaled_dot_product_attention_with_lse(q, k, v);
  const AttentionResult<T> empty = scaled_dot_product_attention_with_lse(q, k.topRows(0), v.topRows(0));
  EXPECT_TRUE(empty.output.isZero(0));
  EXPECT_TRUE((empty.lse.array() == -std::numeric_limits<T>::infinity()).all());
  for (const AttentionResult<T>& m : {merge_partials(a, empty), merge_partials(empty, a)}) {
    EXPECT_EQ(m.output, a.output);
    EXPECT_EQ(m.lse, a.lse);
  }
  const AttentionResult<T> both = merge_partials(empty, empty);
  EXPECT_TRUE(both.output.isZero(0));
  EXPECT_TRUE((both.lse.array() == -std::numeric_limits<T>::infinity()).all());
}

TYPED_TEST(SplitKvTest, NanInOnePartialReachesOnlyItsRow) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  Matrix<T> q = rng.normal<T>(3, 8);
  const Matrix<T> k = rng.normal<T>(10, 8), v = rng.normal<T>(10, 8);
  const AttentionResult<T> a = scaled_dot_product_attention_with_lse(q, k.topRows(5), v.topRows(5));
  q(1, 2) = std::numeric_limits<T>::quiet_NaN();
  const AttentionResult<T> b = scaled_dot_product_attention_with_lse(q, k.bottomRows(5), v.bottomRows(5));
  for (const AttentionResult<T>& m : {merge_partials(a, b), merge_partials(b, a)}) {
    EXPECT_TRUE(m.output.row(1).array().isNaN().all());
    EXPECT_TRUE(std::isnan(m.lse(1)));
    EXPECT_TRUE(m.output.row(0).allFinite() && m.output.row(2).allFinite());
  }
}

/// The per-head reference of a decode step with all keys visible.
template <class T>
void expect_decode_matches(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, Index heads,
                           const Matrix<T>& out, const Vector<T>& lse) {
  const Index d = q.cols() / heads, kv_heads = k.cols() / d, dv = v.cols() / kv_heads;
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const Matrix<T> qh = q.middleCols(h * d, d);
    const BoolMatrix visible = all_visible(1, k.rows());
    const Reference ref =
        reference_attention(qh, k.middleCols(g * d, d), v.middleCols(g * dv, dv), 1 / std::sqrt(Real(d)), visible);
    const Baseline<T> base = baseline_attention<T>(qh, k.middleCols(g * d, d), v.middleCols(g * dv, dv),
                                                   T(1) / std::sqrt(T(d)), visible);
    EXPECT_TRUE(within_tolerance<T>(out.middleCols(h * dv, dv), ref.output, base.output));
    EXPECT_TRUE(within_tolerance<T>(lse.segment(h, 1), ref.lse, base.lse));
  }
}

TYPED_TEST(SplitKvTest, DecodeStepMatchesReferenceForMhaGqaMqa) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 8, d = 16, dv = 8;
  for (const Index kv_heads : {8, 2, 1}) {
    for (const Index lk : {1, 63, 64, 300}) {
      for (const Index split : {0, 64, 7}) {
        SCOPED_TRACE("H_kv=" + std::to_string(kv_heads) + " Lk=" + std::to_string(lk) + " block_k=" +
                     std::to_string(split));
        const Matrix<T> q = rng.normal<T>(1, heads * d), k = rng.normal<T>(lk, kv_heads * d),
                        v = rng.normal<T>(lk, kv_heads * dv);
        AttentionOptions o;
        o.block_k = split;
        Matrix<T> out(1, heads * dv);
        Vector<T> lse(heads);
        decode_attention_into(q, k, v, heads, out, o, lse);
        expect_decode_matches<T>(q, k, v, heads, out, lse);
      }
    }
  }
}

TYPED_TEST(SplitKvTest, DecodeStepOverStridedCacheViews) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, lk = 90;
  const Matrix<T> buffer_k = rng.normal<T>(lk + 10, kv_heads * d + 3), buffer_v = rng.normal<T>(lk + 10, kv_heads * d);
  const auto k = buffer_k.block(4, 1, lk, kv_heads * d);
  const auto v = buffer_v.middleRows(4, lk);
  const Matrix<T> q = rng.normal<T>(1, heads * d);
  AttentionOptions o;
  o.block_k = 32;
  Matrix<T> out(1, heads * d), copy_out(1, heads * d);
  Vector<T> lse(heads);
  decode_attention_into(q, k, v, heads, out, o, lse);
  decode_attention_into(q, Matrix<T>(k), Matrix<T>(v), heads, copy_out, o);
  EXPECT_EQ(out, copy_out);
  expect_decode_matches<T>(q, Matrix<T>(k), Matrix<T>(v), heads, out, lse);
}

TYPED_TEST(SplitKvTest, DecodeStepWithoutKeysGivesZeros) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(1, 16), k(0, 8), v(0, 8);
  Matrix<T> out = Matrix<T>::Constant(1, 16, T(7));
  Vector<T> lse(2);
  decode_attention_into(q, k, v, 2, out, {}, lse);
  EXPECT_TRUE(out.isZero(0));
  EXPECT_TRUE((lse.array() == -std::numeric_limits<T>::infinity()).all());
}

// Values of width 0 are valid: the output has no column, the log-sum-exp is still that of the
// scores. The split took &out(h, 0) of an (H, 0) partial (Eigen's bounds assertion; found by
// the fuzzer).
TYPED_TEST(SplitKvTest, DecodeStepWithEmptyValuesGivesTheLogSumExp) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, d = 4, lk = 7;
  const Matrix<T> q = rng.normal<T>(1, heads * d), k = rng.normal<T>(lk, heads * d), v(lk, 0);
  Matrix<T> out(1, 0);
  Vector<T> lse(heads);
  AttentionOptions options;
  options.block_k = 3;
  decode_attention_into(q, k, v, heads, out, options, lse);
  for (Index h = 0; h < heads; ++h) {
    const Reference ref = reference_attention(q.middleCols(h * d, d), k.middleCols(h * d, d), v, Real(0.5),
                                              BoolMatrix::Constant(1, lk, true));
    EXPECT_NEAR(double(lse(h)), double(ref.lse(0)), 8 * double(std::numeric_limits<T>::epsilon())) << "head " << h;
  }
}

TYPED_TEST(SplitKvTest, DecodeStepIsBitwiseEqualForOneToThreeThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 8, kv_heads = 2, d = 32, lk = 1500;
  const Matrix<T> q = rng.normal<T>(1, heads * d), k = rng.normal<T>(lk, kv_heads * d),
                  v = rng.normal<T>(lk, kv_heads * d);
  const int saved = omp_get_max_threads();
  std::vector<Matrix<T>> outs;
  std::vector<Vector<T>> lses;
  for (const int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    Matrix<T> out(1, heads * d);
    Vector<T> lse(heads);
    decode_attention_into(q, k, v, heads, out, {}, lse);
    outs.push_back(out);
    lses.push_back(lse);
  }
  omp_set_num_threads(saved);
  for (std::size_t r = 1; r < outs.size(); ++r) {
    EXPECT_EQ(outs[r], outs[0]);
    EXPECT_EQ(lses[r], lses[0]);
  }
#endif
}

TEST(SplitKvErrors, ClearMessagesNamingTheValues) {
  const Matrix<double> q = Matrix<double>::Ones(2, 16), k = Matrix<double>::Ones(5, 8);
  Matrix<double> out(1, 16);
  expect_invalid([&] { decode_attention_into(q, k, k, 2, out); }, {"one query row", "(2 x 16)"});
  expect_invalid([&] { decode_attention_into(q.topRows(1), k, k, 3, out); }, {"query width 16", "num_heads=3"});
  expect_invalid([&] { decode_attention_into(q.topRows(1), Matrix<double>::Ones(5, 24), k, 4, out); },
                 {"num_heads=4", "num_kv_heads=6"});
  expect_invalid([&] { decode_attention_into(q.topRows(1), k, k, 2, out.leftCols(8)); }, {"output (1 x 8)", "(1 x 16)"});
  AttentionResult<double> a{Matrix<double>::Zero(3, 4), Vector<double>::Zero(3), {}};
  AttentionResult<double> b{Matrix<double>::Zero(2, 4), Vector<double>::Zero(2), {}};
  expect_invalid([&] { merge_partials(a, b); }, {"partial output (2 x 4)", "(3 x 4)"});
  expect_invalid([&] { merge_partials(std::vector<AttentionResult<double>>{}); }, {"at least one"});
}

}  // namespace
}  // namespace attend::test
