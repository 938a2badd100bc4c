// SPDX-License-Identifier: MIT
// Batched multi-head attention: every (sequence, head) block against the long-double reference
// of that head and against a per-head loop of scaled_dot_product_attention, thread-count
// invariance, zero-copy views, degenerate sizes and invalid layouts.
#include "support/baseline.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <attend/attention/batched.hpp>
#include <attend/attention/scaled_dot_product.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using attend::Algorithm;
using attend::AttentionOptions;
using attend::BatchLayout;
using attend::Index;
using attend::Matrix;
using namespace attend::test;

template <class T>
class BatchedTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BatchedTest, Scalars);

AttentionOptions path(Algorithm algorithm, Index block_q = 0, Index block_k = 0) {
  AttentionOptions o;
  o.algorithm = algorithm;
  o.block_q = block_q;
  o.block_k = block_k;
  return o;
}

std::vector<AttentionOptions> paths() {
  return {path(Algorithm::Materialized), path(Algorithm::Blocked), path(Algorithm::Blocked, 16, 7),
          path(Algorithm::Blocked, 1, 64)};
}

/// Restores the OpenMP thread count a test changes.
class ThreadCount {
 public:
#ifdef _OPENMP
  ThreadCount() : saved_(omp_get_max_threads()) {}
  ~ThreadCount() { omp_set_num_threads(saved_); }
  void set(int n) { omp_set_num_threads(n); }

 private:
  int saved_;
#else
  void set(int) {}
#endif
};

/// Checks batched attention of one drawn problem: each head block of the output against the
/// reference of that head (tolerance rule), and against scaled_dot_product_attention run on
/// the same head's views (identical for the blocked path, which runs the same tiles).
template <class T, class Mask>
void check_heads(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, const BatchLayout& layout,
                 const Mask& mask, const attend::BoolMatrix& visible) {
  const Index batch = layout.batch_size, heads = layout.num_heads;
  const Index lq = q.rows() / batch, lk = k.rows() / batch, dk = q.cols() / heads, dv = v.cols() / heads;
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE("algorithm " + std::to_string(int(options.algorithm)) + " tiles (" + std::to_string(options.block_q) +
                 ", " + std::to_string(options.block_k) + ")");
    const Matrix<T> out = attend::batched_attention(q, k, v, layout, mask, options);
    ASSERT_EQ(out.rows(), batch * lq);
    ASSERT_EQ(out.cols(), heads * dv);
    for (Index b = 0; b < batch; ++b)
      for (Index h = 0; h < heads; ++h) {
        SCOPED_TRACE("sequence " + std::to_string(b) + " head " + std::to_string(h));
        const auto qh = q.block(b * lq, h * dk, lq, dk);
        const auto kh = k.block(b * lk, h * dk, lk, dk);
        const auto vh = v.block(b * lk, h * dv, lk, dv);
        const Matrix<T> got = out.block(b * lq, h * dv, lq, dv);
        const Real scale = 1 / std::sqrt(Real(dk));
        const Reference ref = reference_attention(qh, kh, vh, scale, visible);
        const Baseline<T> base = baseline_attention<T>(qh, kh, vh, T(1) / std::sqrt(T(dk)), visible);
        EXPECT_TRUE(within_tolerance<T>(got, ref.output, base.output));
        const Matrix<T> loop = attend::scaled_dot_product_attention(qh, kh, vh, mask, options);
        EXPECT_TRUE(within_tolerance<T>(loop, ref.output, base.output));
        if (options.algorithm == Algorithm::Blocked) {
          EXPECT_TRUE(got == loop) << "differs from the per-head loop";
        }
      }
  }
}

TYPED_TEST(BatchedTest, EveryHeadMatchesReferenceAndPerHeadLoop) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  struct Shape {
    Index batch, heads, lq, lk, dk, dv;
  };
  for (const Shape s : {Shape{1, 1, 9, 9, 4, 4}, Shape{2, 3, 17, 17, 8, 5}, Shape{3, 2, 20, 33, 16, 16},
                        Shape{2, 4, 40, 24, 7, 9}}) {
    SCOPED_TRACE("B=" + std::to_string(s.batch) + " H=" + std::to_string(s.heads) + " Lq=" + std::to_string(s.lq) +
                 " Lk=" + std::to_string(s.lk) + " Dk=" + std::to_string(s.dk) + " Dv=" + std::to_string(s.dv));
    const Matrix<T> q = rng.normal<T>(s.batch * s.lq, s.heads * s.dk);
    const Matrix<T> k = rng.normal<T>(s.batch * s.lk, s.heads * s.dk);
    const Matrix<T> v = rng.normal<T>(s.batch * s.lk, s.heads * s.dv);
    const BatchLayout layout{s.heads, s.batch};
    {
      SCOPED_TRACE("NoMask");
      check_heads<T>(q, k, v, layout, attend::NoMask{}, all_visible(s.lq, s.lk));
    }
    {
      SCOPED_TRACE("Causal(BottomRight)");
      const auto a = attend::Alignment::BottomRight;
      check_heads<T>(q, k, v, layout, attend::Causal(a), causal_visibility(s.lq, s.lk, a));
    }
    {
      const Index left = rng.uniform(0, s.lk / 2), right = rng.uniform(0, 3);
      SCOPED_TRACE("Window(" + std::to_string(left) + ", " + std::to_string(right) + ")");
      check_heads<T>(q, k, v, layout, attend::Window(left, right),
                     window_visibility(s.lq, s.lk, left, right, attend::Alignment::TopLeft));
    }
    {
      const attend::BoolMatrix visible = rng.bernoulli(s.lq, s.lk, 0.7);
      SCOPED_TRACE("BooleanMask(p=0.7)");
      check_heads<T>(q, k, v, layout, attend::BooleanMask(visible), visible);
    }
  }
}

