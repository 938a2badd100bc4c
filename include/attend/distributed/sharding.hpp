// SPDX-License-Identifier: MIT
/// \file distributed/sharding.hpp
/// \brief How a sequence of L tokens is split over N ranks, and moving rows between the global
/// order and a rank's shard.
///
/// A shard is a list of segments [begin, begin + length) of global positions, stored one after
/// the other in the rank's local rows.
///  - `Contiguous`: rank r holds [floor(r L / N), floor((r + 1) L / N)): one segment.
///  - `Zigzag` (head-tail): the sequence is cut into 2N chunks the same way and rank r holds
///    chunks r and 2N - 1 - r, in that order. Under a causal mask every rank then does the same
///    work (one early chunk, one late chunk), where the contiguous split gives the last rank N
///    times the work of the first.
/// Every rank can compute every rank's shard from (L, N), so no sizes travel with the data.
#pragma once

#include "../detail/checks.hpp"
#include "../types.hpp"
#include "mpi.hpp"

#include <string>
#include <vector>

namespace attend::distributed {

/// How a sequence is split over the ranks of a communicator.
enum class Sharding {
  Contiguous,  ///< rank r holds the r-th of N equal chunks
  Zigzag       ///< rank r holds chunks r and 2N - 1 - r of 2N (balances causal masks)
};

/// Global positions [begin, begin + length) held by a rank, stored after its previous segments.
struct Segment {
  Index begin = 0;
  Index length = 0;
};

/// The segments of `rank`'s shard of a sequence of `length` tokens over `ranks` ranks.
/// \throws attend::invalid_argument for a negative length or a rank outside [0, ranks).
inline std::vector<Segment> shard_segments(Sharding sharding, Index length, int ranks, int rank) {
  ATTEND_CHECK(length >= 0 && ranks >= 1 && rank >= 0 && rank < ranks,
               "shard of rank " + std::to_string(rank) + " of " + std::to_string(ranks) + " ranks of a sequence of " +
                   std::to_string(length) + " tokens is undefined");
  const auto chunk = [length](Index c, Index chunks) {  // [floor(c L / n), floor((c + 1) L / n))
    const Index begin = c * (length / chunks) + (c * (length % chunks)) / chunks;
    const Index end = (c + 1) * (length / chunks) + ((c + 1) * (length % chunks)) / chunks;
    return Segment{begin, end - begin};
  };
  if (sharding == Sharding::Contiguous) return {chunk(rank, ranks)};
  return {chunk(rank, 2 * Index(ranks)), chunk(2 * Index(ranks) - 1 - rank, 2 * Index(ranks))};
}

/// Number of tokens (local rows) of `rank`'s shard.
inline Index shard_length(Sharding sharding, Index length, int ranks, int rank) {
  Index rows = 0;
  for (const Segment& s : shard_segments(sharding, length, ranks, rank)) rows += s.length;
  return rows;
}

/// The rows of `global` (L, C) that `rank` holds, in its local order: shape (shard_length, C).
template <class D>
Matrix<typename D::Scalar> shard_rows(const Eigen::MatrixBase<D>& global, Sharding sharding, int ranks, int rank) {
  Matrix<typename D::Scalar> local(shard_length(sharding, global.rows(), ranks, rank), global.cols());
  Index row = 0;
  for (const Segment& s : shard_segments(sharding, global.rows(), ranks, rank)) {
    local.middleRows(row, s.length) = global.middleRows(s.begin, s.length);
    row += s.length;
  }
  return local;
}

/// The whole sequence (L, C) in global order, assembled on every rank from each rank's shard
/// (L, C from the shards: every rank's `local` must be its shard of the same sequence).
/// Collective over `comm`.
template <class D>
Matrix<typename D::Scalar> allgather_rows(MPI_Comm comm, const Eigen::MatrixBase<D>& local, Sharding sharding) {
  using T = typename D::Scalar;
  static_assert(attend::detail::full_precision_scalars<T>);
  const detail::CommInfo info = detail::comm_info(comm);
  const Matrix<T> rows = local;  // contiguous
  const std::vector<std::int64_t> counts = detail::agree(comm, info, {rows.rows(), rows.cols()}, [] {});
  Index length = 0;
  for (int r = 0; r < info.size; ++r) {
    length += counts[std::size_t(2 * r)];
    ATTEND_CHECK(counts[std::size_t(2 * r + 1)] == rows.cols(),
                 "rank " + std::to_string(r) + " has " + std::to_string(counts[std::size_t(2 * r + 1)]) +
                     " columns, rank " + std::to_string(info.rank) + " " + std::to_string(rows.cols()));
  }
  for (int r = 0; r < info.size; ++r)
    ATTEND_CHECK(counts[std::size_t(2 * r)] == shard_length(sharding, length, info.size, r),
                 "rank " + std::to_string(r) + " holds " + std::to_string(counts[std::size_t(2 * r)]) +
                     " rows, not its shard of a sequence of " + std::to_string(length));
  Matrix<T> gathered(length, rows.cols());  // in rank order
  if (length == 0 || rows.cols() == 0) return gathered;
  std::vector<int> row_counts(static_cast<std::size_t>(info.size)), displacements(static_cast<std::size_t>(info.size));
  for (int r = 0, offset = 0; r < info.size; ++r) {
    row_counts[std::size_t(r)] = detail::row_count(counts[std::size_t(2 * r)]);
    displacements[std::size_t(r)] = offset;
    offset += row_counts[std::size_t(r)];
  }
  const detail::RowType<T> row(rows.cols());
  detail::check_mpi(MPI_Allgatherv(rows.data(), row_counts[std::size_t(info.rank)], row.get(), gathered.data(),
                                   row_counts.data(), displacements.data(), row.get(), comm),
                    "MPI_Allgatherv");
  Matrix<T> global(length, rows.cols());
  for (int r = 0; r < info.size; ++r) {
    Index from = displacements[std::size_t(r)];
    for (const Segment& s : shard_segments(sharding, length, info.size, r)) {
      global.middleRows(s.begin, s.length) = gathered.middleRows(from, s.length);
      from += s.length;
    }
  }
  return global;
}

}  // namespace attend::distributed
