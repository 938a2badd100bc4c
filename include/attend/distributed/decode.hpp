// SPDX-License-Identifier: MIT
/// \file distributed/decode.hpp
/// \brief One decode step over a KV cache sharded across ranks (tree attention).
///
/// Each rank holds some of the cached keys and values (any split: contiguous blocks, round-robin
/// appends; for example each rank's own `KVCache`) and the same new query row. A step is
///  1. on every rank, `decode_attention_into` over its keys: the partial (o_r, lse_r) per head;
///  2. a binomial-tree reduction of (lse, o) to rank 0 with the log-sum-exp merge of split_kv.hpp,
///       lse = log(e^{lse_a} + e^{lse_b}),  o = e^{lse_a - lse} o_a + e^{lse_b - lse} o_b,
///     where the merge's max is the running maximum and e^{lse} the running sum (so one
///     reduction carries (max, sum, output)): in round m = 1, 2, 4, ..., rank r with r mod 2m = m
///     sends its partial to rank r - m, which merges it after its own; so rank 0 merges the
///     ranks' keys in rank order over a tree fixed by N, in ceil(log2 N) rounds;
///  3. a broadcast of the result from rank 0.
/// The tree is fixed by the rank count, so results are bitwise reproducible run to run for a
/// given N and split (MPI_Allreduce with a user operation would not promise an order); they
/// agree with the single-process step over all keys within rounding. A rank without keys
/// contributes the merge's identity (lse = -inf).
#pragma once

#include "../attention/split_kv.hpp"
#include "../detail/checks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "mpi.hpp"
#include "ring.hpp"

#include <limits>
#include <string>

namespace attend::distributed {

/// One decode step of a query token against the keys of all ranks of `comm` (see the file
/// comment). Collective: every rank passes the same q, num_heads and options; every rank
/// receives the whole output.
///
/// \param q   (1, H d) the new token's queries, the same on every rank
/// \param k   (Lk_r, H_kv d) this rank's cached keys (Lk_r may be 0), e.g. `KVCache::keys()`
/// \param v   (Lk_r, H_kv d_v) this rank's cached values
/// \param num_heads H
/// \param out (1, H d_v) on every rank, not sharing memory with q, k or v
/// \param options scale (default 1/sqrt(d)), block_k = keys per split of the local step, num_threads
/// \param lse (H) log-sum-exp of each head over all ranks' keys, or empty
/// \throws attend::invalid_argument on every rank when any rank's arguments are invalid.
template <class DQ, class DK, class DV>
void distributed_decode_attention_into(MPI_Comm comm, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                       const Eigen::MatrixBase<DV>& v, Index num_heads,
                                       MatrixRef<typename DQ::Scalar> out, const AttentionOptions& options = {},
                                       VectorRef<typename DQ::Scalar> lse = attend::detail::no_vector<typename DQ::Scalar>()) {
  static_assert(attend::detail::full_precision_scalars<DQ, DK, DV>);
  using T = typename DQ::Scalar;
  const detail::CommInfo info = detail::comm_info(comm);
  // The reduced partial, one contiguous message: [lse (H) | output (H d_v)].
  Index heads = 0, width = 0;
  Vector<T> partial;
  // Local step inside the agreement, so that a rank whose arguments are bad makes every rank throw.
  const std::vector<std::int64_t> facts = detail::agree(comm, info, {num_heads, out.cols()}, [&] {
    ATTEND_CHECK(num_heads >= 1 && out.cols() % num_heads == 0 && out.rows() == 1,
                 "output " + attend::detail::shape_of(out) + " must be (1 x H d_v) with num_heads=" +
                     std::to_string(num_heads));
    heads = num_heads;
    width = out.cols() / num_heads;
    partial.resize(heads * (1 + width));
    decode_attention_into(q, k, v, num_heads, out, options, VectorRef<T>(partial.head(heads)));
    for (Index h = 0; h < heads; ++h) partial.segment(heads + h * width, width) = out.row(0).segment(h * width, width).transpose();
    ATTEND_CHECK(lse.size() == 0 || lse.size() == heads, "log-sum-exp of size " + std::to_string(lse.size()) +
                                                             " must have num_heads = " + std::to_string(heads) +
                                                             " entries");
  });
  for (int r = 1; r < info.size; ++r)
    ATTEND_CHECK(facts[std::size_t(2 * r)] == facts[0] && facts[std::size_t(2 * r + 1)] == facts[1],
                 "rank " + std::to_string(r) + " has num_heads=" + std::to_string(facts[std::size_t(2 * r)]) +
                     " and an output of width " + std::to_string(facts[std::size_t(2 * r + 1)]) +
                     ", rank 0 num_heads=" + std::to_string(facts[0]) + " and width " + std::to_string(facts[1]));
  const int count = detail::row_count(partial.size());
  Vector<T> other(partial.size());
  const auto merge = [&] {
    // (H, d_v) views of the two partials' outputs, and their log-sum-exps.
    using Rows = Eigen::Map<Matrix<T>>;
    merge_partial_into<T>(Rows(partial.data() + heads, heads, width), partial.head(heads),
                          Rows(other.data() + heads, heads, width), other.head(heads));
  };
  for (int m = 1; m < info.size; m *= 2) {
    if (info.rank % (2 * m) == m) {
      detail::check_mpi(MPI_Send(partial.data(), count, detail::mpi_type<T>(), info.rank - m, kMessageTag, comm),
                        "MPI_Send");
      break;
    }
    if (info.rank % (2 * m) == 0 && info.rank + m < info.size) {
      detail::check_mpi(MPI_Recv(other.data(), count, detail::mpi_type<T>(), info.rank + m, kMessageTag, comm,
                                 MPI_STATUS_IGNORE),
                        "MPI_Recv");
      merge();
    }
  }
  detail::check_mpi(MPI_Bcast(partial.data(), count, detail::mpi_type<T>(), 0, comm), "MPI_Bcast");
  for (Index h = 0; h < heads; ++h) out.row(0).segment(h * width, width) = partial.segment(heads + h * width, width).transpose();
  if (lse.size() != 0) lse = partial.head(heads);
}

}  // namespace attend::distributed
