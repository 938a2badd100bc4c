// SPDX-License-Identifier: MIT
// The AVX512-BF16 tile kernels (detail/bf16_kernels.hpp) against long-double sums of the same
// bf16 inputs: the pair layouts word by word, then the score and value kernels over feature
// counts {1, 2, 15, 16, 17, 64, 127, 128}, key counts around the register blocks and the tile
// (odd and even), 16 to 64 lanes, and full, causal and windowed visible ranges.
//
// Tolerances come from float accumulation: a chain of n rounded additions is off by at most
// n u sum |terms| (u = 2^-24, first order; 1% slack for the second), with n = Dk + 1 for a
// score (Dk products, the scale) and 2 ceil(keys/2) + 1 for the value accumulator (pairs of
// products, alpha). The value kernel also rounds P to bf16 (8 significant bits): against the
// unrounded weights each term may move by 2^-8 of itself on top.
#include <attend/detail/bf16_kernels.hpp>
#include <attend/masks.hpp>

#include "support/random.hpp"

#include <gtest/gtest.h>

#if ATTEND_HAS_BF16_DOT_KERNELS

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using attend::Index;
using attend::KeyRange;
using attend::Matrix;
using bf16 = Eigen::bfloat16;
using Words = Matrix<std::uint32_t>;
using Real = long double;
namespace detail = attend::detail;

constexpr Index kDims[] = {1, 2, 15, 16, 17, 64, 127, 128};
// Around the register blocks (6 rows) and the default key tile (256).
constexpr Index kKeyCounts[] = {1, 2, 5, 6, 7, 12, 13, 31, 64, 255, 256};
struct LaneShape {
  Index rows, lanes;
};
constexpr LaneShape kLaneShapes[] = {{13, 16}, {48, 48}, {61, 64}};
constexpr Real kFloatUnit = 0x1p-24L;  // float's unit roundoff
constexpr Real kBf16Unit = 0x1p-8L;    // bf16's

std::uint16_t bits(bf16 x) { return Eigen::numext::bit_cast<std::uint16_t>(x); }
std::uint32_t word(bf16 first, bf16 second) { return std::uint32_t(bits(first)) | std::uint32_t(bits(second)) << 16; }

Matrix<bf16> random_bf16(attend::test::Rng& rng, Index rows, Index cols) {
  return rng.normal<float>(rows, cols).cast<bf16>();
}

/// Query i sees the keys [i + offset - window, i + offset] of [0, keys) (window < 0: no left
/// edge, a causal diagonal), or every key with `full`. Called as the kernels' `visible`, it
/// returns the keys lanes [i0, i1) see together, as the engine's seen_by does.
struct Band {
  bool full;
  Index offset, window, rows, keys;

  KeyRange of(Index i) const {
    if (full) return {0, keys};
    const Index end = std::clamp<Index>(i + offset + 1, 0, keys);
    const Index begin = window < 0 ? 0 : std::clamp<Index>(i + offset - window, 0, keys);
    return {std::min(begin, end), end};
  }
  bool sees(Index i, Index j) const {
    const KeyRange r = of(i);
    return j >= r.begin && j < r.end;
  }
  KeyRange operator()(Index i0, Index i1) const {
    i1 = std::min(i1, rows);
    if (i1 <= i0) return {0, 0};
    return {of(i0).begin, of(i1 - 1).end};
  }
  std::string name() const {
    std::ostringstream s;
    if (full)
      s << "full";
    else
      s << "band(offset " << offset << ", window " << window << ")";
    return s.str();
  }
};

/// Full, a causal diagonal across the middle of the tile, and a window of 5 keys behind it.
std::vector<Band> bands(Index rows, Index keys) {
  const Index offset = keys / 2 - rows / 2;
  return {{true, 0, -1, rows, keys}, {false, offset, -1, rows, keys}, {false, offset, 4, rows, keys}};
}

