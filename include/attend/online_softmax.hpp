// SPDX-License-Identifier: MIT
/// \file online_softmax.hpp
/// \brief Running softmax statistics over tiles of keys (Milakov & Gimelshein 2018; FlashAttention).
#pragma once

#include "types.hpp"

#include <cmath>
#include <limits>

namespace attend {

/// Softmax state of a block of query rows, updated one tile of keys at a time:
///   m_i  running max of the scores seen so far,
///   l_i  running sum of exp(s_ij - m_i),
///   acc  running sum of exp(s_ij - m_i) v_j, rescaled by exp(m_old - m_new) whenever m grows.
/// After the last tile, out_i = acc_i / l_i and lse_i = m_i + log l_i. A row that has seen no
/// finite score keeps m_i = -inf and never evaluates exp(-inf - -inf); it finalizes to zeros
/// and lse_i = -inf.
template <class T>
class OnlineSoftmax {
 public:
  /// Allocates for up to `max_rows` rows; `reset` then costs no allocation.
  explicit OnlineSoftmax(Index max_rows = 0) : max_(max_rows), sum_(max_rows) {}

  /// Starts `rows` fresh rows (rows <= the capacity given at construction).
  void reset(Index rows) {
    ATTEND_ASSERT(rows <= max_.size());
    rows_ = rows;
    max_.head(rows).setConstant(-std::numeric_limits<T>::infinity());
    sum_.head(rows).setZero();
  }

  /// Consumes a tile of masked scores, overwriting it with p_ij = exp(s_ij - m_new_i), and
  /// rescales the accumulator rows. The caller then adds P V_tile to `acc`.
  /// \param scores (rows, Bk) scores, -inf where masked; becomes P.
  /// \param acc    (rows, Dv) accumulator.
  template <class Scores, class Acc>
  void update(Scores&& scores, Acc&& acc) {
    ATTEND_ASSERT(scores.rows() == rows_ && acc.rows() == rows_);
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    for (Index i = 0; i < rows_; ++i) {
      auto s = scores.row(i);
      const T tile_max = s.template maxCoeff<Eigen::PropagateNaN>();
      const T new_max = std::isnan(tile_max) ? tile_max : std::max(max_(i), tile_max);
      if (new_max == kNegInf) {  // nothing visible yet in this row
        s.setZero();
        continue;
      }
      const T rescale = std::exp(max_(i) - new_max);  // 0 on the first visible tile
      s = (s.array() - new_max).exp();
      sum_(i) = rescale * sum_(i) + s.sum();
      if (rescale != T(1)) acc.row(i) *= rescale;
      max_(i) = new_max;
    }
  }

  /// Writes out_i = acc_i / l_i (zeros where l_i = 0) and, if non-empty, lse_i = m_i + log l_i.
  template <class Acc, class Out>
  void finalize(const Acc& acc, Out&& out, VectorRef<T> lse) const {
    for (Index i = 0; i < rows_; ++i) {
      const bool empty = sum_(i) == T(0);
      if (empty)
        out.row(i).setZero();
      else
        out.row(i) = acc.row(i) / sum_(i);
      if (lse.size() != 0)
        lse(i) = empty ? -std::numeric_limits<T>::infinity() : max_(i) + std::log(sum_(i));
    }
  }

 private:
  Vector<T> max_;  // (rows)
  Vector<T> sum_;  // (rows)
  Index rows_ = 0;
};

}  // namespace attend
