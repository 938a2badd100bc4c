// SPDX-License-Identifier: MIT
// An output that shares memory with an input is rejected with attend::invalid_argument naming
// both, before anything is written; or, where the call reads only a copy of that input, it
// gives the result of separate memory (reliability.md §3 row 21). Disjoint blocks of one
// buffer (row blocks, and side-by-side column blocks whose rows interleave) are accepted.
#include "support/attention_case.hpp"
#include "support/entry_points.hpp"
#include "support/expect.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class AliasingTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(AliasingTest, Scalars);

EntrySizes alias_sizes() {
  return {13, 29, 8, 6, blocked_path(8, 16)};
}

/// A row-major buffer holding one input at its top-left corner, with room for the output
/// below it and to its right. Output blocks: at the input's first element, one row of the
/// input's last row onwards (overlapping), right below it, or beside it (rows interleave).
template <class T>
struct SharedBuffer {
  SharedBuffer(const Matrix<T>& input, const Problem& p)
      : memory(Matrix<T>::Constant(input.rows() + p.lq + 1, input.cols() + p.out_cols, T(-3.5))),
        input_rows(input.rows()),
        input_cols(input.cols()),
        problem(p) {
    memory.topLeftCorner(input_rows, input_cols) = input;
  }

  auto input() { return memory.topLeftCorner(input_rows, input_cols); }
  auto out_at(Index row, Index col) { return memory.block(row, col, problem.lq, problem.out_cols); }

  Matrix<T> memory;
  Index input_rows, input_cols;
  Problem problem;
};

/// Runs `entry` with input `which` (0 = q, 1 = k, 2 = v) replaced by `input`.
template <class Entry, class In, class T>
void run_with(const Entry& entry, int which, const In& input, const Inputs<T>& in, OutputViews<T> o) {
  if (which == 0) entry.run(input, in.k, in.v, o);
  if (which == 1) entry.run(in.q, input, in.v, o);
  if (which == 2) entry.run(in.q, in.k, input, o);
}

TYPED_TEST(AliasingTest, EveryIntoEntryPointRejectsOrHandlesAnOutputOverAnInput) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const EntryPoints<T> entries(alias_sizes(), rng);
  std::size_t rejected = 0, handled = 0;
  entries.for_each([&](const auto& entry) {
    if (!entry.aliasing) return;
    SCOPED_TRACE(entry.name);
    const Problem& p = entry.problem;
    const Inputs<T> in = draw_inputs<T>(p, rng);
    const Results<T> expected = run_entry<T>(entry, in.q, in.k, in.v);
    ASSERT_TRUE(informative(expected));
    const Matrix<T>* inputs[3] = {&in.q, &in.k, &in.v};
    for (int which = 0; which < 3; ++which) {
      const std::string name = kInputNames[which];
      SCOPED_TRACE("input " + name);
      for (const bool same_start : {true, false}) {
        SCOPED_TRACE(same_start ? "output at the input's first element" : "output from the input's last row on");
        SharedBuffer<T> shared(*inputs[which], p);
        const Matrix<T> before = shared.memory;
        Results<T> r(p);
        auto out = shared.out_at(same_start ? 0 : shared.input_rows - 1, 0);
        const auto run = [&] { run_with(entry, which, shared.input(), in, OutputViews<T>{out, r.lse, r.weights}); };
        if ((*entry.aliasing)[std::size_t(which)] == Alias::Rejected) {
          expect_invalid(run, {"output (" + std::to_string(p.lq), "aliases input " + name + " ("});
          EXPECT_TRUE(identical(shared.memory, before)) << "written before the error";
          ++rejected;
        } else {
          run();
          r.out = out;
          EXPECT_TRUE(identical_results(r, expected)) << "an input read through a copy";
          ++handled;
        }
      }
      // Disjoint blocks of the same buffer: below the input, and beside it.
      for (const bool beside : {false, true}) {
        SCOPED_TRACE(beside ? "output beside the input" : "output below the input");
        SharedBuffer<T> shared(*inputs[which], p);
        Results<T> r(p);
        auto out = beside ? shared.out_at(0, shared.input_cols) : shared.out_at(shared.input_rows, 0);
        run_with(entry, which, shared.input(), in, OutputViews<T>{out, r.lse, r.weights});
        r.out = out;
        EXPECT_TRUE(identical_results(r, expected));
      }
    }
    if (p.lse_size == 0) return;
    // The log-sum-exp over an input, or over the output.
    for (int which = 0; which < 3; ++which) {
      SCOPED_TRACE(std::string("log-sum-exp over input ") + kInputNames[which]);
      SharedBuffer<T> shared(*inputs[which], p);
      Results<T> r(p);
      Eigen::Map<Vector<T>> lse(shared.memory.data(), p.lse_size);  // starts at the input
      const auto run = [&] { run_with(entry, which, shared.input(), in, OutputViews<T>{r.out, lse, r.weights}); };
      if ((*entry.aliasing)[std::size_t(which)] == Alias::Rejected) {
        expect_invalid(run, {"log-sum-exp (" + std::to_string(p.lse_size),
                             "aliases input " + std::string(kInputNames[which])});
      } else {
        run();
        r.lse = lse;
        EXPECT_TRUE(identical_results(r, expected));
      }
    }
    Results<T> r(p);
    Eigen::Map<Vector<T>> lse_over_out(r.out.data() + 1, p.lse_size);
    expect_invalid([&] { entry.run(in.q, in.k, in.v, OutputViews<T>{r.out, lse_over_out, r.weights}); },
                   {"log-sum-exp", "aliases output ("});
  });
  EXPECT_GE(rejected, 30u);
  EXPECT_GE(handled, 6u);
}