TEST(Bf16Kernels, QueryPairsHoldConsecutiveFeaturesAndZeroPadding) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index dim : {1, 2, 15, 16, 17}) {
    const Index rows = 19, lanes = 32;
    const Matrix<bf16> q = random_bf16(rng, rows, dim);
    Words qt2 = Words::Constant((dim + 1) / 2, lanes + 3, 0xFFFFFFFFu);
    detail::pack_query_pairs(q, lanes, qt2);
    for (Index c2 = 0; c2 < qt2.rows(); ++c2)
      for (Index i = 0; i < lanes + 3; ++i) {
        const std::uint32_t expected = i >= lanes  ? 0xFFFFFFFFu  // beyond `lanes`: untouched
                                       : i >= rows ? 0u
                                                   : word(q(i, 2 * c2), 2 * c2 + 1 < dim ? q(i, 2 * c2 + 1) : bf16(0));
        ASSERT_EQ(qt2(c2, i), expected) << "Dk " << dim << ", word (" << c2 << ", " << i << ")";
      }
  }
}

TEST(Bf16Kernels, ValuePairsHoldConsecutiveKeysAndAZeroRowPastAnOddCount) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index keys : {1, 2, 5, 6})
    for (const Index dim : {1, 15, 16, 17, 31, 32, 33, 64}) {
      const Matrix<bf16> v_all = random_bf16(rng, keys, dim + 7);
      const auto v = v_all.leftCols(dim);  // rows with a stride
      Words storage = Words::Constant((keys + 1) / 2, dim + 5, 0xFFFFFFFFu);
      detail::pack_value_pairs(v, storage.leftCols(dim));
      for (Index j2 = 0; j2 < storage.rows(); ++j2)
        for (Index c = 0; c < dim + 5; ++c) {
          const std::uint32_t expected =
              c >= dim ? 0xFFFFFFFFu : word(v(2 * j2, c), 2 * j2 + 1 < keys ? v(2 * j2 + 1, c) : bf16(0));
          ASSERT_EQ(storage(j2, c), expected)
              << "Lk " << keys << ", Dv " << dim << ", word (" << j2 << ", " << c << ")";
        }
    }
}

TEST(Bf16Kernels, WeightPairsRoundToNearestEvenAndPropagateNaN) {
  ATTEND_SEEDED_RNG(rng);
  const Index lanes = 32;
  for (const Index keys : {1, 2, 7, 8}) {
    Matrix<float> pt(keys + 1, lanes);
    std::uniform_real_distribution<float> unit(0.0f, 1.0f);
    std::mt19937_64 engine(rng.uniform(0, 1 << 30));
    for (Index j = 0; j < keys; ++j)
      for (Index i = 0; i < lanes; ++i) pt(j, i) = unit(engine);
    // Ties: 1 + 2^-8 rounds down to the even 1, 1 + 3 2^-8 up to 1 + 2^-6; 2^-130 is subnormal.
    pt(0, 0) = 1.0f + 0x1p-8f;
    pt(0, 1) = 1.0f + 0x3p-8f;
    pt(0, 2) = std::numeric_limits<float>::quiet_NaN();
    pt(0, 3) = 0.0f;
    pt.row(keys).setConstant(std::numeric_limits<float>::quiet_NaN());  // past the tile: not read
    Words pt2((keys + 1) / 2, lanes);
    detail::pack_weight_pairs(pt.data(), pt.outerStride(), keys, lanes, pt2.data(), pt2.outerStride());
    EXPECT_EQ(pt2(0, 0) & 0xFFFFu, bits(bf16(1.0f)));
    EXPECT_EQ(pt2(0, 1) & 0xFFFFu, bits(bf16(1.0f + 0x1p-6f)));
    for (Index j2 = 0; j2 < pt2.rows(); ++j2)
      for (Index i = 0; i < lanes; ++i)
        for (int half = 0; half < 2; ++half) {
          const Index j = 2 * j2 + half;
          const auto got = Eigen::numext::bit_cast<bf16>(std::uint16_t(pt2(j2, i) >> (16 * half)));
          if (j >= keys) {
            ASSERT_EQ(bits(got), 0u) << "keys " << keys << ", pair " << j2 << ", lane " << i;
          } else if (std::isnan(pt(j, i))) {
            ASSERT_TRUE(Eigen::numext::isnan(got)) << "keys " << keys << ", key " << j << ", lane " << i;
          } else {
            ASSERT_EQ(bits(got), bits(bf16(pt(j, i)))) << "keys " << keys << ", key " << j << ", lane " << i;
          }
        }
  }
}

