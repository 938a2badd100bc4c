// SPDX-License-Identifier: MIT
/// \file positional/sinusoidal.hpp
/// \brief Sinusoidal position encoding (Vaswani et al., 2017), as a table or added in place.
///
/// For position p and column j of a width-d encoding, with i = floor(j / 2):
///
///     PE(p, 2i)     = sin(p / base^(2i / d)),
///     PE(p, 2i + 1) = cos(p / base^(2i / d)),      base = 10000 by default.
///
/// An odd width is defined: its last column, j = d - 1, is a sine. Row r of an (L, d) matrix
/// holds position `position_offset + r`, so an offset equals dropping the first rows of a longer
/// table (decoding step by step, or chunks of a long sequence).
///
/// The angle p / base^(2i/d) and its sine and cosine are computed in double even for float
/// output: at p ~ 1e5 a float angle is off by up to ~4e-3 rad, a double one by ~1e-11 rad, so
/// float entries stay within a rounding of the exact value at any practical position. The cost
/// is one double sine and cosine per column pair and row (far slower than streaming the matrix):
/// when the same positions recur, build the table once and add it.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../types.hpp"

#include <cmath>
#include <string>

namespace attend {

namespace detail {

/// The denominators base^(2i/d) of the sinusoidal encoding, one per column pair i in [0, ceil(d/2)).
inline Vector<double> sinusoidal_denominators(Index width, double base) {
  Vector<double> denominators((width + 1) / 2);
  for (Index i = 0; i < denominators.size(); ++i)
    denominators(i) = std::pow(base, static_cast<double>(2 * i) / static_cast<double>(width));
  return denominators;
}

inline void check_sinusoidal_base(double base) {
  ATTEND_CHECK(std::isfinite(base) && base > 0,
               "sinusoidal encoding base must be finite and positive, got " + number_string(base));
}

}  // namespace detail

/// Adds the sinusoidal encoding to `x` in place: x(r, j) += PE(position_offset + r, j).
/// Rows are independent, so the result does not depend on the thread count. In place by
/// design: `x` is the only matrix read or written, so there is nothing it could alias.
///
/// \param x               (L, d) matrix, one token per row; any block of a larger row-major
///                        matrix works. d may be odd (the last column gets a sine).
/// \param position_offset position of row 0 (any integer; positions are computed in double, so
///                        exactly while |position| <= 2^53, and past INT64_MAX without overflow).
/// \param base            frequency base, 10000 in the original Transformer.
template <class T>
void add_sinusoidal_encoding(MatrixRef<T> x, Index position_offset = 0, double base = 10000.0) {
  static_assert(detail::supported_scalars<T>);
  using A = accumulator_t<T>;  // bf16 and half: added in float, rounded once
  detail::check_sinusoidal_base(base);
  const Index width = x.cols();
  const Vector<double> denominators = detail::sinusoidal_denominators(width, base);  // (ceil(d/2))
  const auto add_row = [&](Index r) {
    // Summed in double: position_offset + r may pass INT64_MAX (the same sum below 2^53).
    const double position = static_cast<double>(position_offset) + static_cast<double>(r);
    for (Index i = 0; i < denominators.size(); ++i) {
      const double angle = position / denominators(i);
      x(r, 2 * i) = static_cast<T>(A(x(r, 2 * i)) + static_cast<A>(std::sin(angle)));
      if (2 * i + 1 < width) x(r, 2 * i + 1) = static_cast<T>(A(x(r, 2 * i + 1)) + static_cast<A>(std::cos(angle)));
    }
  };
  if (x.size() >= 4096) {
    detail::parallel_for(x.rows(), add_row);
  } else {  // a few rows: a parallel region would cost more than the work
    for (Index r = 0; r < x.rows(); ++r) add_row(r);
  }
}

/// Adds the sinusoidal encoding to a matrix in place, deducing its scalar type.
template <class D>
void add_sinusoidal_encoding(Eigen::PlainObjectBase<D>& x, Index position_offset = 0, double base = 10000.0) {
  static_assert(detail::supported_scalars<D>);
  add_sinusoidal_encoding<typename D::Scalar>(x, position_offset, base);
}

/// The (length, width) table PE(position_offset + r, j) of the sinusoidal encoding.
///
/// \param length          number of rows (positions), >= 0.
/// \param width           number of columns (model width d), >= 0; may be odd.
/// \param position_offset position of row 0 (any integer; see add_sinusoidal_encoding).
/// \param base            frequency base, 10000 in the original Transformer.
/// \throws attend::invalid_argument on a negative shape, a table larger than any array can be, or
///         a base that is not finite and positive.
template <class T>
Matrix<T> sinusoidal_encoding(Index length, Index width, Index position_offset = 0, double base = 10000.0) {
  static_assert(detail::supported_scalars<T>);
  ATTEND_CHECK(length >= 0 && width >= 0, "sinusoidal encoding of negative shape (" + std::to_string(length) +
                                               " x " + std::to_string(width) + ")");
  detail::check_array_size<T>(length, width, "sinusoidal encoding (length x width)");
  Matrix<T> table = Matrix<T>::Zero(length, width);  // (L, d)
  add_sinusoidal_encoding<T>(table, position_offset, base);
  return table;
}

}  // namespace attend
