// SPDX-License-Identifier: MIT
/// \file attention/batched.hpp
/// \brief Scaled dot-product attention over a batch of sequences with several heads each.
///
/// Layout (the memory of a PyTorch (B, L, H*d) tensor, read as a row-major matrix):
///  - sequences are stacked along rows: rows [b*L, (b+1)*L) of every matrix are sequence b, so
///    Q is (B*Lq, H*Dk), K is (B*Lk, H*Dk), V is (B*Lk, H*Dv) and the output is (B*Lq, H*Dv);
///  - heads sit side by side along columns: columns [h*d, (h+1)*d) are head h, read in place
///    as the zero-copy view `x.middleCols(h * d, d)`.
/// Head h of sequence b is exactly `scaled_dot_product_attention` on those blocks, with one
/// mask policy and one options struct for every (sequence, head). Work is spread over
/// (sequence, head, query tile) in one OpenMP loop; results do not depend on the thread count.
#pragma once

#include "../detail/checks.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../scores.hpp"
#include "../types.hpp"
#include "../detail/parallel.hpp"
#include "../detail/sinks.hpp"
#include "blocked.hpp"
#include "materialized.hpp"
#include "scaled_dot_product.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace attend {

/// How a batched call splits its matrices (see the file comment): `num_heads` heads along the
/// columns, `batch_size` sequences along the rows.
struct BatchLayout {
  Index num_heads = 1;   ///< H; the column counts of Q, K and V are multiples of it
  Index batch_size = 1;  ///< B; the row counts of Q, K and V are multiples of it
};

