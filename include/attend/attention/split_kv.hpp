// SPDX-License-Identifier: MIT
/// \file attention/split_kv.hpp
/// \brief Split-KV attention: partial results over chunks of keys, their log-sum-exp merge, and a
/// one-token decode step that splits the keys across threads.
///
/// Attention over a chunk C of the keys, with its log-sum-exp per query row,
///   o_C = sum_{j in C} e^{s_j - lse_C} v_j,   lse_C = log sum_{j in C} e^{s_j},
/// is `scaled_dot_product_attention_with_lse(q, k_C, v_C, mask)` (the mask sees the chunk's own
/// coordinates: for a dense mask over all keys pass the chunk's column block). Two partials over
/// disjoint chunks A and B merge exactly into the partial over A u B:
///   lse = log(e^{lse_A} + e^{lse_B}),   o = e^{lse_A - lse} o_A + e^{lse_B - lse} o_B.
/// The merge is associative and commutative (up to rounding), so chunks may be processed in any
/// order and grouping; an empty partial (lse = -inf, zero output) is its identity.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/kv_rows.hpp"
#include "../detail/packet.hpp"
#include "../detail/parallel.hpp"
#include "../detail/q8_kernels.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../softmax.hpp"
#include "multi_head.hpp"
#include "sinks.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

ATTEND_PACKET_WARNINGS_PUSH

namespace attend {

/// Merges the partial (other_out, other_lse) into (out, lse), row by row (see the file comment).
/// Rows where both log-sum-exps are -inf (no key seen) stay zero with lse -inf; a NaN
/// log-sum-exp makes its row NaN. `out` and `lse` are updated in place; neither may share
/// memory with the other or with `other_out` or `other_lse`.
///
/// \param out       (L, Dv) partial output, overwritten with the merged output
/// \param lse       (L) its log-sum-exp, overwritten with the merged one
/// \param other_out (L, Dv)
/// \param other_lse (L)
/// \throws attend::invalid_argument on mismatched shapes or aliasing views.
template <class T>
void merge_partial_into(MatrixRef<T> out, VectorRef<T> lse, const ConstMatrixRef<T>& other_out,
                        const Eigen::Ref<const Vector<T>>& other_lse) {
  static_assert(detail::supported_scalars<T>);
  detail::check_shape(other_out, out.rows(), out.cols(), "partial output");
  ATTEND_CHECK(lse.size() == out.rows() && other_lse.size() == out.rows(),
               "log-sum-exps of sizes " + std::to_string(lse.size()) + " and " + std::to_string(other_lse.size()) +
                   " must both match the " + std::to_string(out.rows()) + " rows of the partial outputs");
  detail::check_no_alias(out, "output", other_out, "input other_out");
  detail::check_no_alias(out, "output", other_lse, "input other_lse");
  detail::check_no_alias(lse, "log-sum-exp", other_out, "input other_out");
  detail::check_no_alias(lse, "log-sum-exp", other_lse, "input other_lse");
  detail::check_no_alias(lse, "log-sum-exp", out, "output");
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < out.rows(); ++i) {
    const T a = lse(i), b = other_lse(i);
    const T m = std::isnan(b) ? b : std::max(a, b);
    if (m == kNegInf) {  // neither partial saw a key
      out.row(i).setZero();
      continue;
    }
    const T wa = std::exp(a - m), wb = std::exp(b - m), sum = wa + wb;
    out.row(i) = (wa / sum) * out.row(i) + (wb / sum) * other_out.row(i);
    lse(i) = m + std::log(sum);
  }
}

/// Returns the merge of two partials (output and lse; weights are not merged).
template <class T>
AttentionResult<T> merge_partials(const AttentionResult<T>& a, const AttentionResult<T>& b) {
  static_assert(detail::supported_scalars<T>);
  AttentionResult<T> merged{a.output, a.lse, {}};
  merge_partial_into<T>(merged.output, merged.lse, b.output, b.lse);
  return merged;
}

