// SPDX-License-Identifier: MIT
/// \file attention/backward_blocked.hpp
/// \brief The blocked backward (FlashAttention-2, Dao 2023, Algorithm 2) in two passes with no
/// atomics, so that the gradients are bitwise independent of the thread count:
///  - the key pass: each task owns a tile of keys, loops over the query tiles that see it and
///    accumulates dV = P^T dO and dK = scale dS^T Q for its keys;
///  - the query pass: each task owns a tile of queries, loops over the key tiles it sees and
///    accumulates dQ = scale dS K for its queries;
/// or, when there are at least as many heads (kv groups) as threads, in one pass:
///  - the one pass: each task owns a kv group (its query heads and its kv head), walks its key
///    tiles in ascending order doing the key pass's work and adds, for each query tile a key tile
///    meets, dQ_tile += dS_tile K_tile with the query pass's kernel, its dS tile transposed; the
///    key tiles ascend and the value kernel's chains run over the keys in order, so that each
///    element of dQ is the query pass's chain of multiply-adds and bitwise its result.
/// Both recompute, tile by tile, S = scale Q K^T (masked, modified), P = exp(S - lse),
/// dP = dO V^T, D_i = <dO_i, O_i> and dS = P * (dP - D); no (Lq, Lk) matrix is formed and the
/// scratch per thread does not depend on the lengths. The products are the forward's
/// register-blocked kernels (tile_kernels.hpp) on tiles packed the forward's way (packing.hpp).
#pragma once

#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "../detail/backward_kernels.hpp"
#include "../detail/packet.hpp"
#include "../detail/packing.hpp"
#include "../detail/parallel.hpp"
#include "../detail/tile_kernels.hpp"
#include "blocked.hpp"

#include <algorithm>
#include <limits>
#include <vector>

