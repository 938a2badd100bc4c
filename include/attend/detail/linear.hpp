// SPDX-License-Identifier: MIT
/// \file detail/linear.hpp
/// \brief The projections of attend's layers (nn.Linear): y = x W^T + b in any storage scalar,
/// accumulated in float for bf16 and half.
#pragma once

#include "../types.hpp"
#include "checks.hpp"
#include "packet.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cstddef>
#include <string>
#include <type_traits>

namespace attend::detail {

/// Output features per task of a projection of few rows (a decode step): fixed, so the result
/// never depends on the thread count.
inline constexpr Index kProjectionFeatures = 64;

/// At most this many rows of x make a projection run over blocks of output features (in
/// parallel over W's rows, each read once in its own format by few_rows_product) instead of
/// blocks of rows of x, which would leave one thread to read all of W for a decode step.
inline constexpr Index kFewProjectionRows = 16;

/// The register block of few_rows_product for 2..kFewProjectionRows rows: kFewRowsBlock rows
/// of x against kFewFeaturesBlock rows of W (output features), one accumulator packet each,
/// plus a packet of W per feature and one of x: 4 x 4 takes 21 of AVX-512's 32 vector
/// registers; with 16 (AVX, SSE, NEON) 2 x 4 takes 13. A single row of x (a decode step) runs
/// against one row of W at a time with kSingleRowUnroll accumulators instead: W is then read as
/// one contiguous stream, which the hardware prefetcher follows at the memory's speed, where 4
/// rows of W read side by side (4 streams 8 KiB apart) ran at half that speed for bf16 (a 4096 x
/// 4096 bf16 W against 1 row, one thread, AVX-512: 1.6 ms with 4 streams, 0.8 ms with one).
#if defined(EIGEN_VECTORIZE_AVX512)
inline constexpr int kFewRowsBlock = 4;
#else
inline constexpr int kFewRowsBlock = 2;
#endif
inline constexpr int kFewFeaturesBlock = 4;
inline constexpr int kSingleRowUnroll = 4;

/// p[0] + ... + p[N - 1], added pairwise (N a power of 2).
template <int N, class P>
P sum_of_packets(const P* p) {
  static_assert(N >= 1 && (N & (N - 1)) == 0, "sum_of_packets adds a power of 2 of packets");
  if constexpr (N == 1)
    return p[0];
  else
    return Eigen::internal::padd(sum_of_packets<N / 2>(p), sum_of_packets<N / 2>(p + N / 2));
}

/// y(r, f) = sum_c x(r, c) w(f, c) for R rows of x and F rows of w (compile-time counts), depth
/// columns, x in T and w in S, widened exactly to T as it is loaded (load_as): W is read once in
/// its own format and never copied. Each sum is accumulated lane-wise in U packets (packet k of
/// the depth into accumulator k mod U), those added pairwise, their lanes in order
/// (sum_of_lanes), then the tail columns in order: its bits depend on depth and U alone, not on
/// R, F or where the block sits.
template <int R, int F, int U, class T, class S>
void projection_block(T* y, Index y_stride, const T* x, Index x_stride, const S* w, Index w_stride, Index depth) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  constexpr Index W = kLanes<T>;
  P sums[std::size_t(R)][std::size_t(F)][std::size_t(U)];
  ATTEND_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTEND_UNROLL
    for (int f = 0; f < F; ++f) {
      ATTEND_UNROLL
      for (int u = 0; u < U; ++u) sums[r][f][u] = simd::pset1<P>(T(0));
    }
  }
  const auto step = [&](Index c, int u) {
    P wf[std::size_t(F)];
    ATTEND_UNROLL
    for (int f = 0; f < F; ++f) wf[f] = load_as<T>(w + f * w_stride + c);
    ATTEND_UNROLL
    for (int r = 0; r < R; ++r) {
      const P xr = simd::ploadu<P>(x + r * x_stride + c);
      ATTEND_UNROLL
      for (int f = 0; f < F; ++f) sums[r][f][u] = simd::pmadd(xr, wf[f], sums[r][f][u]);
    }
  };
  Index c = 0;
  for (; c + U * W <= depth; c += U * W) {
    ATTEND_UNROLL
    for (int u = 0; u < U; ++u) step(c + u * W, u);
  }
  for (int u = 0; c + W <= depth; c += W, ++u) step(c, u);  // the last whole packets, fewer than U
  for (int r = 0; r < R; ++r)
    for (int f = 0; f < F; ++f) {
      T sum = sum_of_lanes(sum_of_packets<U>(sums[r][f]));
      for (Index k = c; k < depth; ++k) sum += x[r * x_stride + k] * widen<T>(w[f * w_stride + k]);
      y[r * y_stride + f] = sum;
    }
}

