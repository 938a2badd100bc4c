// SPDX-License-Identifier: MIT
// Every public entry point gives bitwise the result of contiguous inputs and outputs when its
// inputs are padded strided blocks of NaN-filled buffers, unaligned maps or column-major
// matrices, and when its outputs are blocks of NaN-filled buffers whose guard cells must stay
// untouched (reliability.md §3 row 20, §4.4a/b; pytorch#112577, #191937).
#include "support/attention_case.hpp"
#include "support/entry_points.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class ViewsTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(ViewsTest, Scalars);

/// Lengths that leave partial query and key tiles of the (16, 32) blocked tiles.
EntrySizes view_sizes() {
  return {37, 75, 12, 10, blocked_path(16, 32)};
}

/// A (rows, cols) matrix held at (row0, col0) of a larger row-major buffer of `fill`, whose
/// outer stride is cols + pad_cols; `offset` more elements in front make the view unaligned.
template <class T>
class Embedded {
 public:
  Embedded(Index rows, Index cols, Index row0, Index col0, Index pad_cols, Index offset, T fill)
      : stride_(cols + col0 + pad_cols),
        start_(offset + row0 * stride_ + col0),
        rows_(rows),
        cols_(cols),
        fill_(fill),
        buffer_(std::size_t(offset + (rows + row0 + 2) * stride_), fill) {}

  Embedded(const Matrix<T>& m, Index row0, Index col0, Index pad_cols, Index offset, T fill)
      : Embedded(m.rows(), m.cols(), row0, col0, pad_cols, offset, fill) {
    view() = m;
  }

  Eigen::Map<Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>> view() {
    return {buffer_.data() + start_, rows_, cols_, Eigen::OuterStride<>(stride_)};
  }
  Eigen::Map<const Matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>> view() const {
    return {buffer_.data() + start_, rows_, cols_, Eigen::OuterStride<>(stride_)};
  }

  /// The first buffer element outside the view that no longer holds the fill's bits, or -1.
  Index first_touched_guard() const {
    for (Index e = 0; e < Index(buffer_.size()); ++e) {
      const Index rel = e - start_;
      const bool inside = rel >= 0 && rel / stride_ < rows_ && rel % stride_ < cols_;
      if (!inside && std::memcmp(&buffer_[std::size_t(e)], &fill_, sizeof(T)) != 0) return e;
    }
    return -1;
  }

 private:
  Index stride_, start_, rows_, cols_;
  T fill_;
  std::vector<T> buffer_;
};

/// Runs `check(entry, inputs, expected)` for every entry that reads its inputs as given, after
/// the run on contiguous inputs and outputs (`expected`) passed the anti-vacuity guard.
template <class T, class Check>
void for_each_entry(bool inputs_only, Check&& check) {
  ATTEND_SEEDED_RNG(rng);
  const EntryPoints<T> entries(view_sizes(), rng);
  std::size_t visited = 0;
  entries.for_each([&](const auto& entry) {
    if (inputs_only && !entry.takes_views) return;
    SCOPED_TRACE(entry.name);
    const Inputs<T> in = draw_inputs<T>(entry.problem, rng);
    const Results<T> expected = run_entry<T>(entry, in.q, in.k, in.v);
    ASSERT_TRUE(informative(expected));
    check(entry, in, expected);
    ++visited;
  });
  EXPECT_GE(visited, 20u);
}

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// (a) Blocks of larger NaN-filled row-major buffers, at an offset, with padded outer strides
// and NaN rows after them: any read past the logical shape shows up as NaN or a changed bit.
TYPED_TEST(ViewsTest, PaddedStridedBlocksOfNaNBuffers) {
  using T = TypeParam;
  for_each_entry<T>(true, [](const auto& entry, const Inputs<T>& in, const Results<T>& expected) {
    const Embedded<T> q(in.q, 2, 1, 5, 0, T(kNaN)), k(in.k, 1, 3, 7, 0, T(kNaN)), v(in.v, 3, 2, 1, 0, T(kNaN));
    EXPECT_TRUE(identical_results(run_entry<T>(entry, q.view(), k.view(), v.view()), expected));
  });
}

// (b) Contiguous maps one element past an aligned address: no kernel may assume alignment.
TYPED_TEST(ViewsTest, UnalignedMaps) {
  using T = TypeParam;
  for_each_entry<T>(true, [](const auto& entry, const Inputs<T>& in, const Results<T>& expected) {
    const Embedded<T> q(in.q, 0, 0, 0, 1, T(kNaN)), k(in.k, 0, 0, 0, 1, T(kNaN)), v(in.v, 0, 0, 0, 1, T(kNaN));
    ASSERT_NE(reinterpret_cast<std::uintptr_t>(q.view().data()) % (2 * sizeof(T)), 0u);
    EXPECT_TRUE(identical_results(run_entry<T>(entry, q.view(), k.view(), v.view()), expected));
  });
}

// (c) Column-major matrices, and an expression without storage of its own (every front
// function takes any Eigen expression).
TYPED_TEST(ViewsTest, ColumnMajorAndExpressionArguments) {
  using T = TypeParam;
  using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  for_each_entry<T>(true, [](const auto& entry, const Inputs<T>& in, const Results<T>& expected) {
    const ColMajor q = in.q, k = in.k, v = in.v;
    EXPECT_TRUE(identical_results(run_entry<T>(entry, q, k, v * T(1)), expected));  // x * 1 is exact
  });
}

// (d) Outputs written into blocks of NaN-filled buffers (padded stride, unaligned): the blocks
// hold exactly the contiguous result, and every guard cell around them keeps its NaN bits.
TYPED_TEST(ViewsTest, OutputBlocksOfNaNBuffersLeaveTheirGuardsUntouched) {
  using T = TypeParam;
  for_each_entry<T>(false, [](const auto& entry, const Inputs<T>& in, const Results<T>& expected) {
    const Problem& p = entry.problem;
    Embedded<T> out(p.lq, p.out_cols, 2, 3, 4, 1, T(kNaN)), lse(p.lse_size, 1, 3, 0, 0, 1, T(kNaN)),
        weights(p.lq, p.weight_cols, 1, 2, 5, 0, T(kNaN));
    // lse is a vector with unit stride: a column of the (lse_size, 1) block.
    Eigen::Map<Vector<T>> lse_view(lse.view().data(), p.lse_size);
    entry.run(in.q, in.k, in.v, OutputViews<T>{out.view(), lse_view, weights.view()});
    Results<T> got(p);
    got.out = out.view();
    got.lse = lse_view;
    got.weights = weights.view();
    EXPECT_TRUE(identical_results(got, expected));
    EXPECT_EQ(out.first_touched_guard(), -1) << "output guard overwritten";
    EXPECT_EQ(lse.first_touched_guard(), -1) << "log-sum-exp guard overwritten";
    EXPECT_EQ(weights.first_touched_guard(), -1) << "weights guard overwritten";
  });
}

}  // namespace
