// SPDX-License-Identifier: MIT
// Every public entry point of attend as a callable over (q, k, v), so that the invariance tests
// (views, aliasing, threads) iterate over one list. Each entry says the shapes it is called on,
// writes its results into caller-owned views, and says how it treats an output that aliases an
// input.
#pragma once

#include "random.hpp"

#include <attend/attend.hpp>

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace attend::test {

/// Base sizes of the problems the entries run on. Each entry derives its own shapes from them
/// (heads side by side, a batch of sequences stacked along rows, ...).
struct EntrySizes {
  Index lq;   // queries per sequence
  Index lk;   // keys per sequence (lk > lq: decoding prefills lk - lq keys first)
  Index d;    // head dimension of q and k (even, >= 4)
  Index dv;   // head dimension of v
  AttentionOptions blocked;  // the blocked path with the tiles to use (no scale: cosine and additive refuse one)
};

/// Shapes of one entry: q (lq, q_cols), k (lk, k_cols), v (lk, v_cols); it writes an output
/// (lq, out_cols), a log-sum-exp (lse_size) and weights (lq, weight_cols) when those are non-zero.
struct Problem {
  Index lq, lk, q_cols, k_cols, v_cols, out_cols;
  Index lse_size = 0;
  Index weight_cols = 0;
};

/// Caller-owned views an entry writes into.
template <class T>
struct OutputViews {
  MatrixRef<T> out;      // (lq, out_cols)
  VectorRef<T> lse;      // (lse_size), empty when the entry has none
  MatrixRef<T> weights;  // (lq, weight_cols), empty when the entry has none
};

/// What an `_into` entry does when its output aliases an input: throw, or read only a copy of
/// that input (bilinear's Q W, cosine's normalized rows, additive's projections).
enum class Alias { Rejected, Handled };

/// One entry point. `run(q, k, v, OutputViews<T>)` takes q, k and v as any Eigen expressions.
template <class Run>
struct EntryPoint {
  std::string name;
  Problem problem;
  /// q, k and v reach the library as given (false when the entry copies them itself first, so
  /// input layouts are not what it tests).
  bool takes_views;
  /// Set when `run` passes q, k, v and the output views straight to one writing call: how that
  /// call treats an output aliasing q, k and v.
  std::optional<std::array<Alias, 3>> aliasing;
  Run run;
};

template <class Run>
EntryPoint(std::string, Problem, bool, std::optional<std::array<Alias, 3>>, Run) -> EntryPoint<Run>;

inline constexpr std::array<Alias, 3> kRejectsAll{Alias::Rejected, Alias::Rejected, Alias::Rejected};
inline constexpr const char* kInputNames[3] = {"q", "k", "v"};

/// The results of one run, in contiguous storage.
template <class T>
struct Results {
  Matrix<T> out;
  Vector<T> lse;
  Matrix<T> weights;

  explicit Results(const Problem& p) : out(p.lq, p.out_cols), lse(p.lse_size), weights(p.lq, p.weight_cols) {}
  OutputViews<T> views() { return {out, lse, weights}; }
};

/// Inputs of one problem, drawn from N(0, 1).
template <class T>
struct Inputs {
  Matrix<T> q, k, v;
};

template <class T>
Inputs<T> draw_inputs(const Problem& p, Rng& rng) {
  return {rng.normal<T>(p.lq, p.q_cols), rng.normal<T>(p.lk, p.k_cols), rng.normal<T>(p.lk, p.v_cols)};
}

/// Runs `entry` on the given input views into fresh outputs.
template <class T, class Entry, class Q, class K, class V>
Results<T> run_entry(const Entry& entry, const Q& q, const K& k, const V& v) {
  Results<T> r(entry.problem);
  entry.run(q, k, v, r.views());
  return r;
}

/// Bitwise equality of every result.
template <class T>
::testing::AssertionResult identical_results(const Results<T>& a, const Results<T>& b) {
  const auto same = [](const auto& x, const auto& y) {
    return x.rows() == y.rows() && x.cols() == y.cols() &&
           (x.size() == 0 || std::memcmp(x.data(), y.data(), sizeof(T) * std::size_t(x.size())) == 0);
  };
  if (!same(a.out, b.out)) return ::testing::AssertionFailure() << "outputs differ";
  if (!same(a.lse, b.lse)) return ::testing::AssertionFailure() << "log-sum-exps differ";
  if (!same(a.weights, b.weights)) return ::testing::AssertionFailure() << "weights differ";
  return ::testing::AssertionSuccess();
}

/// The guard against vacuous comparisons: outputs are finite and at least half of the output
/// rows are not all zero (no entry's problem is meant to hide most rows).
template <class T>
::testing::AssertionResult informative(const Results<T>& r) {
  if (!r.out.allFinite() || !r.lse.allFinite() || !r.weights.allFinite())
    return ::testing::AssertionFailure() << "non-finite results";
  Index zero_rows = 0;
  for (Index i = 0; i < r.out.rows(); ++i) zero_rows += r.out.row(i).isZero(0) ? 1 : 0;
  if (2 * zero_rows > r.out.rows())
    return ::testing::AssertionFailure() << zero_rows << " of " << r.out.rows() << " output rows are zero";
  return ::testing::AssertionSuccess();
}

/// The table of entry points for scalar T. It owns the parameters (weights, masks, tables) the
/// entries need, drawn once; `for_each(visit)` calls visit(entry) for every entry.
template <class T>
class EntryPoints {
 public:
  EntryPoints(const EntrySizes& sizes, Rng& rng)
      : s_(sizes),
        bilinear_w_(rng.normal<T>(sizes.d, sizes.d)),
        additive_(rng.normal<T>(kHidden, sizes.d), rng.normal<T>(kHidden, sizes.d), rng.normal<T>(kHidden, 1),
                  rng.normal<T>(kHidden, 1)),
        bias_(rng.normal<T>(sizes.lq, sizes.lk, 3.0)),
        visible_(rng.bernoulli(sizes.lq, sizes.lk, 0.8)),
        relative_table_(rng.normal<T>(32, 1)),
        mha_(kHeads,
             {rng.normal<T>(kHeads * kHeadDim, sizes.d), rng.normal<T>(kKvHeads * kHeadDim, sizes.d),
              rng.normal<T>(kKvHeads * kHeadDim, sizes.d), rng.normal<T>(sizes.d, kHeads * kHeadDim),
              rng.normal<T>(kHeads * kHeadDim, 1), rng.normal<T>(kKvHeads * kHeadDim, 1),
              rng.normal<T>(kKvHeads * kHeadDim, 1), rng.normal<T>(sizes.d, 1)},
             kKvHeads),
        rope_(kHeadDim, rotary_options()) {}

  EntryPoints(const EntryPoints&) = delete;
  EntryPoints& operator=(const EntryPoints&) = delete;

  template <class Visit>
  void for_each(Visit&& visit) const {
    const Index lq = s_.lq, lk = s_.lk, d = s_.d, dv = s_.dv;
    const AttentionOptions& blocked = s_.blocked;
    AttentionOptions materialized = blocked;
    materialized.algorithm = Algorithm::Materialized;
    const Problem head{lq, lk, d, d, dv, dv};
    const Problem head_lse{lq, lk, d, d, dv, dv, lq};
    const Problem multi_head{lq, lk, kHeads * kHeadDim, kKvHeads * kHeadDim, kKvHeads * kValueDim,
                             kHeads * kValueDim};
    const Problem embedded{lq, lk, d, d, d, d};  // MultiHeadAttention: every width is the model width d
    const Problem decode{1, lk, kHeads * kHeadDim, kKvHeads * kHeadDim, kKvHeads * kValueDim, kHeads * kValueDim,
                         kHeads};
    // In-place entries work on (kInPlaceRows lq, ...) copies of q: enough elements for the
    // threads test to cross the in-place parallel thresholds (4096 and 65536 elements).
    const Index rows = kInPlaceRows * lq;
    const Problem in_place{rows, lk, kHeads * kHeadDim, d, dv, kHeads * kHeadDim};
    const Problem in_place_lse{rows, lk, kHeads * kHeadDim, d, dv, kHeads * kHeadDim, rows};
    const std::optional<std::array<Alias, 3>> composite;  // not a single writing call

    // Scaled dot-product attention on both paths, with every mask kind and bias.
    visit(EntryPoint{"scaled_dot_product_attention (Materialized, Causal BottomRight)", head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       o.out = scaled_dot_product_attention(q, k, v, Causal(Alignment::BottomRight), materialized);
                     }});
    visit(EntryPoint{"scaled_dot_product_attention (Blocked, Causal BottomRight)", head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       o.out = scaled_dot_product_attention(q, k, v, Causal(Alignment::BottomRight), blocked);
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_into (Blocked, AdditiveMask)", head_lse, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       scaled_dot_product_attention_into(q, k, v, o.out, AdditiveMask(bias_), blocked, o.lse);
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_into (Materialized, BooleanMask & Window)", head_lse, true,
                     kRejectsAll, [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       scaled_dot_product_attention_into(q, k, v, o.out,
                                                         BooleanMask(visible_) & Window(20, 20, Alignment::BottomRight),
                                                         materialized, o.lse);
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_with_lse (Blocked, KeyPadding)", head_lse, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       const AttentionResult<T> r =
                           scaled_dot_product_attention_with_lse(q, k, v, KeyPadding(lk - 3), blocked);
                       o.out = r.output;
                       o.lse = r.lse;
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_with_lse (Materialized, Window)", head_lse, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       const AttentionResult<T> r = scaled_dot_product_attention_with_lse(
                           q, k, v, Window(10, 3, Alignment::BottomRight), materialized);
                       o.out = r.output;
                       o.lse = r.lse;
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_with_weights (Causal BottomRight)", Problem{lq, lk, d, d, dv, dv, lq, lk},
                     true, composite, [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       const AttentionResult<T> r =
                           scaled_dot_product_attention_with_weights(q, k, v, Causal(Alignment::BottomRight));
                       o.out = r.output;
                       o.lse = r.lse;
                       o.weights = r.weights;
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_into (Blocked, Causal & ALiBi)", head, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       scaled_dot_product_attention_into(
                           q, k, v, o.out, Causal(Alignment::BottomRight) & Alibi(0.25, Alignment::BottomRight), blocked);
                     }});
    visit(EntryPoint{"scaled_dot_product_attention_into (Materialized, RelativePositionBias)", head, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       scaled_dot_product_attention_into(q, k, v, o.out, RelativePositionBias(relative_table_, true, 40),
                                                         materialized);
                     }});

    // The dot-product family, soft-capping, top-k, local windows and additive attention.
    visit(EntryPoint{"dot_product_attention_into (Blocked)", head_lse, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       dot_product_attention_into(q, k, v, o.out, NoMask{}, blocked, o.lse);
                     }});
    visit(EntryPoint{"bilinear_attention_into (Blocked)", head, true,
                     std::array<Alias, 3>{Alias::Handled, Alias::Rejected, Alias::Rejected},
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       bilinear_attention_into(q, k, v, bilinear_w_, o.out, NoMask{}, blocked);
                     }});
    visit(EntryPoint{"cosine_attention_into (Materialized)", head, true,
                     std::array<Alias, 3>{Alias::Handled, Alias::Handled, Alias::Rejected},
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       cosine_attention_into(q, k, v, 0.1, o.out, NoMask{}, materialized);
                     }});
    visit(EntryPoint{"soft_capped_attention_into (Blocked, Causal BottomRight)", head_lse, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       soft_capped_attention_into(q, k, v, 2.0, o.out, Causal(Alignment::BottomRight), blocked, o.lse);
                     }});
    visit(EntryPoint{"soft_capped_attention (Materialized)", head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       o.out = soft_capped_attention(q, k, v, 2.0, NoMask{}, materialized);
                     }});
    visit(EntryPoint{"top_k_attention_into (k = 5, Window)", head_lse, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       top_k_attention_into(q, k, v, 5, o.out, Window(30, 10, Alignment::BottomRight), blocked, o.lse);
                     }});
    visit(EntryPoint{"hard_attention", head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       o.out = hard_attention(q, k, v, NoMask{}, blocked);
                     }});
    visit(EntryPoint{"local_window_attention_into (Window(4, 2, BottomRight))", head_lse, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       local_window_attention_into(q, k, v, Window(4, 2, Alignment::BottomRight), o.out, NoMask{}, {},
                                                   o.lse);
                     }});
    visit(EntryPoint{"AdditiveAttention::forward_into (Blocked, Causal BottomRight)", head_lse, true,
                     std::array<Alias, 3>{Alias::Handled, Alias::Handled, Alias::Rejected},
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       additive_.forward_into(q, k, v, o.out, Causal(Alignment::BottomRight), blocked, o.lse);
                     }});
    visit(EntryPoint{"AdditiveAttention::forward_with_weights", Problem{lq, lk, d, d, dv, dv, lq, lk}, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       const AttentionResult<T> r = additive_.forward_with_weights(q, k, v);
                       o.out = r.output;
                       o.lse = r.lse;
                       o.weights = r.weights;
                     }});

    // Batches, heads and GQA.
    const BatchLayout batch{kHeads, kBatch};
    visit(EntryPoint{"batched_attention_into (B = 2, H = 4, Blocked, Causal BottomRight)",
                     Problem{kBatch * lq, kBatch * lk, kHeads * d, kHeads * d, kHeads * dv, kHeads * dv}, true,
                     kRejectsAll, [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       batched_attention_into(q, k, v, o.out, batch, Causal(Alignment::BottomRight), blocked);
                     }});
    visit(EntryPoint{"batched_attention (B = 2, H = 4, Materialized)",
                     Problem{kBatch * lq, kBatch * lk, kHeads * d, kHeads * d, kHeads * dv, kHeads * dv}, true,
                     composite, [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       o.out = batched_attention(q, k, v, batch, NoMask{}, materialized);
                     }});
    visit(EntryPoint{"multi_head_attention_into (H = 4, H_kv = 2, Blocked)", multi_head, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       multi_head_attention_into(q, k, v, kHeads, o.out, Window(25, 0, Alignment::BottomRight),
                                                 blocked);
                     }});
    visit(EntryPoint{"MultiHeadAttention::forward (self, GQA, Causal)", embedded, true, composite,
                     [&](const auto& q, const auto&, const auto&, OutputViews<T> o) {
                       o.out = mha_.forward(q, Causal(), mha_options(blocked)).output;
                     }});
    visit(EntryPoint{"MultiHeadAttention::forward (cross, GQA)", embedded, true, composite,
                     [&](const auto& q, const auto& k, const auto&, OutputViews<T> o) {
                       o.out = mha_.forward(q, k, NoMask{}, mha_options(blocked)).output;
                     }});
    visit(EntryPoint{"MultiHeadAttention::forward (q, k, v, GQA, averaged weights)",
                     Problem{lq, lk, d, d, d, d, 0, lk}, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       MultiHeadOptions options = mha_options(materialized);
                       options.need_weights = NeedWeights::Averaged;
                       const MultiHeadResult<T> r = mha_.forward(q, k, v, NoMask{}, options);
                       o.out = r.output;
                       o.weights = r.weights.at(0);
                     }});
    visit(EntryPoint{"MultiHeadAttention::forward_batch (two sequences, key padding)", embedded, false, composite,
                     [&](const auto& q, const auto& k, const auto&, OutputViews<T> o) {
                       const Index a = lq / 3, b = lk / 2;
                       const std::vector<Matrix<T>> queries{q.topRows(a), q.bottomRows(lq - a)};
                       const std::vector<Matrix<T>> memories{k.topRows(b), k.bottomRows(lk - b)};
                       const std::vector<Matrix<T>> outs =
                           mha_.forward_batch(queries, memories, NoMask{}, {b - 2, lk - b}, blocked);
                       o.out.topRows(a) = outs.at(0);
                       o.out.bottomRows(lq - a) = outs.at(1);
                     }});

    // Decoding: the split-KV kernel, the KV cache, partials and their merge.
    visit(EntryPoint{"decode_attention_into (split-KV, GQA)", decode, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       decode_attention_into(q, k, v, kHeads, o.out, blocked, o.lse);
                     }});
    visit(EntryPoint{"KVCache + decode_step_into (one token, default splits)", Problem{1, lk, decode.q_cols,
                     decode.k_cols, decode.v_cols, decode.out_cols}, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       KVCache<T> cache(lk, kKvHeads, kHeadDim, cache_options(-1));
                       cache.append(k.topRows(lk - 1), v.topRows(lk - 1));
                       decode_step_into(cache, q, k.bottomRows(1), v.bottomRows(1), kHeads, o.out);
                     }});
    visit(EntryPoint{"KVCache (window) + decode_step_into (prefill chunk)", multi_head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       KVCache<T> cache(lk, kKvHeads, kHeadDim, cache_options(lk / 3));
                       cache.append(k.topRows(lk - lq), v.topRows(lk - lq));
                       decode_step_into(cache, q, k.bottomRows(lq), v.bottomRows(lq), kHeads, o.out, blocked);
                     }});
    visit(EntryPoint{"PagedKVCache + paged_decode_step_into (a chunk and two tokens)", multi_head, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       PagedKVCache<T> cache(lk / 16 + 8, kKvHeads, kHeadDim, {16, -1, kValueDim});
                       const Index prefix = lk - lq, a = prefix / 2, b = prefix / 4;
                       const std::vector<Index> ids{cache.add_sequence(), cache.add_sequence(), cache.add_sequence()};
                       cache.append(ids[0], k.topRows(a), v.topRows(a));
                       cache.append(ids[1], k.middleRows(a, b), v.middleRows(a, b));
                       cache.append(ids[2], k.middleRows(a + b, prefix - a - b), v.middleRows(a + b, prefix - a - b));
                       const auto split = SequenceRows::packed(std::vector<Index>{0, lq - 2, lq - 1, lq});
                       paged_decode_step_into(cache, ids, split, q, k.bottomRows(lq), v.bottomRows(lq), kHeads, o.out,
                                              NoMask{}, blocked);
                     }});
    visit(EntryPoint{"multi_head_attention_with_sinks_into (GQA)", multi_head, true, kRejectsAll,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       multi_head_attention_with_sinks_into(q, k, v, kHeads, o.out, Causal(Alignment::BottomRight),
                                                            Vector<T>::LinSpaced(kHeads, T(-1), T(2)), blocked);
                     }});
    visit(EntryPoint{"split-KV partials + merge_partial_into", head_lse, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       const Index m = lk / 3;
                       const AttentionResult<T> rest =
                           scaled_dot_product_attention_with_lse(q, k.bottomRows(lk - m), v.bottomRows(lk - m), NoMask{},
                                                                 blocked);
                       scaled_dot_product_attention_into(q, k.topRows(m), v.topRows(m), o.out, NoMask{}, materialized,
                                                         o.lse);
                       merge_partial_into<T>(o.out, o.lse, rest.output, rest.lse);
                     }});
    visit(EntryPoint{"merge_partials (three chunks)", head_lse, true, composite,
                     [&](const auto& q, const auto& k, const auto& v, OutputViews<T> o) {
                       std::vector<AttentionResult<T>> partials;
                       for (Index c = 0; c < 3; ++c) {
                         const Index begin = c * lk / 3, end = (c + 1) * lk / 3;
                         partials.push_back(scaled_dot_product_attention_with_lse(
                             q, k.middleRows(begin, end - begin), v.middleRows(begin, end - begin), NoMask{}, blocked));
                       }
                       const AttentionResult<T> merged = merge_partials(partials);
                       o.out = merged.output;
                       o.lse = merged.lse;
                     }});

    // In-place APIs: the output view starts as a copy of q and is transformed in place.
    visit(EntryPoint{"softmax_rows_inplace", in_place_lse, false, composite,
                     [&](const auto& q, const auto&, const auto&, OutputViews<T> o) {
                       o.out = q;
                       o.out.col(1).setConstant(-std::numeric_limits<T>::infinity());  // a masked key
                       softmax_rows_inplace<T>(o.out, o.lse);
                     }});
    visit(EntryPoint{"add_sinusoidal_encoding (offset 7)", in_place, false, composite,
                     [&](const auto& q, const auto&, const auto&, OutputViews<T> o) {
                       o.out = q;
                       add_sinusoidal_encoding<T>(o.out, 7);
                     }});
    visit(EntryPoint{"RotaryEmbedding::apply (HalfSplit, partial, offset 5)", in_place, false, composite,
                     [&](const auto& q, const auto&, const auto&, OutputViews<T> o) {
                       o.out = q;
                       rope_.apply(o.out, 5);
                     }});
    visit(EntryPoint{"RotaryEmbedding::apply (positions past the cache)", in_place, false, composite,
                     [&](const auto& q, const auto&, const auto&, OutputViews<T> o) {
                       o.out = q;
                       Vector<Index> positions(o.out.rows());
                       for (Index r = 0; r < positions.size(); ++r) positions(r) = 9000 + 3 * r;
                       rope_.apply(o.out, positions);
                     }});
  }

 private:
  static constexpr Index kHidden = 8;     // additive attention's hidden size
  static constexpr Index kHeads = 4;      // query heads
  static constexpr Index kKvHeads = 2;    // key/value heads (GQA)
  static constexpr Index kHeadDim = 6;    // per-head width of q and k in the multi-head entries
  static constexpr Index kValueDim = 5;   // per-head width of v there
  static constexpr Index kBatch = 2;      // sequences of the batched entries
  static constexpr Index kInPlaceRows = 20;

  static MultiHeadOptions mha_options(const AttentionOptions& base) {
    MultiHeadOptions options;
    static_cast<AttentionOptions&>(options) = base;
    return options;
  }
  static KVCacheOptions cache_options(Index window) {
    KVCacheOptions options;
    options.window = window;
    options.value_head_dim = kValueDim;
    return options;
  }
  static RotaryOptions rotary_options() {
    RotaryOptions options;
    options.rotary_dim = 4;
    options.cache_length = 64;
    return options;
  }

  EntrySizes s_;
  Matrix<T> bilinear_w_;         // (d, d)
  AdditiveAttention<T> additive_;
  Matrix<T> bias_;               // (lq, lk)
  BoolMatrix visible_;           // (lq, lk)
  Matrix<T> relative_table_;     // (32 buckets, 1 head)
  MultiHeadAttention<T> mha_;    // E = d, H = 4, H_kv = 2, head dim 6
  RotaryEmbedding<T> rope_;      // head dim 6, rotary dim 4
};

}  // namespace attend::test
