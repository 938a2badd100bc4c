// SPDX-License-Identifier: MIT
/// \file detail/packing.hpp
/// \brief Packing of a query tile for the score kernel: transposed, scaled, padded to whole packets.
#pragma once

#include "../types.hpp"
#include "packet.hpp"

#include <algorithm>

ATTEND_PACKET_WARNINGS_PUSH

namespace attend::detail {

/// Writes qt = scale * Q_tile^T into the first `lanes` columns of `qt`, zero in the padding
/// lanes [rows, lanes), lanes = round_up_to_lanes(rows):
///   qt(c, i) = scale * q(i, c)
/// so that the score kernel reads one feature c of every query as whole packets, and the scale
/// is applied once per query element rather than once per score.
///
/// The transpose runs on square blocks of kLanes queries x kLanes features held in registers
/// (Eigen's ptranspose): each query row is read once, in order. (An element-wise transpose reads
/// down the columns of Q, and the rows of a head of an (L, H d) matrix lie a power of two apart,
/// so those reads fight over one cache set: it cost an eighth of a causal tile's time.)
///
/// Queries stored as S (bf16, half) are widened to T exactly on the load, before the scale.
///
/// \param q  (rows, Dk) query rows of the tile
/// \param qt (Dk, >= lanes) packed tile, rows aligned to the packet size
template <class T, class S = T>
void pack_scaled_queries(const ConstMatrixRef<identity_t<S>>& q, T scale, MatrixRef<T> qt) {
  namespace simd = Eigen::internal;
  using P = Packet<T>;
  constexpr Index W = kLanes<T>;
  const Index rows = q.rows(), depth = q.cols(), lanes = round_up_to_lanes<T>(rows), packed_depth = depth / W * W;
  ATTEND_ASSERT(qt.rows() == depth && qt.cols() >= lanes);
  const P scale_packet = simd::pset1<P>(scale);
  for (Index i0 = 0; i0 < lanes; i0 += W) {
    const Index block_rows = std::min(W, rows - i0);
    for (Index c0 = 0; c0 < packed_depth; c0 += W) {
      simd::PacketBlock<P, int(W)> block;  // row r: features [c0, c0 + W) of query i0 + r
      for (Index r = 0; r < W; ++r)
        block.packet[r] = r < block_rows
                              ? simd::pmul(scale_packet, load_as<T>(q.data() + (i0 + r) * q.outerStride() + c0))
                              : simd::pset1<P>(T(0));
      simd::ptranspose(block);  // row c: feature c0 + c of queries [i0, i0 + W)
      for (Index c = 0; c < W; ++c) simd::pstore(qt.data() + (c0 + c) * qt.outerStride() + i0, block.packet[c]);
    }
    for (Index c = packed_depth; c < depth; ++c)
      for (Index r = 0; r < W; ++r) qt(c, i0 + r) = r < block_rows ? scale * widen<T>(q(i0 + r, c)) : T(0);
  }
}

}  // namespace attend::detail

ATTEND_PACKET_WARNINGS_POP
