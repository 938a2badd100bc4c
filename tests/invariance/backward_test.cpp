// SPDX-License-Identifier: MIT
// The backward entry points (attention/backward.hpp) give bitwise the same gradients under
// every thread count (OpenMP teams of 1, 2 and 3, Eigen::setNbThreads(1..3), a call from inside
// the caller's parallel region), on repeated runs, and for strided, offset and column-major
// views of their inputs and outputs: the key pass and the query pass own their outputs, with
// no atomics and sums in a fixed order. The shapes split the work: several key and query tiles
// per head, several heads; the varlen multi-head entries over packed sequences.
#include "support/attention_case.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <attend/attention/backward.hpp>

#include <gtest/gtest.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class BackwardInvarianceTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BackwardInvarianceTest, Scalars);

/// Every gradient a call returns, side by side.
template <class T>
struct Outputs {
  std::vector<Matrix<T>> matrices;
};

template <class T>
::testing::AssertionResult identical_outputs(const Outputs<T>& a, const Outputs<T>& b) {
  if (a.matrices.size() != b.matrices.size()) return ::testing::AssertionFailure() << "different output counts";
  for (std::size_t i = 0; i < a.matrices.size(); ++i) {
    const ::testing::AssertionResult same = identical(a.matrices[i], b.matrices[i]);
    if (!same) return ::testing::AssertionFailure() << "output " << i << ": " << same.message();
  }
  return ::testing::AssertionSuccess();
}

/// The inputs of the entries: 160 queries (5 query tiles of 32), 300 keys (5 key tiles of 64,
/// the last short), 4 heads over 2 kv heads of width 16.
template <class T>
struct Data {
  Matrix<T> q, k, v, d_out, bias;
  Vector<T> table;
  explicit Data(Rng& rng)
      : q(rng.normal<T>(160, 64)),
        k(rng.normal<T>(300, 32)),
        v(rng.normal<T>(300, 32)),
        d_out(rng.normal<T>(160, 64)),
        bias(rng.normal<T>(160, 300)),
        table(rng.normal<T>(32, 1)) {}
};

AttentionOptions tiles() { return blocked_path(32, 64); }

/// The entries, each a function of (q, k, v, d_out) views (one head: the first 16 columns).
template <class T>
std::vector<std::pair<std::string, std::function<Outputs<T>(const ConstMatrixRef<T>&, const ConstMatrixRef<T>&,
                                                            const ConstMatrixRef<T>&, const ConstMatrixRef<T>&)>>>
entries(const Data<T>& data) {
  using Views = const ConstMatrixRef<T>&;
  std::vector<std::pair<std::string, std::function<Outputs<T>(Views, Views, Views, Views)>>> list;
  for (const AttentionOptions& options : {tiles(), materialized_path()}) {
    const bool blocked = options.algorithm == Algorithm::Blocked;
    list.push_back({"scaled dot, causal, " + describe(options), [options](Views q, Views k, Views v, Views d_out) {
                      const auto qh = q.leftCols(16), kh = k.leftCols(16), vh = v.leftCols(16), dh = d_out.leftCols(16);
                      const AttentionResult<T> f = scaled_dot_product_attention_with_lse(qh, kh, vh, Causal(), options);
                      AttentionGradients<T> g =
                          scaled_dot_product_attention_backward(qh, kh, vh, f, dh, Causal(), options);
                      return Outputs<T>{{g.dq, g.dk, g.dv}};
                    }});
    list.push_back(
        {"biases with gradients, " + describe(options), [options, &data](Views q, Views k, Views v, Views d_out) {
           const auto qh = q.leftCols(16), kh = k.leftCols(16), vh = v.leftCols(16), dh = d_out.leftCols(16);
           const auto mask = AdditiveMask(data.bias) & RelativePositionBias(data.table, true, 64) &
                             Window(40, 10, Alignment::BottomRight);
           const AttentionResult<T> f = scaled_dot_product_attention_with_lse(qh, kh, vh, mask, options);
           Matrix<T> d_bias;
           Vector<T> d_table;
           BiasGradients<T> request;
           request.d_bias = &d_bias;
           request.d_table = &d_table;
           request.table_buckets = {32, true, 64, Alignment::TopLeft};
           AttentionGradients<T> g = scaled_dot_product_attention_backward(qh, kh, vh, f, dh, mask, options, request);
           return Outputs<T>{{g.dq, g.dk, g.dv, d_bias, Matrix<T>(d_table)}};
         }});
    list.push_back({"soft cap, " + describe(options), [options](Views q, Views k, Views v, Views d_out) {
                      const auto qh = q.leftCols(16), kh = k.leftCols(16), vh = v.leftCols(16), dh = d_out.leftCols(16);
                      Matrix<T> out(qh.rows(), 16);
                      Vector<T> lse(qh.rows());
                      soft_capped_attention_into(qh, kh, vh, 1.0, out, KeyPadding(250), options, lse);
                      AttentionGradients<T> g =
                          soft_capped_attention_backward(qh, kh, vh, 1.0, out, lse, dh, KeyPadding(250), options);
                      return Outputs<T>{{g.dq, g.dk, g.dv}};
                    }});
    if (blocked)  // (their cores are the scaled dot's, which the materialized entries above cover)
      list.push_back(
          {"bilinear, cosine, top-k and window, " + describe(options),
           [options](Views q, Views k, Views v, Views d_out) {
             const auto qh = q.leftCols(16), kh = k.leftCols(16), vh = v.leftCols(16), dh = d_out.leftCols(16);
             const Matrix<T> w = q.middleRows(0, 16).middleCols(16, 16);  // (16, 16)
             Matrix<T> out(qh.rows(), 16);
             Vector<T> lse(qh.rows());
             Outputs<T> all;
             bilinear_attention_into(qh, kh, vh, w, out, Causal(), options, lse);
             const BilinearGradients<T> b = bilinear_attention_backward(qh, kh, vh, w, out, lse, dh, Causal(), options);
             AttentionOptions plain = options;
             cosine_attention_into(qh, kh, vh, 0.5, out, NoMask{}, plain, lse);
             const CosineGradients<T> c = cosine_attention_backward(qh, kh, vh, 0.5, out, lse, dh, NoMask{}, plain);
             top_k_attention_into(qh, kh, vh, 9, out, Causal(), options, lse);
             const AttentionGradients<T> t = top_k_attention_backward(qh, kh, vh, 9, out, lse, dh, Causal(), options);
             const Window window(30, 5, Alignment::BottomRight);
             local_window_attention_into(qh, kh, vh, window, out, NoMask{}, options, lse);
             const AttentionGradients<T> l =
                 local_window_attention_backward(qh, kh, vh, window, out, lse, dh, NoMask{}, options);
             Matrix<T> dt(1, 1);
             dt(0, 0) = c.d_temperature;
             return Outputs<T>{{b.dq, b.dk, b.dv, b.dw, c.dq, c.dk, c.dv, dt, t.dq, t.dk, t.dv, l.dq, l.dk, l.dv}};
           }});
    list.push_back({"multi-head GQA, " + describe(options), [options](Views q, Views k, Views v, Views d_out) {
                      const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, 4, Causal(), options);
                      AttentionGradients<T> g = multi_head_attention_backward(q, k, v, 4, f, d_out, Causal(), options);
                      return Outputs<T>{{f.output, f.lse, g.dq, g.dk, g.dv}};
                    }});
    // Packed sequences read in place (an empty one among them), their key and query tiles in one
    // parallel loop per pass, and a T5 table gradient summed over the sequences.
    list.push_back(
        {"multi-head varlen GQA, " + describe(options), [options, &data](Views q, Views k, Views v, Views d_out) {
           const SequenceRows q_rows = SequenceRows::packed(std::vector<Index>{0, 70, 70, 160});
           const SequenceRows k_rows = SequenceRows::packed(std::vector<Index>{0, 130, 200, 300});
           const auto mask = Causal(Alignment::BottomRight) & KeyPadding(std::vector<Index>{100, 50, 90}) &
                             RelativePositionBias(data.table, true, 64);
           const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, 4, q_rows, k_rows, mask, options);
           Vector<T> d_table;
           BiasGradients<T> request;
           request.d_table = &d_table;
           request.table_buckets = {32, true, 64, Alignment::TopLeft};
           AttentionGradients<T> g =
               multi_head_attention_backward(q, k, v, 4, q_rows, k_rows, f, d_out, mask, options, request);
           return Outputs<T>{{f.output, f.lse, g.dq, g.dk, g.dv, Matrix<T>(d_table)}};
         }});
  }
  return list;
}