namespace attend::detail {

/// 96 queries x 192 keys. Both are multiples of the score and value kernels' 6 rows, 192 of their
/// 4 packets of 16 floats: dK and dV (rows: keys), S and dS (rows: queries) and S^T (rows: keys)
/// run without remainder blocks. A key task re-reads Q, dO and O of every query tile, and a query
/// task K and V of every key tile: longer tiles read them fewer times, and 192 keys recompute
/// D = rowsum(dO o O) a third less often than 128. A key task's scratch (packed K and V, S, dP,
/// dK, dV) is 0.6 MB at d = 128, within a 1 MB L2. Measured against 64 x 128 (fp32, 8 heads,
/// 1 thread, L 2048 and 4096, d 64 and 128, no mask and causal, under load): 4-8% less backward
/// time at every point, and bitwise the same dQ, dK and dV (each element is one chain of
/// multiply-adds over the features, queries or keys in order, which the tiles do not reorder).
inline constexpr TileShape kBackwardDefaultTiles{96, 192};

/// The backward's tile shape: the options' sizes, defaulting to kBackwardDefaultTiles, each at
/// most the problem's and at least 1.
inline TileShape resolve_backward_tiles(const AttentionOptions& options, Index num_queries, Index num_keys) {
  resolve_tiles(options);  // validates the sizes
  const Index bq = options.block_q > 0 ? options.block_q : kBackwardDefaultTiles.queries;
  const Index bk = options.block_k > 0 ? options.block_k : kBackwardDefaultTiles.keys;
  return {std::min(bq, std::max(num_queries, Index(1))), std::min(bk, std::max(num_keys, Index(1)))};
}

/// Strided read-only vector (a column of an (Lq, H) log-sum-exp matrix).
template <class T>
using ConstStridedVectorRef = Eigen::Ref<const Vector<T>, 0, Eigen::InnerStride<>>;

/// What the backward of one head reads, all views:
///   q (Lq, Dk), out (Lq, Dv), d_out (Lq, Dv), lse (Lq); k (Lk, Dk) and v (Lk, Dv) are shared
///   by the heads of a group (GQA).
template <class T>
struct BackwardHead {
  ConstMatrixRef<T> q;
  ConstMatrixRef<T> out;
  ConstMatrixRef<T> d_out;
  ConstStridedVectorRef<T> lse;
};

/// The gradient of additive biases is dS itself; a sink receives every visited tile of dS of its
/// head (queries x keys, first element (q0, k0)) from the key pass, whose task `task` owns the
/// key tile (the tile's index). Unvisited tiles (empty, or never seen) have dS = 0. This one drops it.
struct NoBiasGradient {
  static constexpr bool active = false;
  template <class S>
  void add(const S&, Index, Index, Index) const {}
};

/// Whether the backward of score function Modifier under bound mask BoundMask needs the slope
/// tile g = ds/dz: a soft-capped score, or a mask with a score modifier (SoftCap, ScoreMod).
template <class Modifier, class BoundMask>
inline constexpr bool needs_slope = Modifier::active || has_score_slope<BoundMask>::value;

/// Which schedule the blocked backward runs: Auto picks OnePass when the tasks of the one pass
/// (kv groups) are at least the team's threads, else TwoPass. The gradients are bitwise the same
/// under both; forcing one is for tests (backward_schedule_override()).
enum class BackwardSchedule { Auto, OnePass, TwoPass };

/// The schedule the blocked backward entries use, Auto unless a test forced one. Not thread
/// safe: set it only while no backward runs.
inline BackwardSchedule& backward_schedule_override() {
  static BackwardSchedule schedule = BackwardSchedule::Auto;
  return schedule;
}

/// Whether `tasks` kv groups run in one pass (see BackwardSchedule).
inline bool use_one_pass(Index tasks) {
  switch (backward_schedule_override()) {
    case BackwardSchedule::OnePass: return true;
    case BackwardSchedule::TwoPass: return false;
    case BackwardSchedule::Auto: break;
  }
  return tasks >= Index(team_size());
}

/// Keys of [k0, k0 + cols) that queries [q0 + i0, q0 + min(i1, rows)) of a tile of kind `kind` may
/// see, relative to k0: the value kernel's key ranges for dQ (both the query pass and the one pass).
template <class BoundMask>
KeyRange keys_seen_by(const BoundMask& mask, TileKind kind, Index q0, Index rows, Index k0, Index cols, Index i0,
                      Index i1) {
  if (kind == TileKind::Full) return KeyRange{0, cols};
  if (std::min(i1, rows) <= i0) return KeyRange{0, 0};
  const KeyRange seen = mask.keys(q0 + i0, q0 + std::min(i1, rows));
  return KeyRange{std::clamp(seen.begin - k0, Index(0), cols), std::clamp(seen.end - k0, Index(0), cols)};
}

/// Per-thread scratch of the key pass. lanes_k = Bk rounded up to packets.
///   kt, vt  (Dk, lanes_k), (Dv, lanes_k)  the key tile's K^T and V^T
///   sq      (Bq, Dk)    scale * Q of the current query tile
///   s, dp   (Bq, lanes_k)  S then P; dP then dS
///   g       (Bq, lanes_k)  ds/dz of the score modifier (when it has one)
///   dk, dv  (Bk, Dk), (Bk, Dv) accumulators
///   ones    (max(Bq, Bk)) the value kernel's rescale factors
///   seen    (Bq) the keys each query row may see
///   dst     (Bk, lanes_q) dS^T, the one pass's weights of dQ += dS K (lanes_q = Bq rounded up to
///           packets; empty for the key pass)
///   stat    (Bq) D_i = <dO_i, O_i> of the query tile, recomputed per tile (O(d) a row, a
///           1/Bk share of one product) so that no scratch depends on the lengths
template <class T>
struct KeyPassScratch {
  KeyPassScratch(TileShape tiles, Index key_dim, Index value_dim, bool modifier, bool one_pass = false)
      : kt(key_dim, round_up_to_lanes<T>(tiles.keys)),
        vt(value_dim, round_up_to_lanes<T>(tiles.keys)),
        sq(tiles.queries, key_dim),
        s(tiles.queries, round_up_to_lanes<T>(tiles.keys)),
        dp(tiles.queries, round_up_to_lanes<T>(tiles.keys)),
        g(modifier ? tiles.queries : 0, round_up_to_lanes<T>(tiles.keys)),
        dk(tiles.keys, key_dim),
        dv(tiles.keys, value_dim),
        ones(Vector<T>::Ones(std::max(tiles.queries, tiles.keys))),
        seen(std::size_t(tiles.queries)),
        dst(one_pass ? tiles.keys : 0, round_up_to_lanes<T>(tiles.queries)),
        stat(tiles.queries) {}

