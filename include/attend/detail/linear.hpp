// SPDX-License-Identifier: MIT
/// \file detail/linear.hpp
/// \brief The projections of attend's layers (nn.Linear): y = x W^T + b in any storage scalar,
/// accumulated in float for bf16 and half.
#pragma once

#include "../types.hpp"
#include "checks.hpp"
#include "parallel.hpp"

#include <string>
#include <type_traits>

namespace attend::detail {

/// y = x W^T + b, the nn.Linear convention (W is (out_features, in_features); b may be empty),
/// without shape checks. For bf16 and half (a layer that runs as PyTorch runs a bf16 module),
/// x, W and b are widened exactly to float, the products accumulated in float (never in Eigen's
/// bf16 GEMM, which accumulates in 16 bits), and y rounded to S once, after the bias. The
/// product runs in parallel over fixed blocks of rows, so its bits do not depend on threads.
template <class S>
Matrix<S> linear_rows(const ConstMatrixRef<S>& x, const Matrix<S>& weight, const Vector<S>& bias) {
  using T = accumulator_t<S>;
  if constexpr (std::is_same_v<S, T>) {
    Matrix<T> y(x.rows(), weight.rows());
    parallel_product(y, x, weight.transpose());
    if (bias.size() != 0) y.rowwise() += bias.transpose();
    return y;
  } else {
    const Matrix<T> wide_x = x.template cast<T>(), wide_weight = weight.template cast<T>();
    Matrix<T> y(x.rows(), weight.rows());
    parallel_product(y, wide_x, wide_weight.transpose());
    if (bias.size() != 0) y.rowwise() += bias.template cast<T>().transpose();
    return y.template cast<S>();
  }
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
