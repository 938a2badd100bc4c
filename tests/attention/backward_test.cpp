// SPDX-License-Identifier: MIT
// Gradients of scaled dot-product attention (attention/backward.hpp) against the long-double
// reference (support/gradient_reference.hpp) on the edge-case grid: lengths around every tile
// size, Lq != Lk, odd head dimensions, every mask with both alignments, fully masked rows,
// strided views; both paths; defined results and errors.
#include "support/attention_case.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"

#include <attend/attention/backward.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class BackwardTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BackwardTest, Scalars);

/// Rows of the reference that see no key must have exactly zero dq; the rest within tolerance.
template <class T>
void expect_gradients(const AttentionGradients<T>& g, const RealGradients& ref, const Gradients<T>& base,
                      const BoolMatrix& visible) {
  for (Index i = 0; i < visible.rows(); ++i) {
    if (visible.row(i).any()) continue;
    for (Index c = 0; c < g.dq.cols(); ++c) ASSERT_EQ(g.dq(i, c), T(0)) << "row " << i << " sees no key";
  }
  expect_gradients_match<T>(g, ref, base);
}

/// Forward with lse, backward, and the check, through each of `paths`.
template <class T, class Q, class K, class V, class DO, class Mask>
void check_backward_case(const Q& q, const K& k, const V& v, const DO& d_out, const Mask& mask, const MaskCase& c,
                         const std::vector<AttentionOptions>& paths) {
  SCOPED_TRACE("Lq=" + std::to_string(q.rows()) + " Lk=" + std::to_string(k.rows()) +
               " Dk=" + std::to_string(q.cols()) + " Dv=" + std::to_string(v.cols()) + " mask " + c.description);
  GradientCase gc;
  gc.scale = 1 / std::sqrt(Real(q.cols()));
  gc.bias = c.bias;
  const RealGradients ref = reference_gradients(q, k, v, d_out, c.visible, gc);
  const Gradients<T> base = baseline_gradients<T>(q, k, v, d_out, c.visible, gc);
  for (const AttentionOptions& options : paths) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> forward = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
    const AttentionGradients<T> g = scaled_dot_product_attention_backward(q, k, v, forward, d_out, mask, options);
    expect_gradients<T>(g, ref, base, c.visible);
  }
}

TYPED_TEST(BackwardTest, EveryMaskAroundTileSizesMatchesTheReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  // Tiles of 16 x 32 (and odd ones) put tile edges inside these lengths; the default tiles too.
  const std::vector<AttentionOptions> paths{materialized_path(), blocked_path(), blocked_path(16, 32),
                                            blocked_path(5, 7)};
  const std::vector<Index> lengths{1, 15, 16, 17, 31, 33, 64, 70};
  const std::vector<Index> dims{1, 3, 8, 17, 32};
  std::size_t n = 0;
  for (const MaskSpec& spec : all_mask_specs())
    for (int repeat = 0; repeat < 2; ++repeat, ++n) {
      const Index lq = cycle(lengths, n * 3 + 1), lk = cycle(lengths, n * 5 + 2);
      const Index dk = cycle(dims, n), dv = cycle(dims, n + 2);
      const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
      const Matrix<T> d_out = rng.normal<T>(lq, dv);
      with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
        check_backward_case<T>(q, k, v, d_out, mask, c, paths);
      });
    }
}

TYPED_TEST(BackwardTest, DefaultTileEdgesMatchTheReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  // Around the backward's default 96 x 192 tiles (kBackwardDefaultTiles) and the forward's 64 x 256.
  const std::vector<std::pair<Index, Index>> shapes{{95, 191}, {97, 193}, {192, 385}, {63, 257}, {1, 300}};
  for (const auto& [lq, lk] : shapes)
    for (const MaskSpec spec : {MaskSpec{MaskKind::None}, MaskSpec{MaskKind::Causal, Alignment::BottomRight},
                                MaskSpec{MaskKind::WindowRandom, Alignment::TopLeft}}) {
      const Matrix<T> q = rng.normal<T>(lq, 16), k = rng.normal<T>(lk, 16), v = rng.normal<T>(lk, 24);
      const Matrix<T> d_out = rng.normal<T>(lq, 24);
      with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
        check_backward_case<T>(q, k, v, d_out, mask, c, {blocked_path()});
      });
    }
}