TYPED_TEST(BackwardInvarianceTest, GradientsAreBitwiseIndependentOfThreadSettingsAndRuns) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Data<T> data(rng);
  for (const auto& entry : entries(data)) {
    // A named reference, not a structured binding: clang 14 cannot capture one in the OpenMP
    // region below.
    const auto& run = entry.second;
    SCOPED_TRACE(entry.first);
    const Outputs<T> first = run(data.q, data.k, data.v, data.d_out);
    EXPECT_TRUE(identical_outputs(run(data.q, data.k, data.v, data.d_out), first)) << "repeated run";
    for (int eigen_threads : {1, 3}) {
      Eigen::setNbThreads(eigen_threads);
      EXPECT_TRUE(identical_outputs(run(data.q, data.k, data.v, data.d_out), first))
          << "Eigen threads " << eigen_threads;
    }
    Eigen::setNbThreads(0);
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    for (int threads : {1, 2, 3}) {
      omp_set_num_threads(threads);
      EXPECT_TRUE(identical_outputs(run(data.q, data.k, data.v, data.d_out), first)) << "OpenMP threads " << threads;
    }
    omp_set_num_threads(saved);
    std::optional<Outputs<T>> inside;
#pragma omp parallel num_threads(2)
    {
      if (omp_get_thread_num() == 0) inside = run(data.q, data.k, data.v, data.d_out);
    }
    EXPECT_TRUE(identical_outputs(*inside, first)) << "inside the caller's parallel region";
#endif
  }
}

TYPED_TEST(BackwardInvarianceTest, GradientsAreBitwiseIndependentOfViewLayouts) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Data<T> data(rng);
  // The same values as blocks of wider matrices at odd column offsets (unaligned rows), and
  // column-major (Eigen copies them into row-major temporaries).
  Matrix<T> wide_q(160, 64 + 3), wide_k(300, 32 + 5), wide_v(300, 32 + 1), wide_d(160, 64 + 7);
  wide_q.middleCols(3, 64) = data.q;
  wide_k.middleCols(5, 32) = data.k;
  wide_v.middleCols(1, 32) = data.v;
  wide_d.middleCols(7, 64) = data.d_out;
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const ColMajor q_col = data.q, k_col = data.k;
  for (const auto& [name, run] : entries(data)) {
    SCOPED_TRACE(name);
    const Outputs<T> first = run(data.q, data.k, data.v, data.d_out);
    EXPECT_TRUE(identical_outputs(
        run(wide_q.middleCols(3, 64), wide_k.middleCols(5, 32), wide_v.middleCols(1, 32), wide_d.middleCols(7, 64)),
        first))
        << "offset blocks";
    EXPECT_TRUE(identical_outputs(run(q_col, k_col, data.v, data.d_out), first)) << "column-major";
  }
}

}  // namespace