namespace detail {

/// Sizes of one (sequence, head) problem of a batched call.
struct HeadProblem {
  Index queries, keys, key_dim, value_dim;  // Lq, Lk, Dk, Dv
};

template <class Q, class K, class V>
HeadProblem check_batched(const Q& q, const K& k, const V& v, const BatchLayout& layout) {
  check_qkv(q, k, v);
  const Index heads = layout.num_heads, batch = layout.batch_size;
  ATTEND_CHECK(heads >= 1 && batch >= 1, "num_heads (" + std::to_string(heads) + ") and batch_size (" +
                                             std::to_string(batch) + ") must be at least 1");
  ATTEND_CHECK(q.cols() % heads == 0 && v.cols() % heads == 0,
               "q " + shape_of(q) + " and v " + shape_of(v) + " must have a column count divisible by num_heads = " +
                   std::to_string(heads));
  ATTEND_CHECK(q.rows() % batch == 0 && k.rows() % batch == 0,
               "q " + shape_of(q) + " and k " + shape_of(k) + " must have a row count divisible by batch_size = " +
                   std::to_string(batch));
  return {q.rows() / batch, k.rows() / batch, q.cols() / heads, v.cols() / heads};
}

/// The batched core: out = attention of every (sequence, head) block, through the path that
/// `options` selects for one head's shape, with the mask bound for each (sequence, head).
/// Scratch is allocated once per thread. Q, K, V and the output are stored as S and computed in
/// T = accumulator_t<S>; the materialized path of bf16 or half heads runs on float copies of
/// each head's blocks. With `sinks` (H, or empty), each query tile's rows are merged with head
/// h's sink (0, sinks(h)) in T once computed (merge_sink_into), before the output is rounded to S.
template <class S, class Mask>
void batched_attention_into(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                            const ConstMatrixRef<identity_t<S>>& v, const Mask& mask,
                            const AttentionOptions& options, const BatchLayout& layout,
                            MatrixRef<identity_t<S>> out,
                            const Eigen::Ref<const Vector<identity_t<S>>>& sinks = Vector<identity_t<S>>()) {
  using T = accumulator_t<S>;
  const ThreadScope threads(options.num_threads);
  const HeadProblem p = check_batched(q, k, v, layout);
  check_shape(out, q.rows(), v.cols(), "output");
  check_sinks(sinks.size(), layout.num_heads);
  check_outputs_do_not_alias<S, S, T>(q, k, v, out, no_vector<T>());
  const TileShape tiles = resolve_tiles(options, p.queries, p.keys);
  const ScaledDot<T> score{resolve_scale<T>(options, p.key_dim)};
  const Index num_heads = layout.batch_size * layout.num_heads;
  // Head n is head h = n % H of sequence b = n / H: its policy, and its blocks as zero-copy views.
  const auto head_index = [&](Index n) {
    return HeadIndex{n / layout.num_heads, n % layout.num_heads, layout.batch_size, layout.num_heads};
  };
  std::vector<decltype(bind_mask(mask.derived(), HeadIndex{}, 0, 0))> bound;
  bound.reserve(std::size_t(num_heads));
  for (Index n = 0; n < num_heads; ++n) bound.push_back(bind_mask(mask.derived(), head_index(n), p.queries, p.keys));
  if (p.queries == 0) return;
  if (p.keys == 0) {  // no key to see (and no block of an empty K at an offset)
    out.setZero();
    return;
  }
  const auto head = [&](auto& m, Index n, Index rows, Index cols) {
    return m.block(n / layout.num_heads * rows, n % layout.num_heads * cols, rows, cols);
  };
  const bool sunk = sinks.size() != 0;
  const auto sink_of = [&](Index n) { return T(sinks(n % layout.num_heads)); };

  if (use_blocked(options, p.queries, p.keys)) {
    const Index tiles_per_head = (p.queries + tiles.queries - 1) / tiles.queries;
    // With the bf16 dot-product kernels (blocked.hpp), V of every head in key pairs, packed once:
    // the pairs of sequence b are rows [b ceil(Lk/2), (b + 1) ceil(Lk/2)), its heads side by side.
    const bool pairs = runs_bf16_dot_kernels<S, ScaledDot<T>>(tiles);
    const Index key_pairs = (p.keys + 1) / 2;
    Matrix<std::uint32_t> value_pairs;
#if ATTEND_HAS_BF16_DOT_KERNELS
    if constexpr (uses_bf16_dot_kernels<S, ScaledDot<T>>)
      if (pairs) {
        value_pairs.resize(layout.batch_size * key_pairs, v.cols());
        for (Index b = 0; b < layout.batch_size; ++b)
          pack_value_pairs(v.middleRows(b * p.keys, p.keys), value_pairs.middleRows(b * key_pairs, key_pairs));
      }
#endif
    // With sinks, a thread's tile also gets its log-sum-exp, and (S != T) its output in T: rows
    // [q0, q0 + rows) of an (Lq) vector and an (Lq, Dv) matrix, what blocked_query_tile addresses.
    struct Scratch {
      BlockedScratch<T> blocked;
      Vector<T> lse;
      Matrix<T> out;
    };
    parallel_for_with_scratch(
        num_heads * tiles_per_head,
        [&] {
          return Scratch{BlockedScratch<T>(tiles, p.key_dim, p.value_dim, pairs), Vector<T>(sunk ? p.queries : 0),
                         Matrix<T>(sunk && !std::is_same_v<S, T> ? p.queries : 0, p.value_dim)};
        },
        [&](Index task, Scratch& scratch) {
          const Index n = task / tiles_per_head, q0 = task % tiles_per_head * tiles.queries;
          const Index rows = std::min(tiles.queries, p.queries - q0);
          std::optional<ConstMatrixRef<std::uint32_t>> head_pairs;
          if (pairs) head_pairs.emplace(head(value_pairs, n, key_pairs, p.value_dim));
          const auto tile = [&](auto head_out, VectorRef<T> lse) {
            blocked_query_tile<T, S, typename decltype(head_out)::Scalar>(
                head(q, n, p.queries, p.key_dim), head(k, n, p.keys, p.key_dim), head(v, n, p.keys, p.value_dim),
                score, bound[std::size_t(n)], tiles, q0, rows, head_out, lse, scratch.blocked,
                head_pairs ? &*head_pairs : nullptr);
          };
          MatrixRef<S> head_out = head(out, n, p.queries, p.value_dim);
          if (!sunk) {
            tile(head_out, no_vector<T>());
          } else if constexpr (std::is_same_v<S, T>) {
            tile(head_out, scratch.lse);
            merge_sink_into<T>(head_out.middleRows(q0, rows), scratch.lse.segment(q0, rows), sink_of(n));
          } else {  // merged in T, rounded once
            tile(MatrixRef<T>(scratch.out), scratch.lse);
            merge_sink_into<T>(scratch.out.middleRows(q0, rows), scratch.lse.segment(q0, rows), sink_of(n));
            head_out.middleRows(q0, rows) = scratch.out.middleRows(q0, rows).template cast<S>();
          }
        });
  } else {
    struct Scratch {
      Matrix<T> weights;  // (Lq, Lk) scores of one head
      Vector<T> lse;      // (Lq) with sinks
    };
    parallel_for_with_scratch(
        num_heads, [&] { return Scratch{Matrix<T>(p.queries, p.keys), Vector<T>(sunk ? p.queries : 0)}; },
        [&](Index n, Scratch& scratch) {
          const VectorRef<T> lse = sunk ? VectorRef<T>(scratch.lse) : no_vector<T>();
          if constexpr (std::is_same_v<S, T>) {
            MatrixRef<T> head_out = head(out, n, p.queries, p.value_dim);
            materialized_attention<T>(head(q, n, p.queries, p.key_dim), head(k, n, p.keys, p.key_dim),
                                      head(v, n, p.keys, p.value_dim), score, bound[std::size_t(n)], head_out, lse,
                                      scratch.weights);
            if (sunk) merge_sink_into<T>(head_out, lse, sink_of(n));
          } else {
            Matrix<T> out_full(p.queries, p.value_dim);
            materialized_attention<T>(head(q, n, p.queries, p.key_dim).template cast<T>(),
                                      head(k, n, p.keys, p.key_dim).template cast<T>(),
                                      head(v, n, p.keys, p.value_dim).template cast<T>(), score,
                                      bound[std::size_t(n)], out_full, lse, scratch.weights);
            if (sunk) merge_sink_into<T>(out_full, lse, sink_of(n));
            head(out, n, p.queries, p.value_dim) = out_full.template cast<S>();
          }
        });
  }
}

}  // namespace detail