/// Returns the merge of partials, folded left to right. At least one partial is required.
template <class T>
AttentionResult<T> merge_partials(const std::vector<AttentionResult<T>>& partials) {
  static_assert(detail::supported_scalars<T>);
  ATTEND_CHECK(!partials.empty(), "merge_partials needs at least one partial");
  AttentionResult<T> merged{partials[0].output, partials[0].lse, {}};
  for (std::size_t p = 1; p < partials.size(); ++p)
    merge_partial_into<T>(merged.output, merged.lse, partials[p].output, partials[p].lse);
  return merged;
}

namespace detail {

/// Key rows per split of a decode step. Fixed, so that the splits and the order of their merge,
/// and hence the result's bits, never depend on the thread count.
inline constexpr Index kDecodeSplitKeys = 256;

/// Query rows of one work item of a multi-row decode (a prefill chunk over a cache): the scores
/// scratch of an item is (rows H, split).
inline constexpr Index kDecodeQueryRows = 8;

/// How far ahead the decode kernel prefetches the rows it will read: 32 KiB of rows (at least 4,
/// at most 32 rows). Rows of a cache are a page or more apart (8 heads of 128 floats: 4 KiB),
/// where the hardware prefetchers stop; each kv head's segment of the later rows is prefetched
/// next to the work on the same segment of the current rows, spread over the block's work.
inline constexpr Index kDecodePrefetchBytes = 32768;

/// Value c of a stored head row (elements at p): p[c] as C, or x^_c = s q_c of its q8_0 block.
template <class C, class E>
C stored_value(const E* p, Index c) {
  if constexpr (std::is_same_v<E, BlockQ8_0>)
    return dequantize_q8_0(p[c / kQ8Block], c % kQ8Block);
  else
    return C(p[c]);
}

/// For B query rows q_b = q + b * q_stride (C, pre-scaled) and J stored key rows key_i = key +
/// i * key_stride (elements of a cache format, at a head's first element) of d values:
///   s[b * s_stride + i] = <q_b, key_i>,
/// accumulated in C. Each packet of the keys is loaded and converted once for all B rows (bf16
/// and half widen exactly; a q8_0 packet is s q converted and scaled in registers) and kept in
/// a register for the B rows (keep_in_register), and the B x J lane-wise partial sums are
/// reduced together (lane_sums).
template <int B, int J, class C, class E>
void dot_block(const C* q, Index q_stride, const E* key, Index key_stride, Index d, C* s, Index s_stride) {
  namespace simd = Eigen::internal;
  using P = Packet<C>;
  constexpr Index W = kLanes<C>;
  P acc[std::size_t(B * J)];  // acc[b J + i]: lane-wise partial sums of <q_b, key_i>
  for (P& a : acc) a = simd::pset1<P>(C(0));
  const auto multiply_add = [&](P* keys, Index c) {
    for (int i = 0; i < J; ++i) keep_in_register(keys[i]);
    for (int b = 0; b < B; ++b) {
      P query = simd::ploadu<P>(q + b * q_stride + c);
      keep_in_register(query);
      for (int i = 0; i < J; ++i) acc[b * J + i] = simd::pmadd(query, keys[i], acc[b * J + i]);
    }
  };
  Index c = 0;
  if constexpr (std::is_same_v<E, BlockQ8_0>) {
    for (; c + kQ8Block <= d; c += kQ8Block) {
      const Index block = c / kQ8Block;
      P scales[std::size_t(J)];
      for (int i = 0; i < J; ++i) scales[i] = simd::pset1<P>(key[i * key_stride + block].scale);
      for (Index l = 0; l < kQ8Block; l += W) {
        P keys[std::size_t(J)];
        for (int i = 0; i < J; ++i) keys[i] = simd::pmul(load_q8(key[i * key_stride + block].q + l), scales[i]);
        multiply_add(keys, c + l);
      }
    }
  } else {
    for (; c + W <= d; c += W) {
      P keys[std::size_t(J)];
      for (int i = 0; i < J; ++i) keys[i] = load_as<C>(key + i * key_stride + c);
      multiply_add(keys, c);
    }
  }
  C sums[std::size_t(B * J)];
  lane_sums<C, B * J>(acc, sums);
  if (c < d)  // the values past the last whole packet (q8_0: the last whole block)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < J; ++i)
        for (Index t = c; t < d; ++t) sums[b * J + i] += q[b * q_stride + t] * stored_value<C>(key + i * key_stride, t);
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < J; ++i) s[b * s_stride + i] = sums[b * J + i];
}

