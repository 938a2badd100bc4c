// SPDX-License-Identifier: MIT
// The blocked backward's one pass (backward_blocked.hpp, backward_group_one_pass: one task per kv
// group, dQ accumulated in the key pass) gives bitwise the gradients of the two passes (key pass,
// then query pass) on the edge grid of the default 96 x 192 tiles: lengths around the tiles,
// Lq != Lk both ways, odd and packet-wide head dimensions, causal in both alignments, a window,
// rows that see no key, GQA, a soft cap, a score modifier, and the bias gradients. The schedule is
// forced through detail::backward_schedule_override(); the automatic choice is covered by the
// thread-invariance tests (tests/invariance/backward_test.cpp), whose thread counts switch it.
#include "support/attention_case.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <attend/attention/backward.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;
using detail::BackwardSchedule;

/// Restores the automatic schedule when a test ends, however it ends.
struct ScheduleGuard {
  ~ScheduleGuard() { detail::backward_schedule_override() = BackwardSchedule::Auto; }
};

/// Every gradient of a call under schedule `schedule`.
template <class Call>
auto under(BackwardSchedule schedule, const Call& call) {
  ScheduleGuard guard;
  detail::backward_schedule_override() = schedule;
  return call();
}

/// The two schedules' matrices, side by side, must be bitwise equal and not trivially zero.
template <class T>
void expect_same_bits(const std::vector<Matrix<T>>& one, const std::vector<Matrix<T>>& two, const std::string& what) {
  ASSERT_EQ(one.size(), two.size()) << what;
  for (std::size_t i = 0; i < one.size(); ++i) {
    EXPECT_TRUE(identical(one[i], two[i])) << what << ", output " << i;
    EXPECT_TRUE(one[i].size() == 0 || one[i].allFinite()) << what << ", output " << i;
  }
}

/// (Lq, Lk) around the 96 x 192 tiles, Lq != Lk both ways.
const std::vector<std::pair<Index, Index>> kLengths = {{96, 192}, {97, 191}, {95, 193}, {193, 97},
                                                       {1, 385},  {290, 7},  {200, 384}};

template <class T, class Mask>
void check_single_head(Rng& rng, const Mask& mask, const std::string& name, Index d, Index dv, double cap = 0) {
  for (const auto& [lq, lk] : kLengths) {
    const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv),
                    d_out = rng.normal<T>(lq, dv);
    const std::string what = name + " Lq " + std::to_string(lq) + " Lk " + std::to_string(lk) + " d " +
                             std::to_string(d) + " dv " + std::to_string(dv);
    const AttentionOptions options = blocked_path();
    const auto run = [&] {
      if (cap > 0) {
        Matrix<T> out(q.rows(), dv);
        Vector<T> lse(q.rows());
        soft_capped_attention_into(q, k, v, cap, out, mask, options, lse);
        const AttentionGradients<T> g = soft_capped_attention_backward(q, k, v, cap, out, lse, d_out, mask, options);
        return std::vector<Matrix<T>>{g.dq, g.dk, g.dv};
      }
      const AttentionResult<T> f = scaled_dot_product_attention_with_lse(q, k, v, mask, options);
      const AttentionGradients<T> g = scaled_dot_product_attention_backward(q, k, v, f, d_out, mask, options);
      return std::vector<Matrix<T>>{g.dq, g.dk, g.dv};
    };
    const std::vector<Matrix<T>> one = under(BackwardSchedule::OnePass, run);
    const std::vector<Matrix<T>> two = under(BackwardSchedule::TwoPass, run);
    expect_same_bits(one, two, what);
    // dV is nonzero whenever a query sees a key; dQ unless every query sees one key only.
    EXPECT_FALSE(one[2].isZero(0)) << what;
    if (lq > 1) {
      EXPECT_FALSE(one[0].isZero(0)) << what;
    }
  }
}

/// A score modifier with its derivative.
struct Wobble {
  double operator()(double s, Index, Index q, Index k) const { return s + 0.3 * std::sin(s) + 0.01 * double(q - k); }
  double grad(double s, Index, Index, Index) const { return 1 + 0.3 * std::cos(s); }
};

template <class T>
class BackwardOnePassTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BackwardOnePassTest, Scalars);