// The kernel's own view decides: a column-major argument, or an expression, over the output's
// memory is copied into a row-major temporary before anything is written, so it is accepted.
TYPED_TEST(AliasingTest, ArgumentsCopiedIntoTemporariesMayShareTheOutputsMemory) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index n = 20, d = 8;
  const Matrix<T> q = rng.normal<T>(n, d), k = rng.normal<T>(n, d), v = rng.normal<T>(n, d);
  const Matrix<T> expected = scaled_dot_product_attention(q, k, v, Causal());
  Matrix<T> out = q;
  Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>> q_transposed(out.data(), d, n);
  scaled_dot_product_attention_into(q_transposed.transpose() * T(1), k, v, out, Causal());  // an expression
  EXPECT_TRUE(identical(out, expected));
  Matrix<T> out2 = q.transpose();  // (d, n) row-major = q in column-major storage
  Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>> q_col_major(out2.data(), n, d);
  Eigen::Map<Matrix<T>> out2_view(out2.data(), n, d);
  scaled_dot_product_attention_into(q_col_major, k, v, out2_view, Causal());
  EXPECT_TRUE(identical(out2_view, expected));
}

TYPED_TEST(AliasingTest, MergePartialIntoRejectsOverlappingPartials) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index n = 9, d = 5, m = 20;
  const Matrix<T> q = rng.normal<T>(n, d), k = rng.normal<T>(2 * m, d), v = rng.normal<T>(2 * m, d);
  const AttentionResult<T> a = scaled_dot_product_attention_with_lse(q, k.topRows(m), v.topRows(m));
  const AttentionResult<T> b = scaled_dot_product_attention_with_lse(q, k.bottomRows(m), v.bottomRows(m));
  const AttentionResult<T> expected = merge_partials(a, b);
  // Both partial outputs side by side in one buffer, both lse in another: accepted.
  Matrix<T> outs(n, 2 * d);
  outs << a.output, b.output;
  Matrix<T> lses(n, 2);
  lses << a.lse, b.lse;
  Vector<T> lse_a = a.lse;
  merge_partial_into<T>(outs.leftCols(d), lse_a, outs.rightCols(d), b.lse);
  EXPECT_TRUE(identical(outs.leftCols(d), expected.output));
  EXPECT_TRUE(identical(lse_a, expected.lse));
  // Overlaps: the other partial is the output itself or one row off; lse over its other.
  Matrix<T> out = a.output;
  Vector<T> lse = a.lse;
  expect_invalid([&] { merge_partial_into<T>(out, lse, out, b.lse); }, {"output (9 x 5) aliases input other_out"});
  expect_invalid([&] { merge_partial_into<T>(out.topRows(n - 1), lse.head(n - 1), out.bottomRows(n - 1), b.lse.head(n - 1)); },
                 {"output (8 x 5) aliases input other_out (8 x 5)"});
  expect_invalid([&] { merge_partial_into<T>(out, lse, b.output, lse); }, {"log-sum-exp (9 x 1) aliases input other_lse"});
  Eigen::Map<Vector<T>> lse_in_out(out.data(), n);
  expect_invalid([&] { merge_partial_into<T>(out, lse_in_out, b.output, b.lse); }, {"log-sum-exp", "aliases output"});
  EXPECT_TRUE(identical(out, a.output)) << "written before the error";
  EXPECT_TRUE(identical(lse, a.lse)) << "written before the error";
}