/// Runs score_tile_bf16 on one case and checks every entry; returns the count of invisible
/// entries it left unscored.
Index check_score_tile(attend::test::Rng& rng, Index dim, Index keys, LaneShape shape, const Band& band) {
  const Index rows = shape.rows, lanes = shape.lanes;
  const float scale = 1.0f / std::sqrt(float(dim));
  const Matrix<bf16> q = random_bf16(rng, rows, dim);
  const Matrix<bf16> k_all = random_bf16(rng, keys, dim + 3);
  const auto k = k_all.leftCols(dim);  // rows with a stride
  Words qt2((dim + 1) / 2, lanes);
  detail::pack_query_pairs(q, lanes, qt2);
  const float sentinel = std::numeric_limits<float>::quiet_NaN();
  Matrix<float> st = Matrix<float>::Constant(keys, lanes, sentinel);
  detail::score_tile_bf16(k, qt2.data(), qt2.outerStride(), lanes, scale, st.data(), st.outerStride(), band);
  Index unscored = 0;
  for (Index j = 0; j < keys; ++j)
    for (Index i = 0; i < lanes; ++i) {
      const float got = st(j, i);
      const auto where = [&] {
        return "Dk " + std::to_string(dim) + ", keys " + std::to_string(keys) + ", rows " + std::to_string(rows) +
               ", lanes " + std::to_string(lanes) + ", " + band.name() + ": st(" + std::to_string(j) + ", " +
               std::to_string(i) + ") = " + std::to_string(got);
      };
      const KeyRange seen = band(i / 16 * 16, i / 16 * 16 + 16);
      const bool must_score = j >= seen.begin && j < seen.end;
      if (std::isnan(got)) {
        EXPECT_FALSE(must_score) << where() << " was not scored";
        if (must_score) return unscored;
        ++unscored;
        continue;
      }
      if (i >= rows) {  // a padding lane: zero words
        EXPECT_EQ(got, 0.0f) << where();
        continue;
      }
      Real dot = 0, magnitude = 0;
      for (Index c = 0; c < dim; ++c) {
        const Real term = Real(float(k(j, c))) * Real(float(q(i, c)));
        dot += term;
        magnitude += std::fabs(term);
      }
      const Real expected = Real(scale) * dot;
      const Real bound = Real(dim + 1) * kFloatUnit * 1.01L * Real(scale) * magnitude + Real(dim) * 0x1p-126L;
      EXPECT_LE(std::fabs(Real(got) - expected), bound) << where() << ", expected " << double(expected);
      if (std::fabs(Real(got) - expected) > bound) return unscored;
    }
  return unscored;
}

TEST(Bf16Kernels, ScoreTileMatchesLongDoubleDotProductsOfTheSameBf16Inputs) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index dim : kDims)
    for (const Index keys : kKeyCounts)
      for (const LaneShape shape : kLaneShapes)
        for (const Band& band : bands(shape.rows, keys)) {
          check_score_tile(rng, dim, keys, shape, band);
          if (HasFailure()) return;
        }
}

TEST(Bf16Kernels, ScoreTileSkipsKeyBlocksThatNoPacketSees) {
  ATTEND_SEEDED_RNG(rng);
  // Causal from the tile's top-left corner: 64 queries see keys [0, 64) of 256 between them.
  const Index keys = 256;
  const Band causal{false, 0, -1, 64, keys};
  const Index unscored = check_score_tile(rng, 64, keys, {64, 64}, causal);
  EXPECT_GE(unscored, (keys - 64 - 6) * 64);
}

