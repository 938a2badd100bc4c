// SPDX-License-Identifier: MIT
/// \file scores/soft_cap.hpp
/// \brief Logit soft-capping of any score policy: s <- cap * tanh(s / cap) (Gemma 2, Grok).
#pragma once

#include "../types.hpp"

#include <cmath>
#include <string>

namespace attend::detail {

/// Rejects a cap that is not a positive finite number.
inline void check_soft_cap(double cap) {
  ATTEND_CHECK(cap > 0 && std::isfinite(cap),
               "soft cap " + std::to_string(cap) + " must be a positive finite number");
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
