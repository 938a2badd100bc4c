// SPDX-License-Identifier: MIT
/// \file softmax.hpp
/// \brief Numerically stable row-wise softmax with the library's masked-row convention.
#pragma once

#include "types.hpp"
#include "detail/checks.hpp"
#include "detail/packet.hpp"

#include <cmath>
#include <limits>

namespace attend {

/// In place, for each row i of `scores`:
///   m_i = max_j s_ij,  s_ij <- exp(s_ij - m_i) / sum_j exp(s_ij - m_i),
/// and, when `lse` is non-empty, lse_i = m_i + log sum_j exp(s_ij - m_i).
/// A row whose scores are all -inf (fully masked) becomes zeros with lse_i = -inf.
/// A NaN score makes its whole row NaN.
///
/// In place by design: `scores` is both input and output. `lse` must not share memory with it.
///
/// \param scores (L, N) scores, overwritten with the weights.
/// \param lse    (L) log-sum-exp per row, or an empty vector to skip it.
/// \throws attend::invalid_argument when lse has the wrong size or aliases scores.
template <class T>
void softmax_rows_inplace(MatrixRef<T> scores, VectorRef<T> lse) {
  static_assert(detail::full_precision_scalars<T>);
  ATTEND_CHECK(lse.size() == 0 || lse.size() == scores.rows(),
               "log-sum-exp of size " + std::to_string(lse.size()) + " does not match " +
                   detail::shape_of(scores) + " scores");
  detail::check_no_alias(lse, "log-sum-exp", scores, "scores");
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < scores.rows(); ++i) {
    auto row = scores.row(i);
    const T row_max = row.size() == 0 ? kNegInf : row.template maxCoeff<Eigen::PropagateNaN>();
    if (row_max == kNegInf) {  // fully masked (or no keys): zeros, lse -inf
      row.setZero();
      if (lse.size() != 0) lse(i) = kNegInf;
      continue;
    }
    // Masked entries become exactly 0 (Eigen's vectorized double exp(-inf) is a denormal).
    const T sum = detail::exp_shifted_sum_inplace(row.data(), row.size(), row_max);
    row /= sum;
    if (lse.size() != 0) lse(i) = row_max + std::log(sum);
  }
}

/// In-place row softmax without the log-sum-exp.
template <class T>
void softmax_rows_inplace(MatrixRef<T> scores) {
  static_assert(detail::full_precision_scalars<T>);
  softmax_rows_inplace<T>(scores, detail::no_vector<T>());
}

}  // namespace attend
