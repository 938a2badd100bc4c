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
#include <string>
#include <type_traits>

namespace attend::detail {

/// Output features per task of a projection of few rows (a decode step): fixed, so the result
/// never depends on the thread count. 64 rows of a 4096-wide W widened to float are 1 MiB.
inline constexpr Index kProjectionFeatures = 64;

/// At most this many rows of x make a projection run over blocks of output features (in
/// parallel over W's rows, each block of W widened once into a thread's scratch) instead of
/// blocks of rows of x, which would leave one thread to read all of W for a decode step.
inline constexpr Index kFewProjectionRows = 16;

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
/// rows over fixed blocks of output features (W is then read once, in S, and widened a block at
/// a time), so its bits do not depend on threads.
template <class S>
Matrix<S> linear_rows(const ConstMatrixRef<S>& x, const Matrix<S>& weight, const Vector<S>& bias) {
  using T = accumulator_t<S>;
  constexpr bool kWiden = !std::is_same_v<S, T>;
  const Index rows = x.rows(), features = weight.rows();
  Matrix<T> y(rows, features);  // (rows, out_features)
  const auto project = [&](const auto& lhs) {  // lhs: x in T, (rows, in_features)
    if (rows <= kFewProjectionRows) {
      parallel_for_with_scratch(
          (features + kProjectionFeatures - 1) / kProjectionFeatures, [] { return Matrix<T>(); },
          [&](Index block, Matrix<T>& wide_weight) {
            const Index f0 = block * kProjectionFeatures, n = std::min(kProjectionFeatures, features - f0);
            if constexpr (kWiden) {
              widen_rows_into(wide_weight, weight, f0, n);  // (n, in_features)
              serial_product(y.middleCols(f0, n), lhs, wide_weight.transpose());
            } else {
              serial_product(y.middleCols(f0, n), lhs, weight.middleRows(f0, n).transpose());
            }
          });
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
