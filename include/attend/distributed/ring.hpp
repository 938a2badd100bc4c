// SPDX-License-Identifier: MIT
/// \file distributed/ring.hpp
/// \brief Sequence-parallel (context-parallel) attention for prefill: ring attention over MPI.
///
/// The sequence is sharded over the N ranks of a communicator (sharding.hpp): rank r holds the
/// queries, keys and values of its tokens. Every rank computes its queries against every key
/// block, one block per step: at step t it holds the K/V shard of rank (r - t) mod N, computes
/// with it while passing it on to rank r + 1 (MPI_Isend/MPI_Irecv, progressed between query
/// tiles, progress.hpp), and merges the step's partial output into its running output with
/// the log-sum-exp merge of split_kv.hpp:
///   lse = log(e^{lse_acc} + e^{lse_step}),   o = e^{lse_acc - lse} o_acc + e^{lse_step - lse} o_step.
/// Within a step the blocked kernel runs each (query segment, key segment) pair with the global
/// band mask seen from that pair (shard_mask.hpp); pairs the mask makes empty are skipped, and a
/// K/V block is not sent on once no rank further along the ring can see it (a causal mask with
/// contiguous shards sends about half the blocks, a window only to the ranks it reaches).
/// `KVExchange::AllGather` gathers every K/V shard first (MPI_Allgatherv), for when K/V is
/// small next to Q (GQA with few kv heads, cross attention to a short memory); it computes
/// the same blocks in the same order and so gives the ring's result bit for bit.
///
/// Results: the merge order is fixed (blocks r, r - 1, ..., r - N + 1 mod N; within a block,
/// its segments in order), so a run is bitwise reproducible for a given rank count and sharding,
/// whatever the thread count and the timing of messages; across rank counts it agrees with the
/// single-process blocked path within rounding.
/// Backward: dK and dV travelling with K and V (dQ local) follows the backward pass (issue #15).
#pragma once

