// SPDX-License-Identifier: MIT
/// \file types.hpp
/// \brief Matrix and view types: one token per row, row-major.
#pragma once

#include "config.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

namespace attend {

/// Dense row-major matrix, one token per row. A head of an (L, H*d) matrix `x` is the zero-copy
/// view `x.middleCols(h * d, d)`.
template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Column vector (one value per query row, e.g. the log-sum-exp).
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Boolean mask matrix, true = may attend (PyTorch SDPA convention).
using BoolMatrix = Matrix<bool>;

/// Read-only view of a row-major matrix with any outer stride. Binding a column-major argument
/// evaluates it into a temporary owned by the view.
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

/// Writable view of a row-major matrix with any outer stride (a block of a larger matrix works).
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;

/// Writable view of a vector with unit stride.
template <class T>
using VectorRef = Eigen::Ref<Vector<T>>;

/// The type attend computes and accumulates in for storage scalar S: double for double, float
/// for float, Eigen::bfloat16 and Eigen::half (scores, running max and sum, the P V accumulator,
/// the log-sum-exp and the attention weights are never held in a 16-bit type).
template <class S>
using accumulator_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

namespace detail {

/// An empty vector view: "this optional output is not wanted".
template <class T>
VectorRef<T> no_vector() {
  return VectorRef<T>(Eigen::Map<Vector<T>>(nullptr, 0));
}

/// "(rows x cols)", for error messages.
template <class D>
std::string shape_of(const Eigen::EigenBase<D>& m) {
  return "(" + std::to_string(m.rows()) + " x " + std::to_string(m.cols()) + ")";
}

/// A double as printf's %g writes it (1e-300, 0.125, inf, nan), for error messages, with as many
/// significant digits as it takes (6 to 17) to read back as the same double: 0.9999999 shows
/// as 0.9999999, not 1.
inline std::string number_string(double x) {
  char buffer[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buffer, sizeof buffer, "%.*g", digits, x);
    if (std::isnan(x) || std::strtod(buffer, nullptr) == x) break;
  }
  return buffer;
}

/// The scalar type of an Eigen type (its `Scalar`), or the type itself.
template <class X, class = void>
struct scalar_of {
  using type = X;
};
template <class X>
struct scalar_of<X, std::void_t<typename X::Scalar>> {
  using type = typename X::Scalar;
};

/// T itself, in a context where it is not deduced (C++20's std::type_identity_t).
template <class T>
struct identity {
  using type = T;
};
template <class T>
using identity_t = typename identity<T>::type;

/// Reduced-precision storage: bf16 and IEEE half. attend stores them and computes in float.
template <class S>
inline constexpr bool is_reduced_precision = std::is_same_v<S, Eigen::bfloat16> || std::is_same_v<S, Eigen::half>;

/// The scalar checks, as static_asserts in a class so that they fire when it is instantiated,
/// before the caller's body instantiates any Eigen expression (whose errors would come first).
template <class T, class... Others>
struct ScalarCheck {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || is_reduced_precision<T>,
                "attend: the scalar type must be float, double, Eigen::bfloat16 or Eigen::half (int, long double "
                "and std::complex are not supported)");
  static_assert((std::is_same_v<T, Others> && ...),
                "attend: every matrix argument must have the same scalar type (float, double, Eigen::bfloat16 or "
                "Eigen::half); convert the others with .template cast<T>()");
  static constexpr bool value = true;
};

/// The checks of entry points that compute and store in float or double only (gradients, the
/// distributed layer): reduced-precision inputs are converted by the caller.
template <class T, class... Others>
struct FullPrecisionCheck {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "attend: this entry point takes float or double only (gradients and the distributed layer are not "
                "offered for Eigen::bfloat16 or Eigen::half: convert with .template cast<float>())");
  static_assert((std::is_same_v<T, Others> && ...),
                "attend: every matrix argument must have the same scalar type (float or double); convert the "
                "others with .template cast<T>()");
  static constexpr bool value = true;
};

/// True for Eigen types (or scalar types) that share one scalar: float, double, Eigen::bfloat16
/// or Eigen::half; otherwise a compile error with attend's message. Every public entry point
/// starts with `static_assert(detail::supported_scalars<DQ, DK, DV>);`, so a wrong scalar is the
/// first error.
template <class... Xs>
inline constexpr bool supported_scalars = ScalarCheck<typename scalar_of<Xs>::type...>::value;

/// As supported_scalars, for entry points that take float or double only.
template <class... Xs>
inline constexpr bool full_precision_scalars = FullPrecisionCheck<typename scalar_of<Xs>::type...>::value;

/// "float", "double", "bfloat16" or "half", for messages about values that must fit the scalar type.
template <class T>
const char* scalar_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, double>) return "double";
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return "bfloat16";
  if constexpr (std::is_same_v<T, Eigen::half>) return "half";
  return "?";
}

}  // namespace detail
}  // namespace attend
