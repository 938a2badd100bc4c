// SPDX-License-Identifier: MIT
// Mask policies against the reference boolean masks: on random and on tiled (query, key) tiles,
// classify() never calls a tile Empty that has a visible entry nor Full one that has a hidden
// entry, keys() contains every visible key, and apply_mask() hides exactly the hidden entries,
// whatever score they held, and adds the bias to the others. Compositions `a & b` of every pair
// of built-in masks and biases, in both orders, hide what either operand hides whatever the other
// adds there.
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"

#include <attend/masks.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class MaskPolicyTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(MaskPolicyTest, Scalars);

/// Checks the bound policy on the tile [q0, q1) x [k0, k1) against the reference. The scores of
/// hidden entries hold +inf, NaN and -inf in turn, as a score kernel may leave them.
template <class T, class Bound>
void check_tile(const Bound& bound, const MaskCase& c, Index q0, Index q1, Index k0, Index k1, Rng& rng) {
  SCOPED_TRACE("tile rows [" + std::to_string(q0) + ", " + std::to_string(q1) + ") keys [" + std::to_string(k0) +
               ", " + std::to_string(k1) + ")");
  const auto visible = c.visible.block(q0, k0, q1 - q0, k1 - k0);
  const TileKind kind = bound.classify(q0, q1, k0, k1);
  ASSERT_TRUE(kind != TileKind::Empty || !visible.any()) << "an Empty tile has a visible entry";
  ASSERT_TRUE(kind != TileKind::Full || visible.all()) << "a Full tile has a hidden entry";

  const KeyRange keys = bound.keys(q0, q1);
  ASSERT_LE(0, keys.begin);
  ASSERT_LE(keys.begin, keys.end);
  ASSERT_LE(keys.end, c.visible.cols());
  for (Index i = q0; i < q1; ++i)
    for (Index j = 0; j < c.visible.cols(); ++j)
      ASSERT_TRUE(!c.visible(i, j) || (keys.begin <= j && j < keys.end))
          << "visible key " << j << " of row " << i << " outside keys() [" << keys.begin << ", " << keys.end << ")";

  // apply_mask() on a block of a larger scratch matrix, as the kernels call it.
  Matrix<T> scratch = rng.normal<T>(q1 - q0 + 3, k1 - k0 + 5);
  const T planted[] = {std::numeric_limits<T>::infinity(), std::numeric_limits<T>::quiet_NaN(),
                       -std::numeric_limits<T>::infinity()};
  for (Index r = 0; r < q1 - q0; ++r)
    for (Index s = 0; s < k1 - k0; ++s)
      if (!visible(r, s)) scratch(r, s) = planted[(r + s) % 3];
  const Matrix<T> before = scratch;
  attend::detail::apply_mask(bound, scratch.topLeftCorner(q1 - q0, k1 - k0), q0, k0);
  for (Index r = 0; r < scratch.rows(); ++r)
    for (Index s = 0; s < scratch.cols(); ++s) {
      if (r >= q1 - q0 || s >= k1 - k0) {
        ASSERT_EQ(scratch(r, s), before(r, s)) << "apply() wrote outside its tile";
        continue;
      }
      if (!visible(r, s)) {
        ASSERT_EQ(scratch(r, s), -std::numeric_limits<T>::infinity()) << "hidden entry (" << q0 + r << ", " << k0 + s << ")";
      } else if (c.largest_bias == 0) {  // at most one bias: added once, exactly
        const T expected = c.bias ? T(before(r, s) + T((*c.bias)(q0 + r, k0 + s))) : before(r, s);
        if (std::isnan(expected))
          ASSERT_TRUE(std::isnan(scratch(r, s))) << "visible entry (" << q0 + r << ", " << k0 + s << ")";
        else
          ASSERT_EQ(scratch(r, s), expected) << "visible entry (" << q0 + r << ", " << k0 + s << ")";
      } else {  // two biases: two roundings, in an order the test does not fix
        const Real expected = Real(before(r, s)) + (*c.bias)(q0 + r, k0 + s);
        const Real slack =
            2 * Real(std::numeric_limits<T>::epsilon()) * (std::fabs(Real(before(r, s))) + 2 * c.largest_bias);
        if (std::isnan(expected))
          ASSERT_TRUE(std::isnan(scratch(r, s))) << "visible entry (" << q0 + r << ", " << k0 + s << ")";
        else
          ASSERT_LE(std::fabs(Real(scratch(r, s)) - expected), slack)
              << "visible entry (" << q0 + r << ", " << k0 + s << "): " << scratch(r, s) << " vs " << expected;
      }
    }
}

