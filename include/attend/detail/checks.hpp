// SPDX-License-Identifier: MIT
/// \file detail/checks.hpp
/// \brief Shape checks shared by the attention entry points.
#pragma once

#include "../types.hpp"

#include <string>
#include <type_traits>

namespace attend::detail {

/// Q, K and V share one floating-point scalar type (a compile-time check).
template <class Q, class K, class V>
constexpr void static_check_scalars() {
  using T = typename Q::Scalar;
  static_assert(std::is_floating_point_v<T>, "attend: attention needs a floating-point scalar");
  static_assert(std::is_same_v<T, typename K::Scalar> && std::is_same_v<T, typename V::Scalar>,
                "attend: q, k and v must have the same scalar type");
}

/// Q (Lq, Dk), K (Lk, Dk), V (Lk, Dv) with Dk >= 1, of one floating-point scalar type.
template <class Q, class K, class V>
void check_qkv(const Q& q, const K& k, const V& v) {
  static_check_scalars<Q, K, V>();
  ATTEND_CHECK(q.cols() == k.cols(), "q " + shape_of(q) + " and k " + shape_of(k) +
                                         " must have the same head dimension (columns)");
  ATTEND_CHECK(k.rows() == v.rows(), "k " + shape_of(k) + " and v " + shape_of(v) +
                                         " must have the same number of rows (keys)");
  ATTEND_CHECK(q.cols() >= 1, "q " + shape_of(q) + " must have a head dimension of at least 1");
}

/// `m` has exactly the shape (rows, cols).
template <class M>
void check_shape(const M& m, Index rows, Index cols, const char* what) {
  ATTEND_CHECK(m.rows() == rows && m.cols() == cols,
               std::string(what) + " " + shape_of(m) + " must be (" + std::to_string(rows) + " x " +
                   std::to_string(cols) + ")");
}

}  // namespace attend::detail
