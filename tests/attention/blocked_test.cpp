// SPDX-License-Identifier: MIT
// The blocked path: lengths at every tile size -1/0/+1, key tiles fully masked for some rows
// (pytorch#127055), NaN-padded strided inputs and guarded outputs (no out-of-bounds reads or
// writes), and results independent of the thread count.
#include "support/attention_case.hpp"
#include "support/scalars.hpp"

#include <attend/attention/scaled_dot_product.hpp>

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class BlockedTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BlockedTest, Scalars);

constexpr Index kDefaultBlockQ = 64, kDefaultBlockK = 256;  // documented defaults (block size 0)

// For each tile shape, Lq in {Bq-1, Bq, Bq+1} against Lk in {Bk-1, Bk, Bk+1}, with rotating
// masks and head dimensions.
TYPED_TEST(BlockedTest, LengthsAroundEveryTileSizeMatchReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<std::pair<Index, Index>> tiles{{1, 1}, {7, 7},  {16, 16}, {64, 64}, {0, 0},
                                                   {1, 64}, {64, 7}, {7, 16},  {16, 1}};
  const std::vector<Index> dims{1, 3, 8, 31, 64};
  const std::vector<MaskSpec> specs = all_mask_specs();
  std::size_t n = 0;
  for (const auto& [bq, bk] : tiles) {
    const Index block_q = bq > 0 ? bq : kDefaultBlockQ, block_k = bk > 0 ? bk : kDefaultBlockK;
    for (Index dq : {-1, 0, 1})
      for (Index dkv : {-1, 0, 1}) {
        const Index dk = cycle(dims, n), dv = cycle(dims, n + 2);
        check_case<T>(block_q + dq, block_k + dkv, dk, dv, cycle(specs, 3 * n), {blocked_path(bq, bk)}, rng);
        ++n;
      }
  }
}

/// Checks `mask` (visibility `visible`, optional bias) on (Lq, Lk) random data through the blocked
/// path with several tile shapes, each of which leaves whole key tiles masked for some rows.
template <class T, class Mask>
void check_blocked(Index lq, Index lk, const Mask& mask, const MaskCase& c, Rng& rng) {
  const Matrix<T> q = rng.normal<T>(lq, 16), k = rng.normal<T>(lk, 16), v = rng.normal<T>(lk, 8);
  check_inputs<T>(q, k, v, mask, c, {blocked_path(16, 16), blocked_path(7, 7), blocked_path(1, 16), blocked_path(32, 8),
                                     blocked_path()},
                  !c.bias.has_value());
}

// pytorch#127055: a sliding window leaves the leading key tiles of late rows fully masked; the
// online softmax must not evaluate exp(-inf - -inf).
TYPED_TEST(BlockedTest, LeadingKeyTilesFullyMasked) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index n = 150;
  check_blocked<T>(n, n, Window(9, 0), {"Window(9, 0)", window_visibility(n, n, 9, 0, Alignment::TopLeft), std::nullopt}, rng);
  // The PyTorch regression's own mask: triu(-inf, 1) + tril(-inf, -10), as an additive mask.
  Matrix<T> bias = Matrix<T>::Zero(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j)
      if (j > i || j < i - 9) bias(i, j) = -std::numeric_limits<T>::infinity();
  const BoolMatrix band = window_visibility(n, n, 9, 0, Alignment::TopLeft);
  check_blocked<T>(n, n, AdditiveMask(bias), {"triu(-inf,1)+tril(-inf,-10)", band, bias.template cast<Real>()}, rng);
  // The first 40 keys hidden from every row, by -inf bias, with a random bias elsewhere.
  Matrix<T> lead = rng.normal<T>(60, 100, 3.0);
  lead.leftCols(40).setConstant(-std::numeric_limits<T>::infinity());
  BoolMatrix lead_visible = all_visible(60, 100);
  lead_visible.leftCols(40).setConstant(false);
  check_blocked<T>(60, 100, AdditiveMask(lead), {"additive -inf on keys [0, 40)", lead_visible, lead.template cast<Real>()},
                   rng);
}