/// For B output rows out_b = out + b * out_stride (C) and J stored value rows value_i = value +
/// i * value_stride of d_v values:
///   out_b += sum_i p[b * p_stride + i] value_i,
/// accumulated in C, one fused multiply-add per key in key order (so the result does not depend
/// on how the keys are grouped into blocks). Each packet of the values is loaded and converted
/// once (q8_0: s q in registers, as for the keys), and each of the outputs read and written once.
template <int B, int J, class C, class E>
void accumulate_block(const C* p, Index p_stride, const E* value, Index value_stride, Index dv, C* out,
                      Index out_stride) {
  namespace simd = Eigen::internal;
  using P = Packet<C>;
  constexpr Index W = kLanes<C>;
  C w[std::size_t(B)][std::size_t(J)];
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < J; ++i) w[b][i] = p[b * p_stride + i];
  const auto multiply_add = [&](const P* values, const C (*weights)[std::size_t(J)], Index c) {
    for (int b = 0; b < B; ++b) {
      P acc = simd::ploadu<P>(out + b * out_stride + c);
      for (int i = 0; i < J; ++i) acc = simd::pmadd(simd::pset1<P>(weights[b][i]), values[i], acc);
      simd::pstoreu(out + b * out_stride + c, acc);
    }
  };
  Index c = 0;
  if constexpr (std::is_same_v<E, BlockQ8_0>) {
    for (; c + kQ8Block <= dv; c += kQ8Block) {
      const Index block = c / kQ8Block;
      P scales[std::size_t(J)];
      for (int i = 0; i < J; ++i) scales[i] = simd::pset1<P>(value[i * value_stride + block].scale);
      for (Index l = 0; l < kQ8Block; l += W) {
        P values[std::size_t(J)];
        for (int i = 0; i < J; ++i) values[i] = simd::pmul(load_q8(value[i * value_stride + block].q + l), scales[i]);
        multiply_add(values, w, c + l);
      }
    }
  } else {
    for (; c + W <= dv; c += W) {
      P values[std::size_t(J)];
      for (int i = 0; i < J; ++i) values[i] = load_as<C>(value + i * value_stride + c);
      multiply_add(values, w, c);
    }
  }
  for (; c < dv; ++c)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < J; ++i) out[b * out_stride + c] += w[b][i] * stored_value<C>(value + i * value_stride, c);
}

/// Calls f(std::integral_constant<int, N>, i) over [0, count) in blocks of N = 4, then N = 1.
template <class F>
void for_blocks_of_4(Index count, F&& f) {
  Index i = 0;
  for (; i + 4 <= count; i += 4) f(std::integral_constant<int, 4>{}, i);
  for (; i < count; ++i) f(std::integral_constant<int, 1>{}, i);
}

/// Calls f(std::integral_constant<int, N>, i) over [0, count) in blocks of N = Max (4 or 8), then 1.
template <int Max, class F>
void for_blocks_of(Index count, F&& f) {
  Index i = 0;
  for (; i + Max <= count; i += Max) f(std::integral_constant<int, Max>{}, i);
  for (; i < count; ++i) f(std::integral_constant<int, 1>{}, i);
}

/// `count` contiguous key rows from `key` and value rows from `value` (elements of a cache
/// format, at the strides of their buffers): a stretch of the keys a decode split reads, e.g.
/// one block of a paged cache.
template <class E>
struct KeyRun {
  const E* key;
  const E* value;
  Index count;
};