  static Index bytes(TileShape tiles, Index key_dim, Index value_dim, bool modifier, bool one_pass = false) {
    const Index lanes = round_up_to_lanes<T>(tiles.keys);
    return Index(sizeof(T)) *
               ((key_dim + value_dim) * lanes + tiles.queries * key_dim + (modifier ? 3 : 2) * tiles.queries * lanes +
                tiles.keys * (key_dim + value_dim) + std::max(tiles.queries, tiles.keys) + tiles.queries +
                (one_pass ? tiles.keys * round_up_to_lanes<T>(tiles.queries) : 0)) +
           Index(sizeof(KeyRange)) * tiles.queries;
  }

  Matrix<T> kt, vt, sq, s, dp, g, dk, dv;
  Vector<T> ones;
  std::vector<KeyRange> seen;  // (Bq) keys each row of a partial tile may see, relative to the tile
  Matrix<T> dst;               // (Bk, lanes_q) dS^T of the one pass
  Vector<T> stat;              // (Bq) D_i of the current query tile
};

/// Per-thread scratch of the query pass. lanes = Bq rounded up to packets.
///   qt, dot (Dk, lanes), (Dv, lanes)  scale * Q^T and dO^T of the query tile
///   st, dpt (Bk, lanes)  S^T then P^T; dP^T then dS^T
///   g       (Bk, lanes)  ds/dz of the score modifier (when it has one)
///   dq      (Bq, Dk) accumulator
///   state   (2, lanes) shift u and statistic D per query
template <class T>
struct QueryPassScratch {
  QueryPassScratch(TileShape tiles, Index key_dim, Index value_dim, bool modifier)
      : qt(key_dim, round_up_to_lanes<T>(tiles.queries)),
        dot(value_dim, round_up_to_lanes<T>(tiles.queries)),
        st(tiles.keys, round_up_to_lanes<T>(tiles.queries)),
        dpt(tiles.keys, round_up_to_lanes<T>(tiles.queries)),
        g(modifier ? tiles.keys : 0, round_up_to_lanes<T>(tiles.queries)),
        dq(tiles.queries, key_dim),
        state(2, round_up_to_lanes<T>(tiles.queries)),
        ones(Vector<T>::Ones(tiles.queries)) {}

  static Index bytes(TileShape tiles, Index key_dim, Index value_dim, bool modifier) {
    const Index lanes = round_up_to_lanes<T>(tiles.queries);
    return Index(sizeof(T)) *
           ((key_dim + value_dim + (modifier ? 3 : 2) * tiles.keys + 2) * lanes + tiles.queries * (key_dim + 1));
  }

  T* shift() { return state.row(0).data(); }
  T* stat() { return state.row(1).data(); }