/// check_tile over `random_tiles` random tiles of the (lq, lk) problem, then over every tile of
/// three tilings ((1, 1), (7, 5), (16, 16)).
template <class T, class Bound>
void check_tiles(const Bound& bound, const MaskCase& c, Index lq, Index lk, int random_tiles, Rng& rng) {
  for (int n = 0; n < random_tiles; ++n) {
    const Index q0 = rng.uniform(0, lq - 1), q1 = rng.uniform(q0 + 1, lq);
    const Index k0 = rng.uniform(0, lk - 1), k1 = rng.uniform(k0 + 1, lk);
    check_tile<T>(bound, c, q0, q1, k0, k1, rng);
    if (::testing::Test::HasFatalFailure()) return;
  }
  const std::vector<std::pair<Index, Index>> tilings{{1, 1}, {7, 5}, {16, 16}};
  for (const auto& [bq, bk] : tilings)
    for (Index q0 = 0; q0 < lq; q0 += bq)
      for (Index k0 = 0; k0 < lk; k0 += bk) {
        check_tile<T>(bound, c, q0, std::min(q0 + bq, lq), k0, std::min(k0 + bk, lk), rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
}

// Every mask of the catalogue, on several shapes, over random tiles and over three tilings.
TYPED_TEST(MaskPolicyTest, ClassifyKeysAndApplyAgreeWithReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<std::pair<Index, Index>> shapes{{1, 1}, {5, 13}, {13, 5}, {40, 40}, {33, 70}, {70, 33}};
  for (const MaskSpec& spec : all_mask_specs())
    for (const auto& shape : shapes) {
      const Index lq = shape.first, lk = shape.second;
      with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
        SCOPED_TRACE(c.description + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk));
        check_tiles<T>(mask.bind(lq, lk), c, lq, lk, 60, rng);
      });
    }
}

// OffsetMask: a block of a whole problem gets exactly what the whole problem's mask says of its
// entries (every mask of the catalogue, random tiles and three tilings of each block), and a block
// that does not lie inside the whole problem is an error.
TYPED_TEST(MaskPolicyTest, OffsetMaskGivesABlockTheWholeProblemsMask) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index total_q = 40, total_k = 50;
  struct Block {
    Index q0, k0, rows, cols;
  };
  for (const MaskSpec& spec : all_mask_specs())
    with_mask<T>(spec, total_q, total_k, rng, [&](const auto& mask, const MaskCase& whole) {
      for (const Block& b : {Block{0, 0, 40, 50}, Block{13, 7, 9, 30}, Block{39, 25, 1, 25}, Block{20, 0, 20, 1}}) {
        SCOPED_TRACE(whole.description + " block at (" + std::to_string(b.q0) + ", " + std::to_string(b.k0) + ")");
        MaskCase c = whole;
        c.visible = whole.visible.block(b.q0, b.k0, b.rows, b.cols);
        if (whole.bias) c.bias = RealMatrix(whole.bias->block(b.q0, b.k0, b.rows, b.cols));
        check_tiles<T>(OffsetMask(mask, b.q0, b.k0, total_q, total_k).bind(b.rows, b.cols), c, b.rows, b.cols, 10, rng);
        if (::testing::Test::HasFatalFailure()) return;
      }
      try {
        OffsetMask(mask, 35, 0, total_q, total_k).bind(6, total_k);
        ADD_FAILURE() << "a block past the last query was accepted";
      } catch (const attend::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("(6 x 50) at (35, 0) does not lie inside the whole problem (40 x 50)"),
                  std::string::npos)
            << e.what();
      }
    });
}