/// The partial of one decode split for Q query rows and n keys, all H heads at once. `runs(j)`
/// returns the contiguous rows that start at key j of the split (j < n; a run may extend past
/// the split), stored in a cache format (elements E: float, double, bf16, half, q8_0 blocks)
/// and converted on load; everything is computed and accumulated in C (float, or double for a
/// double cache). Each K and V row (all H_kv heads side by side) is read from memory once; its
/// segment of kv head g then serves the G query heads of group g of every query row from
/// registers and cache:
///   s_rhj = <q_rh, k_j^(g)> (q pre-scaled),  p_rh = softmax(s_rh) (lse_rh),
///   out_rh = sum_j p_rhj v_j^(g),
/// at row r H + h of scores, out and lse. The mask of head h, masks[h], acts on the scores of
/// query row r as on a (1, n) tile of query q0 + r and keys [k0, k0 + n). Keys are taken 4 at a
/// time within each run for the scores, so a key's score depends only on its position within
/// its run, and 8 at a time for P V (whose result does not depend on the grouping). The rows
/// kDecodePrefetchBytes ahead are prefetched meanwhile, a kv head's segment at a time. With
/// `rounded` (the queries rounded to 8 bits, a q8_0 cache and the kernel on the target), the
/// scores are formed by dot_block_q8 from its bytes instead of from q.
/// \param q       (Q, H d) contiguous rows of queries, pre-scaled
/// \param scores  (Q H, >= n) scratch
/// \param out     (Q H, d_v) normalized partial output
/// \param lse     (Q H) its log-sum-exp
template <class C, class E, class BoundMask, class Runs>
void decode_split_runs(const C* q, Index num_queries, Index k_stride, Index v_stride, const HeadLayout& layout,
                       const std::vector<BoundMask>& masks, Index q0, Index k0, Index n, const Runs& runs,
                       MatrixRef<C> scores, MatrixRef<C> out, VectorRef<C> lse,
                       [[maybe_unused]] const Q8Queries& rounded = {}) {
  const Index heads = layout.heads, d = layout.key_dim, dv = layout.value_dim, group = heads / layout.kv_heads;
  const Index s_stride = scores.outerStride(), out_stride = out.outerStride();
  const Index k_head = kv_head_elements<E>(d), v_head = kv_head_elements<E>(dv);
  // f(keys, j, key row j, value row j, later), 4 (key pass) or 8 (value pass) keys at a time,
  // then 1; later[i] is the K (key pass) or V row of key j + i + ahead (in this run or the one
  // that holds it; null past the split), for prefetching.
  const auto for_keys = [&](auto keys_pass, auto&& f) {
    constexpr bool kKeys = decltype(keys_pass)::value;
    constexpr int kBlock = kKeys ? 4 : 8;
    const Index row_bytes = (kKeys ? k_stride : v_stride) * Index(sizeof(E));
    const Index ahead = std::clamp(kDecodePrefetchBytes / std::max(row_bytes, Index(1)), Index(4), Index(32));
    for (Index j = 0; j < n;) {
      const KeyRun<E> run = runs(j);
      const Index count = std::min(run.count, n - j);
      for_blocks_of<kBlock>(count, [&](auto keys, Index i) {
        const E* later[std::size_t(decltype(keys)::value)];
        for (int x = 0; x < decltype(keys)::value; ++x) {
          const Index t = i + ahead + x;  // key j + t
          const KeyRun<E> holder = t < run.count ? KeyRun<E>{run.key + t * k_stride, run.value + t * v_stride, 1}
                                   : j + t < n   ? runs(j + t)
                                                 : KeyRun<E>{nullptr, nullptr, 0};
          later[x] = kKeys ? holder.key : holder.value;
        }
        f(keys, j + i, run.key + i * k_stride, run.value + i * v_stride, later);
      });
      j += count;
    }
  };
  // The segment of kv head g (elems elements) of the rows in later[0, count), into the cache.
  const auto prefetch_segments = [](const E* const* later, int count, Index offset, Index elems) {
    for (int x = 0; x < count; ++x)
      if (later[x] != nullptr)
        for (Index b = 0; b < elems * Index(sizeof(E)); b += 64)
          prefetch_at(reinterpret_cast<const char*>(later[x] + offset), b);
  };
  for_keys(std::true_type{}, [&](auto keys, Index j, const E* key, const E*, const E* const* later) {
    for (Index r = 0; r < num_queries; ++r)
      for (Index g = 0; g < layout.kv_heads; ++g) {
        if (r == 0) prefetch_segments(later, decltype(keys)::value, g * k_head, k_head);
        for_blocks_of_4(group, [&](auto block, Index i) {
          constexpr int kRows = decltype(block)::value, kKeys = decltype(keys)::value;
          const Index h = r * heads + g * group + i;  // the block's first head row
#if ATTEND_HAS_Q8_DOT_KERNELS
          if constexpr (std::is_same_v<E, BlockQ8_0> && std::is_same_v<C, float>)
            if (rounded) {
              dot_block_q8<kRows, kKeys>(rounded.from(h), key + g * k_head, k_stride, d, &scores(h, j), s_stride);
              return;
            }
#endif
          dot_block<kRows, kKeys>(q + h * d, d, key + g * k_head, k_stride, d, &scores(h, j), s_stride);
        });
      }
  });
  for (Index r = 0; r < num_queries; ++r)
    for (Index h = 0; h < heads; ++h) {
      auto row = scores.block(r * heads + h, 0, 1, n);  // (1, n)
      switch (masks[std::size_t(h)].classify(q0 + r, q0 + r + 1, k0, k0 + n)) {
        case TileKind::Empty: row.setConstant(-std::numeric_limits<C>::infinity()); break;
        case TileKind::Partial: apply_mask(masks[std::size_t(h)], row, q0 + r, k0); break;
        case TileKind::Full: break;
      }
    }
  softmax_rows_inplace<C>(scores.topLeftCorner(num_queries * heads, n), lse);
  out.setZero();
  if (dv == 0) return;  // (no output column to address)
  for_keys(std::false_type{}, [&](auto keys, Index j, const E*, const E* value, const E* const* later) {
    for (Index r = 0; r < num_queries; ++r)
      for (Index g = 0; g < layout.kv_heads; ++g) {
        if (r == 0) prefetch_segments(later, decltype(keys)::value, g * v_head, v_head);
        for_blocks_of_4(group, [&](auto block, Index i) {
          const Index h = r * heads + g * group + i;
          accumulate_block<decltype(block)::value, decltype(keys)::value>(&scores(h, j), s_stride, value + g * v_head,
                                                                          v_stride, dv, &out(h, 0), out_stride);
        });
      }
  });
}

