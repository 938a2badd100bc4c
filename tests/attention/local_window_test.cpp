// SPDX-License-Identifier: MIT
// Local-window attention against the long-double reference with window visibility, combined with
// every mask, through both paths; sliding windows; and linear cost shown structurally (the
// blocked path never reads a key outside the window).
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/local_window.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class LocalWindowTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(LocalWindowTest, Scalars);

TYPED_TEST(LocalWindowTest, EveryWindowAndMaskMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index d = 8, dv = 5;
  // (Lq, Lk, left, right): causal sliding, symmetric, one-sided, zero, and wider than L.
  const std::vector<std::tuple<Index, Index, Index, Index>> cases{
      {70, 70, 15, 0}, {70, 70, 4, 4}, {33, 97, 0, 20}, {65, 65, 0, 0}, {20, 30, -1, 3}, {40, 40, 50, 50}};
  const std::vector<AttentionOptions> paths{AttentionOptions{}, materialized_path(), blocked_path(),
                                            blocked_path(16, 8), blocked_path(3, 1)};
  for (const auto& [lq, lk, left, right] : cases)
    for (const Alignment alignment : {Alignment::TopLeft, Alignment::BottomRight}) {
      SCOPED_TRACE("window (" + std::to_string(left) + ", " + std::to_string(right) + ", " +
                   alignment_name(alignment) + ")");
      const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
      const Real scale = 1 / std::sqrt(Real(d));
      const Window window(left, right, alignment);
      check_scores<T>(
          scale * (q.template cast<Real>() * k.template cast<Real>().transpose()), Matrix<T>(T(scale) * (q * k.transpose())), v,
          paths, rng,
          [&](const auto& mask, const AttentionOptions& options) {
            AttentionResult<T> r{Matrix<T>(q.rows(), v.cols()), Vector<T>(q.rows()), {}};
            local_window_attention_into(q, k, v, window, r.output, mask, options, r.lse);
            return r;
          },
          window_visibility(lq, lk, left, right, alignment));
    }
}

TYPED_TEST(LocalWindowTest, SlidingWindowSeesTheLastSizeKeys) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 50, lk = 80, d = 4, dv = 3, size = 9;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const BoolMatrix visible = window_visibility(lq, lk, size - 1, 0, Alignment::BottomRight);
  for (Index i = 0; i < lq; ++i) ASSERT_EQ(visible.row(i).count(), size);
  const RealMatrix ref_scores = (q.template cast<Real>() * k.template cast<Real>().transpose()) / Real(2);
  const Reference ref = reference_from_scores(ref_scores, v, visible);
  const Baseline<T> base = baseline_from_scores<T>(Matrix<T>((q * k.transpose()) / T(2)), v, visible);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(8, 4)}) {
    const Matrix<T> out = local_window_attention(q, k, v, sliding_window(size, Alignment::BottomRight), NoMask{}, options);
    EXPECT_TRUE(within_tolerance<T>(out, ref.output, base.output)) << describe(options);
  }
  try {
    sliding_window(0);
    ADD_FAILURE() << "sliding_window(0) must throw";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("size 0"), std::string::npos) << e.what();
  }
}

// Issue #11: a window wider than any sequence, up to INT64_MAX keys, is unbounded. The Auto
// heuristic used to form 2 (left + right + 1), a signed overflow (UB) for such windows.
TYPED_TEST(LocalWindowTest, Int64MaxWindowsAreUnbounded) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  constexpr Index kMax = std::numeric_limits<Index>::max();
  const Index lq = 12, lk = 20, d = 4, dv = 3;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const RealMatrix ref_scores = (q.template cast<Real>() * k.template cast<Real>().transpose()) / Real(2);
  const Matrix<T> base_scores = (q * k.transpose()) / T(2);
  const std::vector<std::tuple<Window, BoolMatrix, std::string>> windows{
      {Window(kMax, kMax), all_visible(lq, lk), "Window(INT64_MAX, INT64_MAX)"},
      {Window(kMax - 1, kMax, Alignment::BottomRight), all_visible(lq, lk), "Window(INT64_MAX - 1, INT64_MAX)"},
      {sliding_window(kMax, Alignment::BottomRight), causal_visibility(lq, lk, Alignment::BottomRight),
       "sliding_window(INT64_MAX)"},
      {Window(kMax, 0), causal_visibility(lq, lk, Alignment::TopLeft), "Window(INT64_MAX, 0)"}};
  for (const auto& [window, visible, name] : windows) {
    SCOPED_TRACE(name);
    const Reference ref = reference_from_scores(ref_scores, v, visible);
    const Baseline<T> base = baseline_from_scores<T>(base_scores, v, visible);
    for (const AttentionOptions& options : {AttentionOptions{}, materialized_path(), blocked_path(5, 3)}) {
      const Matrix<T> out = local_window_attention(q, k, v, window, NoMask{}, options);
      EXPECT_TRUE(within_tolerance<T>(out, ref.output, base.output)) << describe(options);
    }
  }
}

// The blocked path reads only keys inside the window: keys and values outside every window are
// NaN, and the output must stay finite and equal to the run on clean data (ggml/xFormers
// sentinel harness), for a long sequence.
TYPED_TEST(LocalWindowTest, BlockedPathNeverReadsOutsideTheWindow) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index length = 4096, d = 16, dv = 8, w = 64, first = 1000, count = 300;
  const Matrix<T> q_all = rng.normal<T>(length, d), k = rng.normal<T>(length, d), v = rng.normal<T>(length, dv);
  // Queries [first, first + count) with a causal window of w keys see keys [first - w + 1, first + count).
  const auto q = q_all.middleRows(first, count);
  Matrix<T> k_poisoned = Matrix<T>::Constant(length, d, std::numeric_limits<T>::quiet_NaN());
  Matrix<T> v_poisoned = Matrix<T>::Constant(length, dv, std::numeric_limits<T>::quiet_NaN());
  const Index lo = first - w + 1, hi = first + count;
  k_poisoned.middleRows(lo, hi - lo) = k.middleRows(lo, hi - lo);
  v_poisoned.middleRows(lo, hi - lo) = v.middleRows(lo, hi - lo);
  // Lq = count queries over Lk = hi keys, bottom-right: query r aligns with key first + r.
  const Window window = sliding_window(w, Alignment::BottomRight);
  const auto keys = k_poisoned.topRows(hi), values = v_poisoned.topRows(hi);
  AttentionOptions options = blocked_path(32, 32);
  const Matrix<T> out = local_window_attention(q, keys, values, window, NoMask{}, options);
  EXPECT_TRUE(out.allFinite());
  const Matrix<T> clean = local_window_attention(q, k.topRows(hi), v.topRows(hi), window, NoMask{}, options);
  EXPECT_EQ(out, clean);
}

}  // namespace
