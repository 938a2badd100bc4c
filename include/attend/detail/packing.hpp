// SPDX-License-Identifier: MIT
/// \file detail/packing.hpp
/// \brief Packing of a query tile for the score kernel: transposed, scaled, padded to whole packets.
#pragma once

#include "../types.hpp"
#include "packet.hpp"

namespace attend::detail {

/// Writes qt = scale * Q_tile^T into the first `lanes` columns of `qt`, zero in the padding
/// lanes [rows, lanes), lanes = round_up_to_lanes(rows):
///   qt(c, i) = scale * q(i, c)
/// so that the score kernel reads one feature c of every query as whole packets, and the scale
/// is applied once per query element rather than once per score.
///
/// \param q  (rows, Dk) query rows of the tile
/// \param qt (Dk, >= lanes) packed tile
template <class T>
void pack_scaled_queries(const ConstMatrixRef<T>& q, T scale, MatrixRef<T> qt) {
  const Index rows = q.rows(), lanes = round_up_to_lanes<T>(rows);
  ATTEND_ASSERT(qt.rows() == q.cols() && qt.cols() >= lanes);
  qt.leftCols(rows).noalias() = scale * q.transpose();
  qt.middleCols(rows, lanes - rows).setZero();
}

}  // namespace attend::detail