// Key tiles in the middle of a row fully masked, the rows around them not.
TYPED_TEST(BlockedTest, MiddleKeyTilesFullyMasked) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  BoolMatrix visible = rng.bernoulli(70, 100, 0.9);
  visible.block(10, 16, 40, 48).setConstant(false);  // keys [16, 64) of rows [10, 50)
  check_blocked<T>(70, 100, BooleanMask(visible), {"BooleanMask hiding keys [16, 64) of rows [10, 50)", visible, std::nullopt}, rng);
  check_blocked<T>(70, 100, BooleanMask(visible) & Window(30, 30, Alignment::BottomRight),
                   {"BooleanMask & Window(30, 30, BottomRight)",
                    visible.array() && window_visibility(70, 100, 30, 30, Alignment::BottomRight).array(), std::nullopt},
                   rng);
}

// Trailing key tiles fully masked: key padding for every row, causal for the early rows.
TYPED_TEST(BlockedTest, TrailingKeyTilesFullyMasked) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  check_blocked<T>(70, 100, KeyPadding(21), {"KeyPadding(21)", padding_visibility(70, 100, 21), std::nullopt}, rng);
  check_blocked<T>(100, 100, Causal(), {"Causal(TopLeft)", causal_visibility(100, 100, Alignment::TopLeft), std::nullopt}, rng);
  check_blocked<T>(60, 100, Causal(Alignment::BottomRight),
                   {"Causal(BottomRight)", causal_visibility(60, 100, Alignment::BottomRight), std::nullopt}, rng);
}

// ik_llama.cpp#2344: whole query tiles (leading, middle, trailing) that see no key.
TYPED_TEST(BlockedTest, FullyMaskedQueryTiles) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  BoolMatrix visible = rng.bernoulli(100, 70, 0.8);
  visible.topRows(20).setConstant(false);
  visible.middleRows(48, 17).setConstant(false);
  visible.bottomRows(3).setConstant(false);
  check_blocked<T>(100, 70, BooleanMask(visible), {"BooleanMask hiding rows [0,20), [48,65), [97,100)", visible, std::nullopt}, rng);
  // Bottom-right causal with Lq > Lk: the first Lq - Lk rows see nothing.
  check_blocked<T>(100, 30, Causal(Alignment::BottomRight),
                   {"Causal(BottomRight), Lq > Lk", causal_visibility(100, 30, Alignment::BottomRight), std::nullopt,
                    true},
                   rng);
}

// ---------------------------------------------------------------------------------------------
// Memory safety (reliability.md §4.4a/b)

/// A (rows, cols) view at (row0, col0) of a (rows + pad_rows, ld) buffer filled with `fill`;
/// the view holds `data`. Keeps the buffer alive.
template <class T>
struct PaddedCopy {
  PaddedCopy(const Matrix<T>& data, Index row0, Index col0, Index pad_rows, Index ld, T fill)
      : buffer(static_cast<std::size_t>((data.rows() + row0 + pad_rows) * ld + col0), fill),
        offset(row0 * ld + col0),
        stride(ld) {
    for (Index i = 0; i < data.rows(); ++i)
      for (Index j = 0; j < data.cols(); ++j) buffer[static_cast<std::size_t>(offset + i * ld + j)] = data(i, j);
    rows = data.rows();
    cols = data.cols();
  }
  Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>> view() const {
    return {buffer.data() + offset, rows, cols, Eigen::OuterStride<>(stride)};
  }
  std::vector<T> buffer;
  Index offset, stride, rows = 0, cols = 0;
};