TYPED_TEST(BackwardTest, RowDotsRoundAsTheScoreKernelsDotProducts) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  // D_i = <dO_i, O_i> must round as the score kernel's dP_ij = <dO_i, v_j> (so that a row that
  // sees one key gets dS = 0 exactly): on every row count and width around the packet size, with
  // strided rows, row_dots gives bitwise the diagonal of the score kernel's A B^T.
  for (const Index rows : {1, 15, 16, 17, 40})
    for (const Index n : {1, 7, 16, 17, 64, 130}) {
      SCOPED_TRACE("rows=" + std::to_string(rows) + " n=" + std::to_string(n));
      const Matrix<T> wide_a = rng.normal<T>(2 * rows, n + 3), wide_b = rng.normal<T>(rows, n + 5);
      const Eigen::Map<const Matrix<T>, 0, Eigen::OuterStride<>> a(wide_a.data(), rows, n,
                                                                  Eigen::OuterStride<>(2 * wide_a.outerStride()));
      const auto b = wide_b.leftCols(n);
      Vector<T> d(rows);
      detail::row_dots(a.data(), a.outerStride(), b.data(), b.outerStride(), rows, n, d.data());
      const Index lanes = detail::round_up_to_lanes<T>(rows);
      Matrix<T> bt(n, lanes), st(rows, lanes);
      detail::pack_scaled_queries<T>(b, T(1), bt);
      detail::score_tile<T>(a, bt.data(), bt.outerStride(), lanes, st.data(), st.outerStride(),
                            [&](Index, Index) { return KeyRange{0, rows}; });
      for (Index i = 0; i < rows; ++i) EXPECT_EQ(d(i), st(i, i)) << "row " << i;
    }
}

TYPED_TEST(BackwardTest, StridedAndColumnMajorViewsGiveTheContiguousResults) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 37, lk = 45, dk = 12, dv = 9;
  const Matrix<T> wide_q = rng.normal<T>(lq, 3 * dk), wide_k = rng.normal<T>(lk, 2 * dk + 1);
  const Matrix<T> v = rng.normal<T>(lk, dv), d_out = rng.normal<T>(lq, dv);
  const auto q = wide_q.middleCols(dk, dk);
  const auto k = wide_k.middleCols(1, dk);
  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> v_col = v;
  for (const AttentionOptions& options : {materialized_path(), blocked_path(8, 16)}) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> forward = scaled_dot_product_attention_with_lse(q, k, v, Causal(), options);
    const AttentionGradients<T> expected =
        scaled_dot_product_attention_backward(Matrix<T>(q), Matrix<T>(k), v, forward, d_out, Causal(), options);
    // Outputs in blocks of wider matrices.
    Matrix<T> dq_wide(lq, dk + 5), dk_wide(lk, dk + 3), dv_wide(lk + 2, dv);
    scaled_dot_product_attention_backward_into(q, k, v_col, forward.output, forward.lse, d_out,
                                               dq_wide.middleCols(2, dk), dk_wide.leftCols(dk), dv_wide.topRows(lk),
                                               Causal(), options);
    EXPECT_TRUE(identical(dq_wide.middleCols(2, dk), expected.dq));
    EXPECT_TRUE(identical(dk_wide.leftCols(dk), expected.dk));
    EXPECT_TRUE(identical(dv_wide.topRows(lk), expected.dv));
  }
}