// Every pair of built-in masks and biases, both ways round, with +inf, NaN and -inf planted in
// each operand's data where the other hides the key (and a NaN at one key both let through, which
// must stay NaN): the intersection's reference throughout.
TYPED_TEST(MaskPolicyTest, IntersectionHidesWhateverTheOtherOperandHolds) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<OperandKind> kinds = all_operand_kinds();
  const std::vector<std::pair<Index, Index>> shapes{{5, 13}, {13, 13}, {16, 40}};
  for (std::size_t a = 0; a < kinds.size(); ++a)
    for (std::size_t b = a; b < kinds.size(); ++b)
      for (std::size_t n = 0; n < shapes.size(); ++n) {
        const Index lq = shapes[n].first, lk = shapes[n].second;
        const Alignment alignment = (a + b + n) % 2 == 0 ? Alignment::TopLeft : Alignment::BottomRight;
        with_mask_pair<T>(kinds[a], kinds[b], lq, lk, alignment, true, rng, [&](const auto& mask, const MaskCase& c) {
          SCOPED_TRACE(c.description + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk));
          check_tiles<T>(mask.bind(lq, lk), c, lq, lk, 20, rng);
        });
        if (::testing::Test::HasFatalFailure()) return;
      }
}

// The classification is useful, not only safe: bands call tiles outside them Empty and tiles
// inside them Full, so kernels skip and fast-path them.
TEST(MaskPolicy, BandsClassifyTilesTightly) {
  const auto causal = Causal().bind(64, 64);
  EXPECT_EQ(causal.classify(0, 16, 16, 32), TileKind::Empty);
  EXPECT_EQ(causal.classify(16, 32, 0, 16), TileKind::Full);
  EXPECT_EQ(causal.classify(16, 32, 16, 32), TileKind::Partial);
  const KeyRange causal_keys = causal.keys(16, 32);
  EXPECT_EQ(causal_keys.begin, 0);
  EXPECT_EQ(causal_keys.end, 32);

  const auto window = Window(3, 2, Alignment::BottomRight).bind(10, 30);  // query i aligned with key i + 20
  const KeyRange row_keys = window.keys(4, 5);
  EXPECT_EQ(row_keys.begin, 21);
  EXPECT_EQ(row_keys.end, 27);
  EXPECT_EQ(window.classify(0, 10, 0, 16), TileKind::Empty);

  const auto padding = KeyPadding(20).bind(8, 50);
  EXPECT_EQ(padding.classify(0, 8, 0, 20), TileKind::Full);
  EXPECT_EQ(padding.classify(0, 8, 20, 50), TileKind::Empty);
  EXPECT_EQ(padding.keys(0, 8).end, 20);

  EXPECT_EQ(NoMask{}.bind(3, 4).classify(0, 3, 0, 4), TileKind::Full);
  EXPECT_EQ((Causal() & KeyPadding(8)).bind(16, 16).classify(8, 16, 8, 16), TileKind::Empty);
}

TEST(MaskPolicy, BindRejectsInvalidConfigurations) {
  EXPECT_THROW(Window(-2, 0).bind(4, 4), attend::invalid_argument);
  EXPECT_THROW(Window(0, -5).bind(4, 4), attend::invalid_argument);
  EXPECT_NO_THROW(Window(-1, -1).bind(4, 4));
  EXPECT_THROW(KeyPadding(5).bind(4, 4), attend::invalid_argument);
  EXPECT_THROW(KeyPadding(-1).bind(4, 4), attend::invalid_argument);
  const BoolMatrix m = BoolMatrix::Constant(4, 5, true);
  EXPECT_THROW(BooleanMask(m).bind(5, 4), attend::invalid_argument);
  EXPECT_THROW((Causal() & BooleanMask(m)).bind(4, 4), attend::invalid_argument);
}

}  // namespace