// Q, K, V and the dense masks inside larger NaN-filled buffers (unaligned, padded stride, NaN
// rows past the logical length): the output is finite and bitwise equal to the contiguous run.
TYPED_TEST(BlockedTest, NaNPaddedStridedInputsGiveFiniteBitwiseEqualOutput) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();
  const Index lq = 45, lk = 77, dk = 20, dv = 12;
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  const PaddedCopy<T> qp(q, 2, 1, 19, dk + 7, kNaN), kp(k, 1, 3, 51, dk + 5, kNaN), vp(v, 3, 1, 35, dv + 9, kNaN);
  const BoolMatrix visible = rng.bernoulli(lq, lk, 0.6);
  const Matrix<T> bias = rng.normal<T>(lq, lk, 3.0);
  const PaddedCopy<T> bias_p(bias, 1, 2, 20, lk + 11, kNaN);
  // Booleans cannot be NaN: pad the boolean mask with "visible", which would change the result.
  Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> visible_buffer =
      Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Constant(lq + 20, lk + 20, true);
  visible_buffer.block(1, 2, lq, lk) = visible;
  const auto visible_view = visible_buffer.block(1, 2, lq, lk);

  for (const AttentionOptions& options :
       {blocked_path(), blocked_path(1, 1), blocked_path(7, 16), blocked_path(16, 7), blocked_path(64, 64)}) {
    SCOPED_TRACE(describe(options));
    const auto expect_same = [&](const auto& padded_mask, const auto& mask, const char* name) {
      SCOPED_TRACE(name);
      const AttentionResult<T> padded =
          scaled_dot_product_attention_with_lse(qp.view(), kp.view(), vp.view(), padded_mask, options);
      const AttentionResult<T> contiguous = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
      EXPECT_TRUE(padded.output.allFinite()) << "read out of bounds";
      EXPECT_TRUE(identical(padded.output, contiguous.output));
      EXPECT_TRUE(identical(padded.lse, contiguous.lse));
    };
    expect_same(NoMask{}, NoMask{}, "NoMask");
    expect_same(Causal(Alignment::BottomRight), Causal(Alignment::BottomRight), "Causal(BottomRight)");
    expect_same(Window(5, 3), Window(5, 3), "Window(5, 3)");
    expect_same(KeyPadding(50), KeyPadding(50), "KeyPadding(50)");
    expect_same(BooleanMask(visible_view), BooleanMask(visible), "BooleanMask");
    expect_same(AdditiveMask(bias_p.view()), AdditiveMask(bias), "AdditiveMask");
  }
}

// Key padding: keys and values past the valid length are never read, on either path (the mask's
// documented promise), so NaN there leaves the output finite and equal to attention over the
// valid keys alone.
TYPED_TEST(BlockedTest, KeyPaddingNeverReadsThePadding) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 30, lk = 90, valid = 37;
  Matrix<T> k = rng.normal<T>(lk, 16), v = rng.normal<T>(lk, 8);
  const Matrix<T> q = rng.normal<T>(lq, 16);
  k.bottomRows(lk - valid).setConstant(std::numeric_limits<T>::quiet_NaN());
  v.bottomRows(lk - valid).setConstant(std::numeric_limits<T>::quiet_NaN());
  for (const AttentionOptions& options :
       {materialized_path(), blocked_path(), blocked_path(1, 1), blocked_path(7, 16), blocked_path(16, 64)}) {
    SCOPED_TRACE(describe(options));
    const AttentionResult<T> padded = scaled_dot_product_attention_with_lse(q, k, v, KeyPadding(valid), options);
    const AttentionResult<T> trimmed =
        scaled_dot_product_attention_with_lse(q, k.topRows(valid), v.topRows(valid), NoMask{}, options);
    EXPECT_TRUE(padded.output.allFinite());
    if (options.algorithm == Algorithm::Blocked) {  // the same tiles, so the same arithmetic
      EXPECT_TRUE(identical(padded.output, trimmed.output));
      EXPECT_TRUE(identical(padded.lse, trimmed.lse));
    } else {  // the same sums, though the rows of the weights may be aligned differently
      const Real eps = std::numeric_limits<T>::epsilon();
      EXPECT_LE(max_abs_error(padded.output, trimmed.output), 8 * eps);
      EXPECT_LE(max_abs_error(padded.lse, trimmed.lse), 8 * eps * Real(trimmed.lse.cwiseAbs().maxCoeff()));
    }
  }
}