/// y = x W^T (y is (rows, out_features), x (rows, in_features) in T, W (out_features,
/// in_features) in S) for a decode step's few rows: in parallel over fixed blocks of
/// kProjectionFeatures rows of W, each read once from memory, in S, and widened in registers
/// (projection_block; the rows of x past the first block re-read it from the cache). The bits do not
/// depend on threads, nor on the position of a row among x's rows; they differ between one
/// row and several (U = kSingleRowUnroll or 1 accumulators per sum), as Eigen's GEMV and GEMM
/// did. Any number of rows works; beyond kFewProjectionRows a GEMM is faster.
template <class T, class S>
void few_rows_product(MatrixRef<T> y, const ConstMatrixRef<T>& x, const Matrix<S>& weight) {
  const Index rows = x.rows(), features = weight.rows(), depth = weight.cols();
  if (rows == 0) return;
  parallel_for(
      (features + kProjectionFeatures - 1) / kProjectionFeatures, [&](Index block) {
        const Index f_end = std::min(features, (block + 1) * kProjectionFeatures);
        if (rows == 1) {
          for (Index f = block * kProjectionFeatures; f < f_end; ++f)
            projection_block<1, 1, kSingleRowUnroll>(y.data() + f, 0, x.data(), 0, weight.data() + f * depth, 0, depth);
          return;
        }
        for (Index f = block * kProjectionFeatures; f < f_end; f += kFewFeaturesBlock)
          with_static_size<kFewFeaturesBlock>(std::min<Index>(kFewFeaturesBlock, f_end - f), [&](auto block_features) {
            for (Index r = 0; r < rows; r += kFewRowsBlock)
              with_static_size<kFewRowsBlock>(std::min<Index>(kFewRowsBlock, rows - r), [&](auto block_rows) {
                projection_block<decltype(block_rows)::value, decltype(block_features)::value, 1>(
                    y.data() + r * y.outerStride() + f, y.outerStride(), x.data() + r * x.outerStride(),
                    x.outerStride(), weight.data() + f * depth, depth, depth);
              });
          });
      });
}

/// dst[i] = src[i] widened exactly to T, i < n, a packet at a time (load_as: F16C and AVX-512
/// conversions, where Eigen's cast of a bf16 matrix converts one value at a time).
template <class T, class S>
void widen_into(T* dst, const S* src, Index n) {
  Index i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) Eigen::internal::pstoreu(dst + i, load_as<T>(src + i));
  for (; i < n; ++i) dst[i] = widen<T>(src[i]);
}

/// Rows [r0, r0 + n) of x (row-major, any outer stride) widened exactly to T into dst, resized
/// to (n, x.cols()).
template <class T, class X>
void widen_rows_into(Matrix<T>& dst, const X& x, Index r0, Index n) {
  dst.resize(n, x.cols());
  for (Index r = 0; r < n; ++r) widen_into(dst.row(r).data(), x.row(r0 + r).data(), x.cols());
}

/// y rounded to S (nearest even), a packet at a time (store_as).
template <class S, class T>
Matrix<S> rounded_to(const Matrix<T>& y) {
  Matrix<S> out(y.rows(), y.cols());
  const Index n = y.size();
  Index i = 0;
  for (; i + kLanes<T> <= n; i += kLanes<T>) store_as(out.data() + i, Eigen::internal::ploadu<Packet<T>>(y.data() + i));
  for (; i < n; ++i) out.data()[i] = S(y.data()[i]);
  return out;
}

/// y = x W^T + b, the nn.Linear convention (W is (out_features, in_features); b may be empty),
/// without shape checks. For bf16 and half (a layer that runs as PyTorch runs a bf16 module),
/// x, W and b are widened exactly to float, the products accumulated in float (never in Eigen's
/// bf16 GEMM, which accumulates in 16 bits), and y rounded to S once, after the bias. The
/// product runs in parallel over fixed blocks of rows of x, or for at most kFewProjectionRows
/// rows over fixed blocks of output features (few_rows_product: W is then read once, in S, and
/// widened in registers; float and double W take the same kernel: for float as fast as Eigen's
/// GEMV for one row, 1.6-2.3x faster than its GEMM for 4..16 rows, E = 4096, one thread, under
/// load), so its bits do not depend on threads.
template <class S>
Matrix<S> linear_rows(const ConstMatrixRef<S>& x, const Matrix<S>& weight, const Vector<S>& bias) {
  using T = accumulator_t<S>;
  constexpr bool kWiden = !std::is_same_v<S, T>;
  const Index rows = x.rows(), features = weight.rows();
  Matrix<T> y(rows, features);  // (rows, out_features)
  const auto project = [&](const ConstMatrixRef<T>& lhs) {  // lhs: x in T, (rows, in_features)
    if (rows <= kFewProjectionRows) {
      few_rows_product<T>(y, lhs, weight);
    } else if constexpr (kWiden) {
      Matrix<T> wide_weight;
      widen_rows_into(wide_weight, weight, 0, features);
      parallel_product(y, lhs, wide_weight.transpose());
    } else {
      parallel_product(y, lhs, weight.transpose());
    }
  };
  if constexpr (kWiden) {
    Matrix<T> wide_x;
    widen_rows_into(wide_x, x, 0, rows);
    project(wide_x);
  } else
    project(x);
  if (bias.size() != 0) y.rowwise() += bias.template cast<T>().transpose();
  if constexpr (kWiden)
    return rounded_to<S>(y);
  else
    return y;
}

/// linear_rows after checking that x's width matches W's columns (`what` names the projection
/// in the message: "q_proj" gives "q_proj input (...) does not match q_proj_weight (...)").
/// x is a view, so that every input expression shares one instantiation (extern_templates.hpp).
template <class S>
Matrix<S> linear(const ConstMatrixRef<S>& x, const Matrix<S>& weight, const Vector<S>& bias, const char* what) {
  ATTEND_CHECK(x.cols() == weight.cols(), std::string(what) + " input " + shape_of(x) + " does not match " + what +
                                              "_weight " + shape_of(weight) + " (input width = weight columns)");
  return linear_rows(x, weight, bias);
}

}  // namespace attend::detail