/// Decode of Q query rows over the keys [seen.begin, seen.end) of contiguous rows (`runs` as
/// in decode_split_runs, key j of the problem), split into fixed splits of `split` keys and
/// groups of kDecodeQueryRows query rows, run in parallel; each split's partials are merged
/// into the first in split order, so the result's bits never depend on the thread count. Query
/// rows that see no key get zeros and lse -inf.
/// \param q       (Q, H d) pre-scaled queries
/// \param out     (Q H, d_v), lse (Q H): row r H + h is query row r, head h
/// \param rounded q's head rows rounded to 8 bits for dot_block_q8 (see decode_split_runs), or none
template <class C, class E, class BoundMask, class Runs>
void decode_rows(const Matrix<C>& q, Index k_stride, Index v_stride, const HeadLayout& layout,
                 const std::vector<BoundMask>& masks, KeyRange seen, Index split, const Runs& runs, Matrix<C>& out,
                 Vector<C>& lse, const Q8Queries& rounded = {}) {
  const Index heads = layout.heads, rows = q.rows() * heads, dv = layout.value_dim;
  const Index num_seen = std::max(seen.end - seen.begin, Index(0));
  split = std::min(split, std::max(num_seen, Index(1)));  // scratch within the problem's size
  const Index splits = (num_seen + split - 1) / split;
  const Index groups = (q.rows() + kDecodeQueryRows - 1) / kDecodeQueryRows;
  // The partial of split c is rows [c Q H, (c + 1) Q H).
  Matrix<C> part_out(std::max(splits, Index(1)) * rows, dv);
  Vector<C> part_lse(std::max(splits, Index(1)) * rows);
  if (splits == 0) {  // no key to see: zero output, lse -inf
    part_out.setZero();
    part_lse.setConstant(-std::numeric_limits<C>::infinity());
  }
  parallel_for_with_scratch(
      splits * groups, [&] { return Matrix<C>(std::min(q.rows(), kDecodeQueryRows) * heads, split); },
      [&](Index item, Matrix<C>& scores) {
        const Index c = item / groups, r0 = (item % groups) * kDecodeQueryRows;
        const Index count = std::min(kDecodeQueryRows, q.rows() - r0);
        const Index k0 = seen.begin + c * split;
        const auto split_runs = [&](Index j) { return runs(k0 + j); };
        decode_split_runs<C, E>(q.row(r0).data(), count, k_stride, v_stride, layout, masks, r0, k0,
                                std::min(split, seen.end - k0), split_runs, scores,
                                part_out.middleRows(c * rows + r0 * heads, count * heads),
                                part_lse.segment(c * rows + r0 * heads, count * heads), rounded.from(r0 * heads));
      });
  for (Index c = 1; c < splits; ++c)
    merge_partial_into<C>(part_out.topRows(rows), part_lse.head(rows), part_out.middleRows(c * rows, rows),
                          part_lse.segment(c * rows, rows));
  out = part_out.topRows(rows);
  lse = part_lse.head(rows);
}