// The output and lse written into blocks of larger buffers: everything around them (filled with a
// sentinel) stays bitwise untouched, and the blocks hold exactly the contiguous result.
TYPED_TEST(BlockedTest, OutputGuardRegionsStayUntouched) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const T sentinel = T(-7777.25);
  const Index lq = 53, lk = 41, dk = 16, dv = 10, guard = 5;
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  BoolMatrix visible = rng.bernoulli(lq, lk, 0.7);
  visible.row(0).setConstant(false);
  visible.row(lq - 1).setConstant(false);
  for (const AttentionOptions& options :
       {materialized_path(), blocked_path(), blocked_path(1, 1), blocked_path(7, 16), blocked_path(16, 7)}) {
    SCOPED_TRACE(describe(options));
    Matrix<T> out_buffer = Matrix<T>::Constant(lq + 2 * guard, dv + 2 * guard, sentinel);
    Vector<T> lse_buffer = Vector<T>::Constant(lq + 2 * guard, sentinel);
    scaled_dot_product_attention_into(q, k, v, out_buffer.block(guard, guard, lq, dv), BooleanMask(visible), options,
                                      lse_buffer.segment(guard, lq));
    const AttentionResult<T> expected = scaled_dot_product_attention_with_lse(q, k, v, BooleanMask(visible), options);
    EXPECT_TRUE(identical(Matrix<T>(out_buffer.block(guard, guard, lq, dv)), expected.output));
    EXPECT_TRUE(identical(Vector<T>(lse_buffer.segment(guard, lq)), expected.lse));
    for (Index i = 0; i < out_buffer.rows(); ++i)
      for (Index j = 0; j < out_buffer.cols(); ++j) {
        const bool inside = i >= guard && i < guard + lq && j >= guard && j < guard + dv;
        if (!inside) {
          ASSERT_EQ(out_buffer(i, j), sentinel) << "output guard overwritten at (" << i << ", " << j << ")";
        }
      }
    for (Index i = 0; i < lse_buffer.size(); ++i)
      if (i < guard || i >= guard + lq) {
        ASSERT_EQ(lse_buffer(i), sentinel) << "lse guard overwritten at " << i;
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism

// Repeated runs, and (with OpenMP) 1, 2 and 3 threads, give bitwise equal results.
TYPED_TEST(BlockedTest, ResultsAreBitwiseIndependentOfRunsAndThreads) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 300, lk = 260, dk = 32, dv = 24;
  const Matrix<T> q = rng.normal<T>(lq, dk), k = rng.normal<T>(lk, dk), v = rng.normal<T>(lk, dv);
  const Matrix<T> bias = rng.normal<T>(lq, lk, 3.0);
  const auto run = [&](const AttentionOptions& options, int which) {
    return which == 0 ? scaled_dot_product_attention_with_lse(q, k, v, Causal(Alignment::BottomRight), options)
                      : scaled_dot_product_attention_with_lse(q, k, v, AdditiveMask(bias) & Window(40, 40), options);
  };
  for (const AttentionOptions& options : {blocked_path(), blocked_path(16, 32), blocked_path(7, 7)})
    for (int which : {0, 1}) {
      SCOPED_TRACE(describe(options) + (which == 0 ? " Causal" : " Additive & Window"));
      const AttentionResult<T> first = run(options, which);
      for (int repeat = 0; repeat < 3; ++repeat) {
        const AttentionResult<T> again = run(options, which);
        EXPECT_TRUE(identical(again.output, first.output)) << "repeat " << repeat;
        EXPECT_TRUE(identical(again.lse, first.lse)) << "repeat " << repeat;
      }
#ifdef _OPENMP
      const int saved = omp_get_max_threads();
      for (int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        const AttentionResult<T> r = run(options, which);
        EXPECT_TRUE(identical(r.output, first.output)) << threads << " threads";
        EXPECT_TRUE(identical(r.lse, first.lse)) << threads << " threads";
      }
      omp_set_num_threads(saved);
#endif
    }
}

}  // namespace
