// SPDX-License-Identifier: MIT
/// \file scores/soft_cap.hpp
/// \brief Logit soft-capping of any score policy: s <- cap * tanh(s / cap) (Gemma 2, Grok).
#pragma once

#include "../types.hpp"

#include <cmath>
#include <string>

namespace attend::detail {

/// The cap as a T; rejects one that is not a positive finite number once cast to T (1e300 or
/// 1e-300 for float overflow or underflow, and would turn every score into NaN).
template <class T>
T checked_soft_cap(double cap) {
  const T cast = static_cast<T>(cap);
  ATTEND_CHECK(cast > 0 && std::isfinite(cast),
               "soft cap " + number_string(cap) + " must be a positive finite number in " + scalar_name<T>());
  return cast;
}

/// Wraps a score policy: s_ij = cap * tanh(score(q_i, k_j) / cap), bounded to (-cap, cap).
/// The cap acts inside the score, before any mask, so masked entries are set to -inf after it
/// and stay masked (capping a -inf sentinel would make it a finite -cap; llama.cpp#29034).
template <class Score, class T>
struct SoftCapped {
  Score score;
  T cap;

  template <class Q, class K, class S>
  void operator()(const Q& q, const K& k, S&& s) const {  // q (Bq, Dk), k (Bk, Dk), s (Bq, Bk)
    score(q, k, s);
    s.array() = cap * (s.array() / cap).tanh();
  }
};

}  // namespace attend::detail
