// SPDX-License-Identifier: MIT
// OnlineSoftmax: consuming the keys tile by tile gives the one-shot softmax (checked against
// the long-double reference), whatever the tile widths, with masked (-inf) tiles leading,
// in the middle and trailing, fully masked rows, and NaN.
#include "support/baseline.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

#include <attend/online_softmax.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class OnlineSoftmaxTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(OnlineSoftmaxTest, Scalars);

template <class T>
struct Online {
  Matrix<T> output;  // (rows, Dv)
  Vector<T> lse;     // (rows)
};

/// softmax(scores) V through OnlineSoftmax, consuming the keys in tiles of the given widths
/// (the last one is cut at the number of keys). Tiles are blocks of a larger scratch matrix, as
/// in the kernels.
template <class T>
Online<T> online_softmax(const Matrix<T>& scores, const Matrix<T>& v, const std::vector<Index>& widths,
                         OnlineSoftmax<T>& softmax) {
  const Index rows = scores.rows(), keys = scores.cols();
  Matrix<T> scratch(rows + 2, keys + 3);
  Matrix<T> acc = Matrix<T>::Zero(rows, v.cols());
  softmax.reset(rows);
  Index k0 = 0;
  for (std::size_t t = 0; k0 < keys; ++t) {
    const Index width = std::min(widths[t % widths.size()], keys - k0);
    auto tile = scratch.topLeftCorner(rows, width);
    tile = scores.middleCols(k0, width);
    softmax.update(tile, acc);
    EXPECT_FALSE(tile.array().isNaN().any()) << "P of tile at key " << k0 << " has NaN";
    acc.noalias() += tile * v.middleRows(k0, width);
    k0 += width;
  }
  Online<T> result{Matrix<T>(rows, v.cols()), Vector<T>(rows)};
  softmax.finalize(acc, result.output, result.lse);
  return result;
}

/// Draws q (rows, 8) and k (keys, 8); scores = q k^T / sqrt(8) with -inf where !visible.
template <class T>
void check_against_reference(const BoolMatrix& visible, const std::vector<Index>& widths, Rng& rng) {
  const Index rows = visible.rows(), keys = visible.cols();
  const Matrix<T> q = rng.normal<T>(rows, 8), k = rng.normal<T>(keys, 8), v = rng.normal<T>(keys, 5);
  const T scale = T(1) / std::sqrt(T(8));
  Matrix<T> scores = scale * (q * k.transpose());
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < keys; ++j)
      if (!visible(i, j)) scores(i, j) = -std::numeric_limits<T>::infinity();
  OnlineSoftmax<T> softmax(rows);
  const Online<T> r = online_softmax(scores, v, widths, softmax);
  const Reference ref = reference_attention(q, k, v, 1 / std::sqrt(Real(8)), visible);
  const Baseline<T> base = baseline_attention<T>(q, k, v, scale, visible);
  expect_matches_reference<T>(r.output, r.lse, ref, base);
}

TYPED_TEST(OnlineSoftmaxTest, TileByTileEqualsOneShotSoftmax) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index rows = 13, keys = 100;
  for (const std::vector<Index>& widths :
       std::vector<std::vector<Index>>{{keys}, {1}, {7}, {16}, {3, 17, 1, 29}, {64, 1}}) {
    SCOPED_TRACE("tile widths starting " + std::to_string(widths[0]));
    check_against_reference<T>(all_visible(rows, keys), widths, rng);
    check_against_reference<T>(rng.bernoulli(rows, keys, 0.5), widths, rng);
  }
}

// pytorch#127055: rows whose first tiles are all -inf (m_old = m_new = -inf) must not produce
// exp(-inf - -inf) = NaN; nor rows whose middle or trailing tiles are all -inf.
TYPED_TEST(OnlineSoftmaxTest, MaskedLeadingMiddleAndTrailingTilesGiveNoNaN) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index rows = 12, keys = 96;
  BoolMatrix visible = rng.bernoulli(rows, keys, 0.8);
  visible.block(0, 0, 4, 48).setConstant(false);   // leading three 16-wide tiles
  visible.block(4, 32, 4, 32).setConstant(false);  // middle tiles
  visible.block(8, 48, 4, 48).setConstant(false);  // trailing tiles
  for (const std::vector<Index>& widths : std::vector<std::vector<Index>>{{16}, {1}, {5, 11}, {keys}}) {
    SCOPED_TRACE("tile widths starting " + std::to_string(widths[0]));
    check_against_reference<T>(visible, widths, rng);
  }
}

TYPED_TEST(OnlineSoftmaxTest, FullyMaskedRowsFinalizeToZeroWithLseMinusInfinity) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index rows = 6, keys = 40;
  BoolMatrix visible = rng.bernoulli(rows, keys, 0.7);
  visible.row(0).setConstant(false);
  visible.row(3).setConstant(false);
  visible.row(5).setConstant(false);
  for (const std::vector<Index>& widths : std::vector<std::vector<Index>>{{8}, {1}, {keys}}) {
    SCOPED_TRACE("tile width " + std::to_string(widths[0]));
    check_against_reference<T>(visible, widths, rng);  // exact zeros and -inf are checked there
  }
}

TYPED_TEST(OnlineSoftmaxTest, NaNScorePropagatesToItsRowOnly) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index rows = 5, keys = 30;
  Matrix<T> scores = rng.normal<T>(rows, keys);
  scores(2, 17) = std::numeric_limits<T>::quiet_NaN();
  scores.row(4).head(16).setConstant(-std::numeric_limits<T>::infinity());
  scores(4, 20) = std::numeric_limits<T>::quiet_NaN();  // NaN after a masked leading tile
  const Matrix<T> v = rng.normal<T>(keys, 3);
  OnlineSoftmax<T> softmax(rows);
  Matrix<T> scratch(rows, keys);
  Matrix<T> acc = Matrix<T>::Zero(rows, 3);
  softmax.reset(rows);
  for (Index k0 = 0; k0 < keys; k0 += 8) {
    const Index width = std::min<Index>(8, keys - k0);
    auto tile = scratch.leftCols(width);
    tile = scores.middleCols(k0, width);
    softmax.update(tile, acc);
    acc.noalias() += tile * v.middleRows(k0, width);
  }
  Matrix<T> out(rows, 3);
  Vector<T> lse(rows);
  softmax.finalize(acc, out, lse);
  for (Index i = 0; i < rows; ++i) {
    const bool poisoned = i == 2 || i == 4;
    EXPECT_EQ(out.row(i).array().isNaN().all(), poisoned) << "row " << i;
    EXPECT_EQ(std::isnan(lse(i)), poisoned) << "row " << i;
    EXPECT_TRUE(poisoned || out.row(i).allFinite()) << "row " << i;
  }
}

// reset() forgets the previous rows: the same input twice gives bitwise the same result.
TYPED_TEST(OnlineSoftmaxTest, ResetStartsAfresh) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Matrix<T> scores = rng.normal<T>(7, 50, 4.0), v = rng.normal<T>(50, 4);
  const Matrix<T> other = rng.normal<T>(7, 50, 9.0);
  OnlineSoftmax<T> softmax(9);
  const Online<T> first = online_softmax(scores, v, {9}, softmax);
  online_softmax(other, v, {4}, softmax);
  const Online<T> again = online_softmax(scores, v, {9}, softmax);
  EXPECT_TRUE(identical(first.output, again.output));
  EXPECT_TRUE(identical(first.lse, again.lse));
}

}  // namespace