// softmax_rows_inplace works in place on its scores by design; only the lse must not overlap them.
TYPED_TEST(AliasingTest, SoftmaxRowsInplaceRejectsLseOverTheScores) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  Matrix<T> buffer = rng.normal<T>(6, 9);
  const Matrix<T> before = buffer;
  Eigen::Map<Vector<T>> lse_in_scores(buffer.data() + 7, 6);
  expect_invalid([&] { softmax_rows_inplace<T>(buffer.leftCols(8), lse_in_scores); },
                 {"log-sum-exp (6 x 1) aliases scores (6 x 8)"});
  EXPECT_TRUE(identical(buffer, before));
  // The last column is disjoint from the first eight: accepted, and equal to separate memory.
  Matrix<T> expected_scores = before.leftCols(8);
  Vector<T> expected_lse(6);
  softmax_rows_inplace<T>(expected_scores, expected_lse);
  Vector<T> lse(6);
  softmax_rows_inplace<T>(buffer.leftCols(8), lse);
  EXPECT_TRUE(identical(buffer.leftCols(8), expected_scores));
  EXPECT_TRUE(identical(lse, expected_lse));
}

// A decode step checks aliasing before appending, so a rejected call leaves the cache unchanged;
// appending rows of the cache's own buffers is rejected too (appending may move them).
TYPED_TEST(AliasingTest, DecodeStepAndAppendRejectAliasingBeforeTouchingTheCache) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, d = 4, keys = 10;
  KVCache<T> cache(16, 1, d);
  cache.append(rng.normal<T>(keys, d), rng.normal<T>(keys, d));
  const Matrix<T> cached_keys = cache.keys();
  for (const Index n : {Index(1), Index(3)}) {
    SCOPED_TRACE(std::to_string(n) + " new tokens");
    Matrix<T> q = rng.normal<T>(n, heads * d), k_new = rng.normal<T>(n, d), v_new = rng.normal<T>(n, d);
    expect_invalid([&] { decode_step_into(cache, q, k_new, v_new, heads, q); }, {"output", "aliases input q"});
    // The output (n, heads d) over k_new or v_new (n, d): the latter as the left columns of the former.
    Matrix<T> wide_k(n, heads * d);
    wide_k.leftCols(d) = k_new;
    expect_invalid([&] { decode_step_into(cache, q, wide_k.leftCols(d), v_new, heads, wide_k); },
                   {"output", "aliases input k_new"});
    Matrix<T> wide_v(n, heads * d);
    wide_v.leftCols(d) = v_new;
    expect_invalid([&] { decode_step_into(cache, q, k_new, wide_v.leftCols(d), heads, wide_v); },
                   {"output", "aliases input v_new"});
    EXPECT_EQ(cache.size(), keys);
    EXPECT_EQ(cache.position(), keys);
    EXPECT_TRUE(identical(Matrix<T>(cache.keys()), cached_keys));
  }
  expect_invalid([&] { cache.append(cache.keys().bottomRows(1), cache.values().bottomRows(1)); },
                 {"key buffer (16 x 4) aliases appended k_rows (1 x 4)"});
  EXPECT_EQ(cache.size(), keys);
  EXPECT_TRUE(identical(Matrix<T>(cache.keys()), cached_keys));
}

}  // namespace