TYPED_TEST(BackwardOnePassTest, SingleHeadMatchesTheTwoPassesBitwise) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  for (const auto& [d, dv] : {std::pair<Index, Index>{5, 3}, {64, 64}, {33, 17}}) {
    check_single_head<T>(rng, NoMask{}, "no mask", d, dv);
    check_single_head<T>(rng, Causal(Alignment::TopLeft), "causal top-left", d, dv);
    // Bottom-right with Lq > Lk: the first Lq - Lk rows see no key.
    check_single_head<T>(rng, Causal(Alignment::BottomRight), "causal bottom-right", d, dv);
    check_single_head<T>(rng, Window(70, 30), "window", d, dv);
  }
  check_single_head<T>(rng, Causal(Alignment::BottomRight), "soft cap, causal bottom-right", 5, 3, 2.0);
  check_single_head<T>(rng, SoftCap(1.5) & Window(100, 0), "SoftCap mask & window", 33, 17);
  check_single_head<T>(rng, ScoreMod(Wobble{}) & Causal(), "score mod & causal", 5, 3);
}

TYPED_TEST(BackwardOnePassTest, GqaAndBiasGradientsMatchTheTwoPassesBitwise) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  constexpr Index kHeads = 4, kKvHeads = 2, kBuckets = 8;
  for (const auto& [lq, lk] : kLengths) {
    for (const Index d : {Index(5), Index(64)}) {
      const Matrix<T> q = rng.normal<T>(lq, kHeads * d), k = rng.normal<T>(lk, kKvHeads * d),
                      v = rng.normal<T>(lk, kKvHeads * 3), d_out = rng.normal<T>(lq, kHeads * 3);
      const Matrix<T> stacked = rng.normal<T>(kHeads * lq, lk), table = rng.normal<T>(kBuckets, kHeads);
      const auto mask = AdditiveMask(stacked) & RelativePositionBias(table, true, 6) & Causal(Alignment::BottomRight);
      const std::string what = "Lq " + std::to_string(lq) + " Lk " + std::to_string(lk) + " d " + std::to_string(d);
      const AttentionOptions options = blocked_path();
      const auto run = [&] {
        const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, kHeads, mask, options);
        Matrix<T> d_bias, d_table;
        BiasGradients<T> request;
        request.d_bias_per_head = &d_bias;
        request.d_table_per_head = &d_table;
        request.table_buckets = {kBuckets, true, 6, Alignment::TopLeft};
        const AttentionGradients<T> g =
            multi_head_attention_backward(q, k, v, kHeads, f, d_out, mask, options, request);
        return std::vector<Matrix<T>>{g.dq, g.dk, g.dv, d_bias, d_table};
      };
      const std::vector<Matrix<T>> one = under(BackwardSchedule::OnePass, run);
      const std::vector<Matrix<T>> two = under(BackwardSchedule::TwoPass, run);
      expect_same_bits(one, two, what);
      EXPECT_FALSE(one[0].isZero(0)) << what;
    }
  }
}

TYPED_TEST(BackwardOnePassTest, VarlenSequencesMatchTheTwoPassesBitwise) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  constexpr Index kHeads = 2, d = 16;
  const SequenceRows query_rows = SequenceRows::packed(std::vector<Index>{0, 97, 98, 298});
  const SequenceRows key_rows = SequenceRows::packed(std::vector<Index>{0, 193, 243, 339});
  const Matrix<T> q = rng.normal<T>(298, kHeads * d), k = rng.normal<T>(339, kHeads * d),
                  v = rng.normal<T>(339, kHeads * d), d_out = rng.normal<T>(298, kHeads * d);
  const AttentionOptions options = blocked_path();
  const auto run = [&] {
    const MultiHeadLseResult<T> f =
        multi_head_attention_with_lse(q, k, v, kHeads, query_rows, key_rows, Causal(Alignment::BottomRight), options);
    Matrix<T> dq = Matrix<T>::Zero(q.rows(), q.cols()), dk = Matrix<T>::Zero(k.rows(), k.cols()),
              dv = Matrix<T>::Zero(v.rows(), v.cols());
    multi_head_attention_backward_into(q, k, v, kHeads, query_rows, key_rows, f.output, f.lse, d_out, dq, dk, dv,
                                       Causal(Alignment::BottomRight), options);
    return std::vector<Matrix<T>>{dq, dk, dv};
  };
  expect_same_bits(under(BackwardSchedule::OnePass, run), under(BackwardSchedule::TwoPass, run), "varlen");
}

}  // namespace
