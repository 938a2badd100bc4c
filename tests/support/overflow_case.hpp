// SPDX-License-Identifier: MIT
// Queries and keys whose dot products overflow T while their scaled scores are small and exact,
// with those scores from the exponents alone: a path that forms <q_i, k_j> before scaling gives
// inf (and NaN weights) where one that scales the queries first gives the scores below.
#pragma once

#include "reference.hpp"

#include <attend/types.hpp>

#include <cmath>
#include <limits>

namespace attend::test {

template <class T>
struct OverflowCase {
  Matrix<T> q;        // (2, 1): +-2^(e/2), e = max_exponent of T (2^e is past T's largest value)
  Matrix<T> k;        // (Lk, 1): 2^(e/2) times 1, 1/2, -1/4 in turn
  Matrix<T> v;        // (Lk, 2): (1, j mod 3 - 1)
  double scale;       // 2^(2 - e), a normal number
  RealMatrix scores;  // (2, Lk): scale q_i k_j exactly: +-4, +-2, -+1 in turn
};

template <class T>
OverflowCase<T> overflow_case(Index num_keys = 3) {
  constexpr int e = std::numeric_limits<T>::max_exponent;
  const T half = std::ldexp(T(1), e / 2);
  const T fractions[] = {T(1), T(0.5), T(-0.25)};
  OverflowCase<T> c{Matrix<T>(2, 1), Matrix<T>(num_keys, 1), Matrix<T>(num_keys, 2), std::ldexp(1.0, 2 - e),
                    RealMatrix(2, num_keys)};
  c.q << half, -half;
  for (Index j = 0; j < num_keys; ++j) {
    c.k(j, 0) = half * fractions[j % 3];
    c.v(j, 0) = T(1);
    c.v(j, 1) = T(j % 3 - 1);
    for (Index i = 0; i < 2; ++i) c.scores(i, j) = (i == 0 ? 4 : -4) * Real(fractions[j % 3]);
  }
  return c;
}

}  // namespace attend::test