/// Runs value_tile_bf16 on one case (a key tile starting at key k0 = 4 of a V of k0 + keys
/// rows, packed whole) and checks every output.
void check_value_tile(attend::test::Rng& rng, Index dim, Index keys, LaneShape shape, const Band& band) {
  const Index rows = shape.rows, lanes = shape.lanes, k0 = 4;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::mt19937_64 engine(rng.uniform(0, 1 << 30));
  // P^T as the online softmax leaves it: weights in [0, 1] where the band lets query i see key
  // j, exactly 0 elsewhere; the padding lanes and the row past the tile hold stale values.
  Matrix<float> pt = Matrix<float>::Constant(keys + 1, lanes, nan);
  for (Index j = 0; j < keys; ++j)
    for (Index i = 0; i < rows; ++i) pt(j, i) = band.sees(i, j) ? unit(engine) : 0.0f;
  const Matrix<bf16> v_all = random_bf16(rng, k0 + keys, dim);
  Words v2_all((k0 + keys + 1) / 2, dim);
  detail::pack_value_pairs(v_all, v2_all);
  const auto v = v_all.middleRows(k0, keys);
  const auto v2 = v2_all.middleRows(k0 / 2, (keys + 1) / 2);
  Words pt2((keys + 1) / 2, lanes);
  detail::pack_weight_pairs(pt.data(), pt.outerStride(), keys, lanes, pt2.data(), pt2.outerStride());

  const Matrix<float> acc0 = rng.normal<float>(rows, dim);
  std::vector<float> alpha(std::size_t(lanes), nan);
  for (Index i = 0; i < rows; ++i) alpha[std::size_t(i)] = unit(engine);
  Matrix<float> acc_all = Matrix<float>::Constant(rows, dim + 2, nan);
  acc_all.leftCols(dim) = acc0;
  detail::value_tile_bf16(pt2.data(), pt2.outerStride(), v2, alpha.data(), acc_all.leftCols(dim), band);

  // The reference's terms as long doubles, formed once (the loop below runs at -O0 under the
  // sanitizers too): x(j, c) = v(j, c), and each weight rounded to bf16 and exact.
  const Index pairs = (keys + 1) / 2;
  const Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> x = v.cast<float>().cast<Real>();
  const Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> p_exact =
      pt.topLeftCorner(keys, rows).cast<Real>();
  const Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> p_rounded =
      pt.topLeftCorner(keys, rows).cast<bf16>().cast<float>().cast<Real>();
  for (Index i = 0; i < rows; ++i) {
    const Real a = alpha[std::size_t(i)];
    const Real* exact_weights = p_exact.col(i).data();
    const Real* rounded_weights = p_rounded.col(i).data();
    for (Index c = 0; c < dim + 2; ++c) {
      const float got = acc_all(i, c);
      const auto where = [&] {
        return "Dv " + std::to_string(dim) + ", keys " + std::to_string(keys) + ", rows " + std::to_string(rows) +
               ", lanes " + std::to_string(lanes) + ", " + band.name() + ": acc(" + std::to_string(i) + ", " +
               std::to_string(c) + ") = " + std::to_string(got);
      };
      if (c >= dim) {
        ASSERT_TRUE(std::isnan(got)) << where() << " is past Dv and was written";
        continue;
      }
      Real rounded = a * Real(acc0(i, c)), exact = rounded, magnitude = std::fabs(rounded), weighted = 0;
      const Real* values = x.col(c).data();
      for (Index j = 0; j < keys; ++j) {
        rounded += rounded_weights[j] * values[j];
        exact += exact_weights[j] * values[j];
        magnitude += std::fabs(rounded_weights[j] * values[j]);
        weighted += std::fabs(exact_weights[j] * values[j]);
      }
      const Real bound = Real(2 * pairs + 1) * kFloatUnit * 1.01L * magnitude + Real(keys) * 0x1p-126L;
      ASSERT_LE(std::fabs(Real(got) - rounded), bound)
          << where() << ", expected " << double(rounded) << " from the bf16 weights";
      ASSERT_LE(std::fabs(Real(got) - exact), bound + kBf16Unit * weighted)
          << where() << ", expected " << double(exact) << " from the float weights";
    }
  }
}

TEST(Bf16Kernels, ValueTileMatchesLongDoubleSumsOfBf16Weights) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index dim : kDims)
    for (const Index keys : kKeyCounts)
      for (const LaneShape shape : kLaneShapes)
        for (const Band& band : bands(shape.rows, keys)) {
          check_value_tile(rng, dim, keys, shape, band);
          if (HasFailure()) return;
        }
}

}  // namespace

#else

TEST(Bf16Kernels, NeedAvx512Bf16) {
  GTEST_SKIP() << "the target has no AVX512-BF16 (compile with -march=native on a CPU that has it)";
}

#endif