/// Writes the merged decode rows (Q H, d_v) and lse (Q H) into out (Q, H d_v) of scalar O
/// (rounded once to a 16-bit O) and lse of scalar E, merging head h with sinks(h) first when
/// there are sinks.
template <class C, class O, class L, class E>
void write_decode_rows(Matrix<C>& rows, Vector<C>& rows_lse, Index heads, const Eigen::Ref<const Vector<L>>& sinks,
                       MatrixRef<O> out, VectorRef<E> lse) {
  const Index dv = rows.cols();
  for (Index r = 0; r < out.rows(); ++r)
    for (Index h = 0; h < heads; ++h) {
      const Index row = r * heads + h;
      if (sinks.size() != 0) merge_sink_into<C>(rows.middleRows(row, 1), rows_lse.segment(row, 1), C(sinks(h)));
      out.row(r).segment(h * dv, dv) = rows.row(row).template cast<O>();
      if (lse.size() != 0) lse(row) = E(rows_lse(row));
    }
}

}  // namespace detail

/// One decode step: a single query token with H heads attends over the Lk keys of H_kv
/// key/value heads, with `mask` bound for each head h as HeadIndex{0, h, 1, H} on the (1, Lk)
/// problem (query 0 against keys 0..Lk-1: pass NoMask to see every key, `k.bottomRows(w)` for
/// a window of w keys, or an OffsetMask to apply a mask at absolute positions as decode_step
/// does). Only the keys some head may see (the union of the masks' key ranges) are read. They
/// are cut into fixed splits of `block_k` rows run in parallel; each split reads its K and V rows
/// once, the G = H / H_kv query heads sharing a kv head reuse its segment from cache (GQA-aware).
/// The partials are then merged in split order, so results are bitwise identical for any thread
/// count. A head that sees no key gets a zero output and log-sum-exp -inf.
///
/// Precision: k and v may be float or double (q of the same scalar), or Eigen::bfloat16 or
/// Eigen::half with q of that scalar or float (a bf16/f16 KV cache). K and V are converted
/// exactly to float as they are loaded; scores, softmax, P V, the log-sum-exp and the merges
/// are computed in float (double for double), and the output rounded once to q's scalar; the
/// log-sum-exp is written in float (accumulator_t of q's scalar), the sinks are given in q's.
///
/// \param q   (1, H d) the new token's queries, heads side by side
/// \param k   (Lk, H_kv d) keys, e.g. `KVCache::keys()`
/// \param v   (Lk, H_kv d_v) values
/// \param num_heads H; H_kv = k.cols() / d, d = q.cols() / H
/// \param out (1, H d_v), not sharing memory with q, k or v
/// \param mask any mask, bias or score modifier; per-head policies bind per head
/// \param options scale (default 1/sqrt(d)); block_k = keys per split (0: detail::kDecodeSplitKeys;
///                more than Lk: one split); num_threads
/// \param lse (H) log-sum-exp of each head, or empty
/// \param sinks (H) learned sink logits (attention/sinks.hpp), merged once after the splits; empty: none
/// \throws attend::invalid_argument on mismatched shapes, a mask that does not fit, or when
///         `out` or `lse` aliases an input.
template <class DQ, class DK, class DV, class Mask>
void decode_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                           const Eigen::MatrixBase<DV>& v, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                           const MaskBase<Mask>& mask, const AttentionOptions& options = {},
                           VectorRef<accumulator_t<typename DQ::Scalar>> lse =
                               detail::no_vector<accumulator_t<typename DQ::Scalar>>(),
                           const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DK, DV>);
  using T = typename DQ::Scalar;
  using S = typename DK::Scalar;
  static_assert(detail::kv_query<S, T>);
  using C = detail::kv_compute_t<S>;
  const detail::ThreadScope threads(options.num_threads);
  ATTEND_CHECK(q.rows() == 1, "a decode step takes one query row, got q " + detail::shape_of(q));
  ATTEND_CHECK(k.rows() == v.rows(), "k " + detail::shape_of(k) + " and v " + detail::shape_of(v) +
                                         " must have the same number of rows (keys)");
  ATTEND_CHECK(options.block_k >= 0, "block_k=" + std::to_string(options.block_k) + " must be positive, or 0");
  const detail::HeadLayout layout = detail::infer_head_layout(q.cols(), k.cols(), v.cols(), num_heads);
  const Index heads = layout.heads;
  detail::check_shape(out, 1, heads * layout.value_dim, "output");
  ATTEND_CHECK(lse.size() == 0 || lse.size() == heads, "log-sum-exp of size " + std::to_string(lse.size()) +
                                                           " must have num_heads = " + std::to_string(heads) +
                                                           " entries");
  detail::check_sinks(sinks.size(), heads);
  const ConstMatrixRef<T> q_ref(q);
  const ConstMatrixRef<S> k_ref(k), v_ref(v);
  detail::check_no_alias(out, "output", q_ref, "input q");
  detail::check_no_alias(out, "output", k_ref, "input k");
  detail::check_no_alias(out, "output", v_ref, "input v");
  detail::check_no_alias(lse, "log-sum-exp", q_ref, "input q");
  detail::check_no_alias(lse, "log-sum-exp", k_ref, "input k");
  detail::check_no_alias(lse, "log-sum-exp", v_ref, "input v");
  detail::check_no_alias(lse, "log-sum-exp", out, "output");
  // Each head's policy, and the keys any head may see.
  std::vector<decltype(detail::bind_mask(mask.derived(), HeadIndex{}, 1, 0))> masks;
  masks.reserve(std::size_t(heads));
  KeyRange seen{k.rows(), 0};
  for (Index h = 0; h < heads; ++h) {
    masks.push_back(detail::bind_mask(mask.derived(), HeadIndex{0, h, 1, heads}, 1, k.rows()));
    const KeyRange r = masks.back().keys(0, 1);
    if (r.begin < r.end) seen = {std::min(seen.begin, r.begin), std::max(seen.end, r.end)};
  }
  const Matrix<C> q_scaled = detail::resolve_scale<C>(options, layout.key_dim) * q_ref.template cast<C>();  // (1, H d)
  const auto runs = [&](Index j) {
    return detail::KeyRun<S>{k_ref.row(j).data(), v_ref.row(j).data(), k_ref.rows() - j};
  };
  Matrix<C> rows;
  Vector<C> rows_lse;
  detail::decode_rows<C, S>(q_scaled, k_ref.outerStride(), v_ref.outerStride(), layout, masks, seen,
                            options.block_k > 0 ? options.block_k : detail::kDecodeSplitKeys, runs, rows, rows_lse);
  detail::write_decode_rows<C, T, T, accumulator_t<T>>(rows, rows_lse, heads, sinks, out, lse);
}

/// One decode step over every key: decode_attention_into with NoMask.
template <class DQ, class DK, class DV>
void decode_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                           const Eigen::MatrixBase<DV>& v, Index num_heads, MatrixRef<typename DQ::Scalar> out,
                           const AttentionOptions& options = {},
                           VectorRef<accumulator_t<typename DQ::Scalar>> lse =
                               detail::no_vector<accumulator_t<typename DQ::Scalar>>()) {
  decode_attention_into(q, k, v, num_heads, out, NoMask{}, options, lse);
}

}  // namespace attend

ATTEND_PACKET_WARNINGS_POP