TYPED_TEST(BackwardTest, NoKeysOrFullyMaskedRowsGiveZeroGradients) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 8)}) {
    SCOPED_TRACE(describe(options));
    // Lk = 0: dq is zero, dk and dv are empty.
    const Matrix<T> q = rng.normal<T>(5, 4), k0 = Matrix<T>(0, 4), v0 = Matrix<T>(0, 3), d_out = rng.normal<T>(5, 3);
    const AttentionResult<T> f0 = scaled_dot_product_attention_with_lse(q, k0, v0, NoMask{}, options);
    const AttentionGradients<T> g0 = scaled_dot_product_attention_backward(q, k0, v0, f0, d_out, NoMask{}, options);
    EXPECT_TRUE(g0.dq.isZero(0));
    EXPECT_EQ(g0.dk.rows(), 0);
    EXPECT_EQ(g0.dv.rows(), 0);
    // Lq = 0: dk and dv are zero.
    const Matrix<T> k = rng.normal<T>(6, 4), v = rng.normal<T>(6, 3);
    const AttentionResult<T> fq = scaled_dot_product_attention_with_lse(Matrix<T>(0, 4), k, v, NoMask{}, options);
    const AttentionGradients<T> gq =
        scaled_dot_product_attention_backward(Matrix<T>(0, 4), k, v, fq, Matrix<T>(0, 3), NoMask{}, options);
    EXPECT_TRUE(gq.dk.isZero(0));
    EXPECT_TRUE(gq.dv.isZero(0));
    // Key padding of 0: every row sees nothing.
    const AttentionResult<T> fp = scaled_dot_product_attention_with_lse(q, k, v, KeyPadding(0), options);
    const AttentionGradients<T> gp = scaled_dot_product_attention_backward(q, k, v, fp, d_out, KeyPadding(0), options);
    EXPECT_TRUE(gp.dq.isZero(0));
    EXPECT_TRUE(gp.dk.isZero(0));
    EXPECT_TRUE(gp.dv.isZero(0));
  }
}

TYPED_TEST(BackwardTest, NanPropagatesToTheGradientsItTouches) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 9, lk = 11;
  for (const AttentionOptions& options : {materialized_path(), blocked_path(4, 4)}) {
    SCOPED_TRACE(describe(options));
    Matrix<T> q = rng.normal<T>(lq, 4);
    const Matrix<T> k = rng.normal<T>(lk, 4), v = rng.normal<T>(lk, 3);
    Matrix<T> d_out = rng.normal<T>(lq, 3);
    q(2, 1) = std::numeric_limits<T>::quiet_NaN();      // row 2's scores, so its output and every dk, dv
    d_out(5, 0) = std::numeric_limits<T>::quiet_NaN();  // row 5's dS, so dq_5 and every dk; dv where p_5j > 0
    const AttentionResult<T> f = scaled_dot_product_attention_with_lse(q, k, v, NoMask{}, options);
    const AttentionGradients<T> g = scaled_dot_product_attention_backward(q, k, v, f, d_out, NoMask{}, options);
    EXPECT_TRUE(g.dq.row(2).array().isNaN().all());
    EXPECT_TRUE(g.dq.row(5).array().isNaN().all());
    EXPECT_TRUE(g.dq.row(0).array().isFinite().all());
    EXPECT_TRUE(g.dk.array().isNaN().all());
    EXPECT_TRUE(g.dv.col(0).array().isNaN().all());
  }
}

TYPED_TEST(BackwardTest, BadShapesAndAliasingThrowWithTheShapes) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(4, 3), k = Matrix<T>::Ones(5, 3), v = Matrix<T>::Ones(5, 2);
  const Matrix<T> out = Matrix<T>::Zero(4, 2), d_out = Matrix<T>::Ones(4, 2);
  const Vector<T> lse = Vector<T>::Zero(4);
  Matrix<T> dq(4, 3), dk(5, 3), dv(5, 2);
  EXPECT_NO_THROW(scaled_dot_product_attention_backward_into(q, k, v, out, lse, d_out, dq, dk, dv));
  Matrix<T> bad_dq(3, 3);
  try {
    scaled_dot_product_attention_backward_into(q, k, v, out, lse, d_out, bad_dq, dk, dv);
    FAIL() << "no throw";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("dq (3 x 3) must be (4 x 3)"), std::string::npos) << e.what();
  }
  try {
    scaled_dot_product_attention_backward_into(q, k, v, out, Vector<T>::Zero(3), d_out, dq, dk, dv);
    FAIL() << "no throw";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("log-sum-exp of size 3"), std::string::npos) << e.what();
  }
  EXPECT_THROW(scaled_dot_product_attention_backward_into(q, k, v, out, lse, Matrix<T>::Ones(4, 3), dq, dk, dv),
               attend::invalid_argument);
  Matrix<T> kv(5, 3);
  kv.setOnes();
  try {
    scaled_dot_product_attention_backward_into(q, kv, v, out, lse, d_out, dq, kv, dv);
    FAIL() << "no throw";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("dk (5 x 3) aliases input k (5 x 3)"), std::string::npos) << e.what();
  }
}

}  // namespace