#include "../attention/blocked.hpp"
#include "../attention/multi_head.hpp"
#include "../attention/split_kv.hpp"
#include "../detail/checks.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "mpi.hpp"
#include "progress.hpp"
#include "shard_mask.hpp"
#include "sharding.hpp"

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace attend::distributed {

/// How the K/V shards reach every rank.
enum class KVExchange {
  Ring,      ///< pass K/V around the ring, overlapped with the compute (memory: 2 K/V shards)
  AllGather  ///< gather all K/V first, then compute (memory: the whole K/V)
};

/// Timings of one step of a ring call (MPI_Wtime seconds), for benchmarks and tuning.
struct RingStep {
  int block = -1;              ///< rank whose K/V shard the rank held in this step
  bool computed = false;       ///< false when the mask hides that whole block from this rank
  double compute_seconds = 0;  ///< kernels and merge (MPI progressed between tiles)
  double wait_seconds = 0;     ///< blocked in MPI after the compute (the communication not hidden)
  Index bytes_sent = 0;
  Index bytes_received = 0;
};

/// Per-step timings of the calling rank, filled when `RingOptions::profile` points to one.
struct RingProfile {
  std::vector<RingStep> steps;
};

/// Options of a ring call: those of one head (scale, block_q, block_k, num_threads of this rank;
/// always the blocked path) plus the sharding of the sequence and the K/V exchange.
struct RingOptions : AttentionOptions {
  Sharding sharding = Sharding::Contiguous;
  KVExchange exchange = KVExchange::Ring;
  RingProfile* profile = nullptr;  ///< when set, receives this rank's per-step timings
};

/// The MPI tag of attend's ring and decode messages. Pass a duplicate of your communicator
/// (MPI_Comm_dup) when messages of your own with this tag may be in flight on it.
inline constexpr int kMessageTag = 0x4174;

namespace detail {

/// An empty matrix view: "this optional output is not wanted".
template <class T>
MatrixRef<T> no_matrix() {
  return MatrixRef<T>(Eigen::Map<Matrix<T>>(nullptr, 0, 0));
}

/// What every rank knows of the ring: each rank's segments and which blocks each rank sees.
struct RingPlan {
  int ranks = 1;
  std::vector<std::vector<Segment>> queries, keys;  // per rank
  std::vector<Index> key_rows;                      // per rank
  std::vector<char> sees;                           // sees[r N + b]: rank r's queries see a key of rank b

  bool sees_block(int rank, int block) const { return sees[std::size_t(rank) * std::size_t(ranks) + std::size_t(block)] != 0; }

  /// Whether the rank holding `block` at step t (rank block + t) passes it on: some rank further
  /// along the ring, at a step before the last, sees it.
  bool forwards(int block, int step) const {
    for (int later = step + 1; later < ranks; ++later)
      if (sees_block((block + later) % ranks, block)) return true;
    return false;
  }
};

template <class Mask>
RingPlan make_plan(const Mask& mask, Sharding sharding, Index num_queries, Index num_keys, int ranks) {
  RingPlan plan;
  plan.ranks = ranks;
  for (int r = 0; r < ranks; ++r) {
    plan.queries.push_back(shard_segments(sharding, num_queries, ranks, r));
    plan.keys.push_back(shard_segments(sharding, num_keys, ranks, r));
    plan.key_rows.push_back(shard_length(sharding, num_keys, ranks, r));
  }
  plan.sees.assign(std::size_t(ranks) * std::size_t(ranks), 0);
  for (int r = 0; r < ranks; ++r)
    for (int b = 0; b < ranks; ++b)
      for (const Segment& qs : plan.queries[std::size_t(r)])
        for (const Segment& ks : plan.keys[std::size_t(b)]) {
          if (qs.length == 0 || ks.length == 0) continue;
          const KeyRange seen =
              shard_mask(mask, num_queries, num_keys, qs.begin, ks.begin).bind(qs.length, ks.length).keys(0, qs.length);
          if (seen.begin < seen.end) plan.sees[std::size_t(r) * std::size_t(ranks) + std::size_t(b)] = 1;
        }
  return plan;
}

/// Scratch of one thread: the blocked kernel's, and one query tile's partial (output, lse).
template <class T>
struct RingScratch {
  RingScratch(attend::detail::TileShape tiles, Index key_dim, Index value_dim)
      : kernel(tiles, key_dim, value_dim), out(tiles.queries, value_dim), lse(tiles.queries) {}
  attend::detail::BlockedScratch<T> kernel;
  Matrix<T> out;  // (Bq, d_v)
  Vector<T> lse;  // (Bq)
};

/// The running result of one rank: its output (the caller's view) and log-sum-exp per head,
/// into which each query tile's partial over a key block is merged as soon as it is computed.
template <class T, class Mask>
class RingAccumulator {
 public:
  RingAccumulator(const ConstMatrixRef<T>& q, const attend::detail::HeadLayout& layout, const Mask& mask,
                  const RingOptions& options, const RingPlan& plan, int rank, Index num_queries, Index num_keys,
                  MatrixRef<T> out)
      : q_(q), layout_(layout), mask_(mask), plan_(plan), rank_(rank), num_queries_(num_queries),
        num_keys_(num_keys), out_(out),
        lse_(Matrix<T>::Constant(layout.heads, q.rows(), -std::numeric_limits<T>::infinity())),
        score_{attend::detail::resolve_scale<T>(options, layout.key_dim)} {
    Index longest_q = 1, longest_k = 1;
    for (const Segment& s : plan.queries[std::size_t(rank)]) longest_q = std::max(longest_q, s.length);
    for (const auto& segments : plan.keys)
      for (const Segment& s : segments) longest_k = std::max(longest_k, s.length);
    tiles_ = attend::detail::resolve_tiles(options, longest_q, longest_k);
    out_.setZero();
  }

  /// Folds in the keys of rank `block`, whose packed rows [K | V] are `kv`; progress() runs
  /// between query tiles.
  template <class Progress>
  void add_block(int block, const ConstMatrixRef<T>& kv, Progress&& progress) {
    const Index kv_width = layout_.kv_heads * layout_.key_dim, d = layout_.key_dim, dv = layout_.value_dim;
    Index k_offset = 0;
    for (const Segment& ks : plan_.keys[std::size_t(block)]) {
      const ConstMatrixRef<T> keys = kv.middleRows(k_offset, ks.length);
      k_offset += ks.length;
      // Work items: (head, query tile) of every query segment, for the tiles that see some key
      // of this key segment.
      struct Item {
        Index begin;   // global position of the tile's first query
        Index row;     // its local row
        Index rows;    // rows of the tile
        Index head;
      };
      std::vector<Item> items;
      Index q_offset = 0;
      for (const Segment& qs : plan_.queries[std::size_t(rank_)]) {
        const Index offset = q_offset;
        q_offset += qs.length;
        if (ks.length == 0) continue;
        for (Index q0 = 0; q0 < qs.length; q0 += tiles_.queries) {
          const Index rows = std::min(tiles_.queries, qs.length - q0);
          const KeyRange seen =
              shard_mask(mask_, num_queries_, num_keys_, qs.begin + q0, ks.begin).bind(rows, ks.length).keys(0, rows);
          if (seen.begin >= seen.end) continue;
          for (Index h = 0; h < layout_.heads; ++h) items.push_back({qs.begin + q0, offset + q0, rows, h});
        }
      }
      // Each item computes one query tile of one head against the key segment, with the mask
      // seen from the tile's first query, into its thread's scratch, and merges it into the
      // running result at once; items own disjoint rows, so they run in any order.
      parallel_for_with_progress(
          Index(items.size()), [&] { return RingScratch<T>(tiles_, d, dv); },
          [&](Index i, RingScratch<T>& scratch) {
            const Item& it = items[std::size_t(i)];
            const Index g = layout_.kv_head_of(it.head), row = it.row;
            const auto bound = shard_mask(mask_, num_queries_, num_keys_, it.begin, ks.begin).bind(it.rows, ks.length);
            const ConstMatrixRef<T> qh = q_.block(row, it.head * d, it.rows, d);  // (rows, d)
            const ConstMatrixRef<T> kh = keys.middleCols(g * d, d);                // (lk, d)
            const ConstMatrixRef<T> vh = keys.middleCols(kv_width + g * dv, dv);   // (lk, d_v)
            MatrixRef<T> part = scratch.out.topRows(it.rows);                      // (rows, d_v)
            VectorRef<T> part_lse = scratch.lse.head(it.rows);                     // (rows)
            attend::detail::blocked_query_tile<T>(qh, kh, vh, score_, bound, tiles_, 0, it.rows, part, part_lse,
                                                  scratch.kernel);
            merge_partial_into<T>(out_.block(row, it.head * dv, it.rows, dv),
                                  Eigen::Map<Vector<T>>(&lse_(it.head, row), it.rows), part, part_lse);
          },
          progress);
    }
  }

  /// Each row's log-sum-exp per head, (Lq_local, H).
  void write_lse(MatrixRef<T> lse) const { lse = lse_.transpose(); }

 private:
  ConstMatrixRef<T> q_;
  attend::detail::HeadLayout layout_;
  const Mask& mask_;
  const RingPlan& plan_;
  int rank_;
  Index num_queries_, num_keys_;
  MatrixRef<T> out_;
  Matrix<T> lse_;       // (H, Lq_local) running log-sum-exp, -inf until a key is seen
  attend::detail::ScaledDot<T> score_;
  attend::detail::TileShape tiles_{};
};

}  // namespace detail

/// Sequence-parallel multi-head attention: each rank of `comm` passes its shard of the sequence
/// and receives its shard of the output (see the file comment). Collective: every rank calls it
/// with the same mask, heads and options.
///   out[:, h d_v : (h+1) d_v] = softmax(scale q_h K_g^T + mask) V_g,  g = h / (H / H_kv),
/// over the global sequence, for the rows of this rank's shard.
///
/// \param comm  the ranks holding the sequence (rank order = ring order)
/// \param q     (Lq_r, H d) this rank's queries, rows in shard order (shard_rows)
/// \param k     (Lk_r, H_kv d) this rank's keys (the same sharding over the global Lk)
/// \param v     (Lk_r, H_kv d_v) this rank's values
/// \param num_heads H
/// \param out   (Lq_r, H d_v), not sharing memory with q
/// \param mask  NoMask, Causal, Window, KeyPadding or their `&`, in global positions
/// \param options scale (default 1/sqrt(d)), block_q, block_k, num_threads, sharding, exchange, profile
/// \param lse   (Lq_r, H) log-sum-exp of each row and head (-inf where no key is seen), or empty
/// \throws attend::invalid_argument on every rank when any rank's arguments are invalid (shapes,
///         heads, a shard that is not its part of the sharding of the global lengths, options
///         that differ between ranks, aliasing), naming the rank and the shapes.
template <class DQ, class DK, class DV, class Mask = NoMask>
void ring_attention_into(MPI_Comm comm, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                         const Eigen::MatrixBase<DV>& v, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                         const MaskBase<Mask>& mask = NoMask{}, const RingOptions& options = {},
                         MatrixRef<typename DQ::Scalar> lse = detail::no_matrix<typename DQ::Scalar>()) {
  static_assert(attend::detail::full_precision_scalars<DQ, DK, DV>);
  static_assert(is_shardable_mask<Mask>,
                "attend::distributed: sequence-parallel attention takes NoMask, Causal, Window, KeyPadding and "
                "their intersections (a & b)");
  using T = typename DQ::Scalar;
  const detail::CommInfo info = detail::comm_info(comm);
  const int ranks = info.size, rank = info.rank;
  const ConstMatrixRef<T> q_ref(q);
  attend::detail::HeadLayout layout{};
  // Every rank checks its own arguments, then all agree on the outcome and on the shapes.
  const std::vector<std::int64_t> facts = detail::agree(
      comm, info,
      {q.rows(), k.rows(), q.cols(), k.cols(), v.cols(), num_heads, std::int64_t(options.sharding),
       std::int64_t(options.exchange), options.block_q, options.block_k},
      [&] {
        ATTEND_CHECK(k.rows() == v.rows(), "k " + attend::detail::shape_of(k) + " and v " +
                                               attend::detail::shape_of(v) + " must have the same number of rows");
        layout = attend::detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
        attend::detail::check_shape(out, q.rows(), layout.heads * layout.value_dim, "output");
        ATTEND_CHECK(lse.size() == 0 || (lse.rows() == q.rows() && lse.cols() == layout.heads),
                     "log-sum-exp " + attend::detail::shape_of(lse) + " must be empty or (Lq_r x H) = (" +
                         std::to_string(q.rows()) + " x " + std::to_string(layout.heads) + ")");
        attend::detail::check_no_alias(out, "output", q_ref, "input q");
        attend::detail::check_no_alias(lse, "log-sum-exp", q_ref, "input q");
        attend::detail::check_no_alias(lse, "log-sum-exp", out, "output");
        attend::detail::resolve_tiles(options);
        attend::detail::resolve_scale<T>(options, layout.key_dim);
        ATTEND_CHECK(options.num_threads >= 0, "num_threads=" + std::to_string(options.num_threads) +
                                                   " must be positive, or 0 for the default");
      });
  const attend::detail::ThreadScope threads(options.num_threads);
  constexpr std::size_t kFacts = 10;
  const auto fact = [&](int r, std::size_t c) { return Index(facts[std::size_t(r) * kFacts + c]); };
  static const char* const kNames[kFacts] = {"q rows",  "k rows", "q width", "k width", "v width",
                                            "num_heads", "sharding", "exchange", "block_q", "block_k"};
  Index num_queries = 0, num_keys = 0;
  for (int r = 0; r < ranks; ++r) {
    num_queries += fact(r, 0);
    num_keys += fact(r, 1);
    for (std::size_t c = 2; c < kFacts; ++c)
      ATTEND_CHECK(fact(r, c) == fact(0, c), std::string(kNames[c]) + " differs between rank 0 (" +
                                                 std::to_string(fact(0, c)) + ") and rank " + std::to_string(r) + " (" +
                                                 std::to_string(fact(r, c)) + ")");
  }
  for (int r = 0; r < ranks; ++r)
    ATTEND_CHECK(fact(r, 0) == shard_length(options.sharding, num_queries, ranks, r) &&
                     fact(r, 1) == shard_length(options.sharding, num_keys, ranks, r),
                 "rank " + std::to_string(r) + " holds " + std::to_string(fact(r, 0)) + " query and " +
                     std::to_string(fact(r, 1)) + " key rows, but its shard of (Lq, Lk) = (" +
                     std::to_string(num_queries) + ", " + std::to_string(num_keys) + ") over " +
                     std::to_string(ranks) + " ranks has " +
                     std::to_string(shard_length(options.sharding, num_queries, ranks, r)) + " and " +
                     std::to_string(shard_length(options.sharding, num_keys, ranks, r)));

  const Mask& global_mask = mask.derived();
  const detail::RingPlan plan = detail::make_plan(global_mask, options.sharding, num_queries, num_keys, ranks);
  detail::RingAccumulator<T, Mask> acc(q_ref, layout, global_mask, options, plan, rank, num_queries, num_keys, out);
  const Index kv_width = k.cols() + v.cols(), row_bytes = kv_width * Index(sizeof(T));
  const detail::RowType<T> row(std::max(kv_width, Index(1)));
  if (options.profile) options.profile->steps.assign(std::size_t(ranks), RingStep{});
  const auto record = [&](int step, int block, bool computed, double compute, double wait, Index sent, Index received) {
    if (options.profile) options.profile->steps[std::size_t(step)] = {block, computed, compute, wait, sent, received};
  };

  const auto pack = [&](MatrixRef<T> into) {  // this rank's [K | V], (Lk_r, H_kv (d + d_v))
    if (k.rows() == 0) return;                 // (no column block of an empty matrix at an offset)
    into.leftCols(k.cols()) = k;
    into.rightCols(v.cols()) = v;
  };

  if (options.exchange == KVExchange::AllGather) {
    std::vector<int> counts(static_cast<std::size_t>(ranks)), displacements(static_cast<std::size_t>(ranks));
    for (int r = 0, offset = 0; r < ranks; ++r) {
      counts[std::size_t(r)] = detail::row_count(plan.key_rows[std::size_t(r)]);
      displacements[std::size_t(r)] = offset;
      offset += counts[std::size_t(r)];
    }
    Matrix<T> own(k.rows(), kv_width), all(num_keys, kv_width);  // this rank's and every rank's rows
    pack(own);
    const double t0 = MPI_Wtime();
    detail::check_mpi(MPI_Allgatherv(own.data(), counts[std::size_t(rank)], row.get(), all.data(), counts.data(),
                                     displacements.data(), row.get(), comm),
                      "MPI_Allgatherv");
    double wait = MPI_Wtime() - t0;
    for (int step = 0; step < ranks; ++step) {
      const int block = (rank - step + ranks) % ranks;
      const bool computed = plan.sees_block(rank, block);
      const double t1 = MPI_Wtime();
      if (computed)
        acc.add_block(block, all.middleRows(displacements[std::size_t(block)], plan.key_rows[std::size_t(block)]), [] {});
      record(step, block, computed, MPI_Wtime() - t1, wait, step == 0 ? own.size() * Index(sizeof(T)) : 0,
             step == 0 ? (num_keys - k.rows()) * row_bytes : 0);
      wait = 0;
    }
  } else {
    Index longest = 0;
    for (Index rows : plan.key_rows) longest = std::max(longest, rows);
    Matrix<T> buffers[2] = {Matrix<T>(longest, kv_width), Matrix<T>(longest, kv_width)};
    pack(buffers[0].topRows(k.rows()));
    int current = 0;
    const int next = (rank + 1) % ranks, previous = (rank + ranks - 1) % ranks;
    for (int step = 0; step < ranks; ++step) {
      const int block = (rank - step + ranks) % ranks, incoming = (rank - step - 1 + 2 * ranks) % ranks;
      detail::Requests requests;
      Index sent = 0, received = 0;
      if (step + 1 < ranks && plan.forwards(incoming, step)) {
        MPI_Request request;
        detail::check_mpi(MPI_Irecv(buffers[1 - current].data(), detail::row_count(plan.key_rows[std::size_t(incoming)]),
                                    row.get(), previous, kMessageTag, comm, &request),
                          "MPI_Irecv");
        requests.add(request);
        received = plan.key_rows[std::size_t(incoming)] * row_bytes;
      }
      if (step + 1 < ranks && plan.forwards(block, step)) {
        MPI_Request request;
        detail::check_mpi(MPI_Isend(buffers[current].data(), detail::row_count(plan.key_rows[std::size_t(block)]),
                                    row.get(), next, kMessageTag, comm, &request),
                          "MPI_Isend");
        requests.add(request);
        sent = plan.key_rows[std::size_t(block)] * row_bytes;
      }
      const bool computed = plan.sees_block(rank, block);
      const double t0 = MPI_Wtime();
      if (computed)
        acc.add_block(block, buffers[current].topRows(plan.key_rows[std::size_t(block)]), [&] { requests.test(); });
      const double t1 = MPI_Wtime();
      requests.wait();
      record(step, block, computed, t1 - t0, MPI_Wtime() - t1, sent, received);
      current = 1 - current;
    }
  }
  if (lse.size() != 0) acc.write_lse(lse);
}

}  // namespace attend::distributed
