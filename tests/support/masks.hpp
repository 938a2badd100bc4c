// SPDX-License-Identifier: MIT
// Reference masks as plain boolean matrices, written from the definitions in the docs.
#pragma once

#include <attend/options.hpp>
#include <attend/types.hpp>

namespace attend::test {

/// Aligned key of query i.
inline Index aligned_key(Index i, Index lq, Index lk, Alignment alignment) {
  return alignment == Alignment::TopLeft ? i : i + lk - lq;
}

/// Key j is visible to query i iff a - left <= j <= a + right, a the aligned key; -1 unbounded.
inline BoolMatrix window_visibility(Index lq, Index lk, Index left, Index right, Alignment alignment) {
  BoolMatrix m(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    const Index a = aligned_key(i, lq, lk, alignment);
    for (Index j = 0; j < lk; ++j) m(i, j) = (left < 0 || j >= a - left) && (right < 0 || j <= a + right);
  }
  return m;
}

inline BoolMatrix causal_visibility(Index lq, Index lk, Alignment alignment) {
  return window_visibility(lq, lk, -1, 0, alignment);
}

inline BoolMatrix padding_visibility(Index lq, Index lk, Index valid_length) {
  BoolMatrix m(lq, lk);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) m(i, j) = j < valid_length;
  return m;
}

inline BoolMatrix all_visible(Index lq, Index lk) { return BoolMatrix::Constant(lq, lk, true); }

}  // namespace attend::test