  Matrix<T> qt, dot, st, dpt, g, dq, state;
  Vector<T> ones;
};

/// The key pass for one tile of keys [k0, k0 + cols) of a kv head read by `num_heads` query
/// heads (GQA: their contributions are summed, head by head, in order), head h under the bound
/// mask masks[h], its dS tiles to sinks[h]: writes dK and dV of those keys.
/// With `dq_acc` (the one pass; null for the key pass) it also adds, for every query tile
/// [q0, q0 + rows) of head h it visits, dq_acc[h] (Lq, Dk) rows q0.. += dS K_tile (dS of the
/// tile, rows x cols, transposed into scratch.dst as the value kernel's weights; unscaled: the
/// caller multiplies by scale once after the last key tile, as the query pass does).
template <class T, class Modifier, class BoundMask, class Sink>
void backward_key_tile(const BackwardHead<T>* heads, const BoundMask* masks, const Sink* sinks, Index num_heads,
                       const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, T scale, const Modifier& modifier,
                       TileShape tiles, Index k0, Index cols, MatrixRef<T> dk, MatrixRef<T> dv,
                       KeyPassScratch<T>& scratch, Index task, MatrixRef<T>* dq_acc = nullptr) {
  constexpr bool slope = needs_slope<Modifier, BoundMask>;
  const Index k1 = k0 + cols, stride = scratch.s.outerStride(), lanes = round_up_to_lanes<T>(cols);
  auto dk_acc = scratch.dk.topRows(cols);  // (cols, Dk)
  auto dv_acc = scratch.dv.topRows(cols);  // (cols, Dv)
  dk_acc.setZero();
  dv_acc.setZero();
  pack_scaled_queries<T>(k.middleRows(k0, cols), T(1), scratch.kt);
  pack_scaled_queries<T>(v.middleRows(k0, cols), T(1), scratch.vt);
  for (Index h = 0; h < num_heads; ++h) {
    const BackwardHead<T>& head = heads[h];
    const BoundMask& mask = masks[h];
    const Index num_queries = head.q.rows();
    for (Index q0 = 0; q0 < num_queries; q0 += tiles.queries) {
      const Index rows = std::min(tiles.queries, num_queries - q0), q1 = q0 + rows;
      const TileKind kind = mask.classify(q0, q1, k0, k1);
      if (kind == TileKind::Empty) continue;
      // Keys each row of a partial tile may see (relative to k0), so that the kernels skip the
      // rows that see none of a block of keys (a causal diagonal, the edges of a window).
      if (kind == TileKind::Partial)
        for (Index i = 0; i < rows; ++i) {
          const KeyRange seen = mask.keys(q0 + i, q0 + i + 1);
          scratch.seen[std::size_t(i)] = {seen.begin - k0, seen.end - k0};
        }
      // Rows of the tile, a range, holding every row that may see a key of [j0, j1).
      const auto rows_seeing = [&](Index j0, Index j1) {
        if (kind == TileKind::Full) return KeyRange{0, rows};
        Index first = rows, last = -1;
        for (Index i = 0; i < rows; ++i) {
          const KeyRange& seen = scratch.seen[std::size_t(i)];
          if (seen.begin < j1 && seen.end > j0 && seen.begin < seen.end) {
            first = std::min(first, i);
            last = i;
          }
        }
        return last < first ? KeyRange{0, 0} : KeyRange{first, last + 1};
      };
      // S (rows, cols) = (scale Q) K^T: the products of the forward's S^T, in the same order.
      auto sq = scratch.sq.topRows(rows);
      sq = scale * head.q.middleRows(q0, rows);
      const ConstMatrixRef<T> sq_ref(sq);
      score_tile<T>(sq_ref, scratch.kt.data(), scratch.kt.outerStride(), lanes, scratch.s.data(), stride, rows_seeing);
      auto s = scratch.s.topLeftCorner(rows, cols);
      auto g = scratch.g.topLeftCorner(slope ? rows : 0, cols);
      if constexpr (Modifier::active)
        modifier.forward(s, g);
      else if constexpr (slope)
        g.setOnes();
      if (kind == TileKind::Partial) apply_mask_with_slope(mask, s, g, q0, k0);
      // dP (rows, cols) = dO V^T.
      const ConstMatrixRef<T> d_out = head.d_out.middleRows(q0, rows);
      score_tile<T>(d_out, scratch.vt.data(), scratch.vt.outerStride(), lanes, scratch.dp.data(), stride, rows_seeing);
      T* d = scratch.stat.data();
      row_dots(head.d_out.row(q0).data(), head.d_out.outerStride(), head.out.row(q0).data(), head.out.outerStride(),
               rows, head.out.cols(), d);
      for (Index i = 0; i < rows; ++i)
        weights_and_score_gradient_row(scratch.s.row(i).data(), scratch.dp.row(i).data(), lanes,
                                       weight_shift(head.lse(q0 + i)), d[i]);
      // dV += P^T dO (P held as the value kernel's transposed weights: row i of P is query i).
      value_tile<T>(scratch.s.data(), stride, d_out, scratch.ones.data(), dv_acc, rows_seeing);
      auto ds = scratch.dp.topLeftCorner(rows, cols);
      if constexpr (Sink::active) sinks[h].add(ds, q0, k0, task);
      if constexpr (slope) chain_score_slope(ds, g, scratch.s.topLeftCorner(rows, cols));
      // dK += dS^T (scale Q).
      value_tile<T>(scratch.dp.data(), stride, sq_ref, scratch.ones.data(), dk_acc, rows_seeing);
      if (dq_acc) {
        // dQ (rows, Dk) += dS K_tile: the query pass's product on dS^T (cols, rows).
        scratch.dst.topLeftCorner(cols, rows) = ds.transpose();
        value_tile<T>(scratch.dst.data(), scratch.dst.outerStride(), k.middleRows(k0, cols), scratch.ones.data(),
                      dq_acc[h].middleRows(q0, rows), [&](Index i0, Index i1) {
                        return keys_seen_by(mask, kind, q0, rows, k0, cols, i0, i1);
                      });
      }
    }
  }
  dk.middleRows(k0, cols) = dk_acc;
  dv.middleRows(k0, cols) = dv_acc;
}

/// The query pass for one tile of queries [q0, q0 + rows) of one head: writes dQ of those queries.
template <class T, class Modifier, class BoundMask>
void backward_query_tile(const BackwardHead<T>& head, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, T scale,
                         const Modifier& modifier, const BoundMask& mask, TileShape tiles, Index q0, Index rows,
                         MatrixRef<T> dq, QueryPassScratch<T>& scratch) {
  constexpr bool slope = needs_slope<Modifier, BoundMask>;
  const Index q1 = q0 + rows, lanes = round_up_to_lanes<T>(rows), stride = scratch.st.outerStride();
  auto dq_acc = scratch.dq.topRows(rows);  // (rows, Dk)
  dq_acc.setZero();
  pack_scaled_queries<T>(head.q.middleRows(q0, rows), scale, scratch.qt);
  pack_scaled_queries<T>(head.d_out.middleRows(q0, rows), T(1), scratch.dot);
  row_dots(head.d_out.row(q0).data(), head.d_out.outerStride(), head.out.row(q0).data(), head.out.outerStride(), rows,
           head.out.cols(), scratch.stat());
  for (Index i = 0; i < lanes; ++i) {
    const bool valid = i < rows;
    scratch.shift()[i] = valid ? weight_shift(head.lse(q0 + i)) : std::numeric_limits<T>::infinity();
    if (!valid) scratch.stat()[i] = 0;
  }
  const KeyRange visible = mask.keys(q0, q1);
  for (Index k0 = visible.begin; k0 < visible.end; k0 += tiles.keys) {
    const Index cols = std::min(tiles.keys, visible.end - k0), k1 = k0 + cols;
    const TileKind kind = mask.classify(q0, q1, k0, k1);
    if (kind == TileKind::Empty) continue;
    const auto seen_by = [&](Index i0, Index i1) {  // as in blocked_query_tile
      return keys_seen_by(mask, kind, q0, rows, k0, cols, i0, i1);
    };
    const ConstMatrixRef<T> k_tile = k.middleRows(k0, cols), v_tile = v.middleRows(k0, cols);
    // S^T (cols, lanes), exactly the forward's.
    score_tile<T>(k_tile, scratch.qt.data(), scratch.qt.outerStride(), lanes, scratch.st.data(), stride, seen_by);
    auto st = scratch.st.topLeftCorner(cols, lanes);
    auto g = scratch.g.topLeftCorner(slope ? cols : 0, lanes);
    if constexpr (Modifier::active)
      modifier.forward(st, g);
    else if constexpr (slope)
      g.setOnes();
    if (kind == TileKind::Partial)
      apply_mask_with_slope(mask, scratch.st.topLeftCorner(cols, rows).transpose(),
                            scratch.g.topLeftCorner(slope ? cols : 0, rows).transpose(), q0, k0);
    // dP^T (cols, lanes) = V dO^T.
    score_tile<T>(v_tile, scratch.dot.data(), scratch.dot.outerStride(), lanes, scratch.dpt.data(), stride, seen_by);
    weights_and_score_gradient_lanes(scratch.st.data(), scratch.dpt.data(), stride, cols, lanes, scratch.shift(),
                                     scratch.stat());
    if constexpr (slope) chain_score_slope(scratch.dpt.topLeftCorner(cols, lanes), g, st);
    // dQ += dS K (dS held transposed, as the value kernel's weights).
    value_tile<T>(scratch.dpt.data(), stride, k_tile, scratch.ones.data(), dq_acc, seen_by);
  }
  dq.middleRows(q0, rows) = scale * dq_acc;
}

/// The one pass over a kv group: query heads heads[0 .. num_heads) read k (Lk, Dk) and v (Lk, Dv);
/// writes dq[h] (Lq_h, Dk) of every head and dk (Lk, Dk), dv (Lk, Dv) of the kv head. For the key
/// tiles in ascending order, backward_key_tile with dQ: dK and dV of the tile as the key pass
/// computes them, and dq[h] += dS K_tile over the query tiles that see the tile; then
/// dq[h] = scale dq[h], the query pass's dQ = scale (dS K) bit for bit (each element one chain of
/// multiply-adds over the keys in ascending order, from zero). Memory: the key pass's scratch and
/// the transposed dS tile (Bk, Bq); dq itself is the accumulator.
template <class T, class Modifier, class BoundMask, class Sink>
void backward_group_one_pass(const BackwardHead<T>* heads, const BoundMask* masks, const Sink* sinks, Index num_heads,
                             const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, T scale,
                             const Modifier& modifier, TileShape tiles, MatrixRef<T>* dq, MatrixRef<T> dk,
                             MatrixRef<T> dv, KeyPassScratch<T>& scratch) {
  for (Index h = 0; h < num_heads; ++h) dq[h].setZero();
  for (Index tile = 0, k0 = 0; k0 < k.rows(); ++tile, k0 += tiles.keys)
    backward_key_tile<T>(heads, masks, sinks, num_heads, k, v, scale, modifier, tiles, k0,
                         std::min(tiles.keys, k.rows() - k0), dk, dv, scratch, tile, dq);
  for (Index h = 0; h < num_heads; ++h) dq[h] = scale * dq[h];
}

/// The gradients of one head: the one pass when it has the threads to itself (see
/// use_one_pass), else the key pass over the tiles of keys, then the query pass over the tiles
/// of queries, each in parallel. Multi-head callers run the passes' items themselves.
template <class T, class Modifier, class BoundMask, class Sink>
void blocked_backward(const BackwardHead<T>& head, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, T scale,
                      const Modifier& modifier, const BoundMask& mask, TileShape tiles, MatrixRef<T> dq,
                      MatrixRef<T> dk, MatrixRef<T> dv, const Sink& sink) {
  const Index key_dim = k.cols(), value_dim = v.cols();
  if (use_one_pass(1)) {
    KeyPassScratch<T> scratch(tiles, key_dim, value_dim, needs_slope<Modifier, BoundMask>, true);
    backward_group_one_pass<T>(&head, &mask, &sink, 1, k, v, scale, modifier, tiles, &dq, dk, dv, scratch);
    return;
  }
  const Index key_tiles = (k.rows() + tiles.keys - 1) / tiles.keys;
  parallel_for_with_scratch(
      key_tiles, [&] { return KeyPassScratch<T>(tiles, key_dim, value_dim, needs_slope<Modifier, BoundMask>); },
      [&](Index tile, KeyPassScratch<T>& scratch) {
        const Index k0 = tile * tiles.keys;
        backward_key_tile<T>(&head, &mask, &sink, 1, k, v, scale, modifier, tiles, k0,
                             std::min(tiles.keys, k.rows() - k0), dk, dv, scratch, tile);
      });
  const Index query_tiles = (head.q.rows() + tiles.queries - 1) / tiles.queries;
  parallel_for_with_scratch(
      query_tiles, [&] { return QueryPassScratch<T>(tiles, key_dim, value_dim, needs_slope<Modifier, BoundMask>); },
      [&](Index tile, QueryPassScratch<T>& scratch) {
        const Index q0 = tile * tiles.queries;
        backward_query_tile<T>(head, k, v, scale, modifier, mask, tiles, q0,
                               std::min(tiles.queries, head.q.rows() - q0), dq, scratch);
      });
}

}  // namespace attend::detail