/// Writes the attention of every (sequence, head) into `out` (B*Lq, H*Dv); see the file
/// comment for the layout. The mask (shaped (Lq, Lk) of one head) and the options apply to
/// every head; the default scale is 1/sqrt(Dk) with Dk = q.cols() / H.
///
/// \param q      (B*Lq, H*Dk) queries, any Eigen expression
/// \param k      (B*Lk, H*Dk) keys
/// \param v      (B*Lk, H*Dv) values
/// \param out    (B*Lq, H*Dv) output; may be a block of a larger row-major matrix, not sharing
///               memory with q, k or v
/// \param layout number of heads H and of sequences B
/// \param mask   mask policy for each head (default: none)
/// \param options scale, algorithm (chosen by one head's Lq x Lk), tile sizes
/// \param sinks  (H) learned sink logits, head h's for head h of every sequence (attention/sinks.hpp),
///               or empty: none
/// \throws attend::invalid_argument when a dimension is not divisible by H or B, shapes
///         mismatch, the mask, window or tile sizes are invalid, sinks are neither empty nor H,
///         or `out` aliases an input.
template <class DQ, class DK, class DV, class Mask = NoMask>
void batched_attention_into(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                            const Eigen::MatrixBase<DV>& v, MatrixRef<typename DQ::Scalar> out,
                            const BatchLayout& layout, const MaskBase<Mask>& mask = NoMask{},
                            const AttentionOptions& options = {},
                            const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  using S = typename DQ::Scalar;
  const ConstMatrixRef<S> q_ref(q), k_ref(k), v_ref(v);
  detail::batched_attention_into<S>(q_ref, k_ref, v_ref, mask, options, layout, out, sinks);
}

/// Returns the attention of every (sequence, head), shape (B*Lq, H*Dv). See
/// batched_attention_into.
template <class DQ, class DK, class DV, class Mask = NoMask>
Matrix<typename DQ::Scalar> batched_attention(
    const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
    const BatchLayout& layout, const MaskBase<Mask>& mask = NoMask{}, const AttentionOptions& options = {},
    const Eigen::Ref<const Vector<typename DQ::Scalar>>& sinks = Vector<typename DQ::Scalar>()) {
  static_assert(detail::supported_scalars<DQ, DK, DV>);
  detail::check_qkv(q, k, v);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  batched_attention_into(q, k, v, out, layout, mask, options, sinks);
  return out;
}

}  // namespace attend