TYPED_TEST(BatchedTest, BitwiseIdenticalForOneTwoAndThreeThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#endif
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const BatchLayout layout{3, 2};
  const Index lq = 70, lk = 90, dk = 16, dv = 12;
  const Matrix<T> q = rng.normal<T>(layout.batch_size * lq, layout.num_heads * dk);
  const Matrix<T> k = rng.normal<T>(layout.batch_size * lk, layout.num_heads * dk);
  const Matrix<T> v = rng.normal<T>(layout.batch_size * lk, layout.num_heads * dv);
  ThreadCount threads;
  for (const AttentionOptions& options : paths()) {
    SCOPED_TRACE("algorithm " + std::to_string(int(options.algorithm)) + " tiles (" + std::to_string(options.block_q) +
                 ", " + std::to_string(options.block_k) + ")");
    std::vector<Matrix<T>> outs;
    for (int n : {1, 2, 3}) {
      threads.set(n);
      outs.push_back(attend::batched_attention(q, k, v, layout, attend::Causal{}, options));
    }
    for (std::size_t i = 1; i < outs.size(); ++i)
      EXPECT_EQ(0, std::memcmp(outs[0].data(), outs[i].data(), sizeof(T) * std::size_t(outs[0].size())))
          << "1 thread and " << i + 1 << " threads differ";
  }
}

TYPED_TEST(BatchedTest, ReadsAndWritesBlocksOfLargerMatricesInPlace) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const BatchLayout layout{2, 2};
  const Index lq = 11, lk = 13, dk = 6, dv = 5;
  // Q, K, V and the output live in the middle columns of wider matrices (as in a fused QKV).
  const Matrix<T> wide_q = rng.normal<T>(2 * lq, 2 * dk + 3), wide_kv = rng.normal<T>(2 * lk, 2 * dk + 2 * dv + 1);
  const auto q = wide_q.middleCols(1, 2 * dk);
  const auto k = wide_kv.middleCols(1, 2 * dk);
  const auto v = wide_kv.middleCols(1 + 2 * dk, 2 * dv);
  Matrix<T> wide_out = Matrix<T>::Constant(2 * lq, 2 * dv + 4, T(7));
  const AttentionOptions options = path(Algorithm::Blocked, 4, 4);
  attend::batched_attention_into(q, k, v, wide_out.middleCols(2, 2 * dv), layout, attend::Causal{}, options);
  const Matrix<T> expected = attend::batched_attention(Matrix<T>(q), Matrix<T>(k), Matrix<T>(v), layout,
                                                       attend::Causal{}, options);
  EXPECT_TRUE(wide_out.middleCols(2, 2 * dv) == expected);
  EXPECT_TRUE((wide_out.leftCols(2).array() == T(7)).all()) << "wrote outside the output block";
  EXPECT_TRUE((wide_out.rightCols(2).array() == T(7)).all()) << "wrote outside the output block";
}

TYPED_TEST(BatchedTest, DegenerateLengthsHaveDefinedResults) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const BatchLayout layout{2, 3};
  for (const AttentionOptions& options : paths()) {
    // Lq = 0: an empty output.
    const Matrix<T> none = attend::batched_attention(Matrix<T>(0, 8), rng.normal<T>(6, 8), rng.normal<T>(6, 4),
                                                     layout, attend::NoMask{}, options);
    EXPECT_EQ(none.rows(), 0);
    EXPECT_EQ(none.cols(), 4);
    // Lk = 0: zeros.
    const Matrix<T> zeros = attend::batched_attention(rng.normal<T>(9, 8), Matrix<T>(0, 8), Matrix<T>(0, 4), layout,
                                                      attend::NoMask{}, options);
    EXPECT_TRUE(zeros.isZero(0));
  }
}

TYPED_TEST(BatchedTest, InvalidLayoutsThrowWithShapes) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Zero(6, 8), k = Matrix<T>::Zero(6, 8), v = Matrix<T>::Zero(6, 8);
  const auto message = [&](const BatchLayout& layout, const Matrix<T>& out) -> std::string {
    try {
      Matrix<T> o = out;
      attend::batched_attention_into(q, k, v, o, layout);
    } catch (const attend::invalid_argument& e) {
      return e.what();
    }
    return "no exception";
  };
  EXPECT_NE(message({3, 1}, Matrix<T>(6, 8)).find("num_heads = 3"), std::string::npos);
  EXPECT_NE(message({2, 4}, Matrix<T>(6, 8)).find("batch_size = 4"), std::string::npos);
  EXPECT_NE(message({0, 1}, Matrix<T>(6, 8)).find("at least 1"), std::string::npos);
  EXPECT_NE(message({1, 0}, Matrix<T>(6, 8)).find("at least 1"), std::string::npos);
  EXPECT_NE(message({2, 2}, Matrix<T>(6, 7)).find("output (6 x 7)"), std::string::npos);
  const Matrix<T> k_short = Matrix<T>::Zero(6, 6);
  EXPECT_THROW(attend::batched_attention(q, k_short, v, BatchLayout{2, 1}), attend::invalid_argument);
}

}  // namespace
