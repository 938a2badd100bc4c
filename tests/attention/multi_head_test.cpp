// SPDX-License-Identifier: MIT
// Multi-head self and cross attention with projections, GQA/MQA, need_weights and the batch API,
// against a long-double reference written here from the definition (project, per-head reference
// attention, concatenate, out-project), which is what torch.nn.MultiheadAttention computes.
#include <attend/attention/batched.hpp>
#include <attend/attention/kv_cache.hpp>
#include <attend/attention/multi_head.hpp>
#include <attend/biases.hpp>

#include "support/expect.hpp"
#include "support/head_policy_reference.hpp"
#include "support/baseline.hpp"
#include "support/masks.hpp"
#include "support/multi_head_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/scalars.hpp"
#include "support/sinks_reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace attend::test {
namespace {

using attend::test::expect_invalid;

template <class T>
MultiHeadOptions path(Algorithm algorithm, Index block_q = 0, Index block_k = 0) {
  MultiHeadOptions o;
  o.algorithm = algorithm;
  o.block_q = block_q;
  o.block_k = block_k;
  return o;
}

template <class T>
class MultiHeadTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(MultiHeadTest, Scalars);

TYPED_TEST(MultiHeadTest, SelfAttentionMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 37;
  for (const Index heads : {1, 2, 3, 8}) {
    const Index d = heads == 8 ? 8 : 16, e = heads * d;
    const Shape s{heads, heads, d, d, e, e, e, e, heads % 2 == 1};
    SCOPED_TRACE(describe(s));
    const MultiHeadAttention<T> mha(heads, random_weights<T>(s, rng));
    const Matrix<T> x = rng.normal<T>(len, e);
    for (const bool causal : {false, true}) {
      SCOPED_TRACE(causal ? "causal" : "no mask");
      const BoolMatrix visible =
          causal ? causal_visibility(len, len, Alignment::TopLeft) : all_visible(len, len);
      const Expected<T> ex = expected_mha<T>(s, mha.weights(), x, x, x, visible);
      for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 16, 8)}) {
        const Matrix<T> out = causal ? mha.forward(x, Causal(), o).output : mha.forward(x, NoMask{}, o).output;
        EXPECT_TRUE(within_tolerance<T>(out, ex.output, ex.base_output));
      }
    }
  }
}

// Rotary positions: query row i and key row j turned by the angles of positions i and j, in
// both layouts, full and partial rotary, with grouped-query heads.
TYPED_TEST(MultiHeadTest, RotaryRotatesQueriesAndKeysByPosition) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 29;
  const Shape s{6, 2, 8, 8, 24, 24, 24, 24, true};
  for (const RotaryLayout layout : {RotaryLayout::HalfSplit, RotaryLayout::Interleaved}) {
    for (const Index rotary_dim : {8, 6}) {
      SCOPED_TRACE(std::string(layout == RotaryLayout::HalfSplit ? "half-split" : "interleaved") +
                   " rotary_dim=" + std::to_string(rotary_dim));
      const RotarySpec rotary{s.d, rotary_dim, layout, 100.0};  // fast-turning pairs: many turns by row 28
      MultiHeadAttention<T> mha(s.heads, random_weights<T>(s, rng), s.kv_heads);
      const Matrix<T> x = rng.normal<T>(len, s.eq);
      const Matrix<T> plain = mha.forward(x, Causal()).output;
      mha.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
      ASSERT_NE(mha.rotary(), nullptr);
      const Expected<T> ex =
          expected_mha<T>(s, mha.weights(), x, x, x, causal_visibility(len, len, Alignment::TopLeft), &rotary);
      for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 16, 8)}) {
        const Matrix<T> out = mha.forward(x, Causal(), o).output;
        EXPECT_TRUE(within_tolerance<T>(out, ex.output, ex.base_output));
        // Row 0 sits at position 0, where the rotation is the identity; later rows moved.
        EXPECT_LE(max_abs_error(out.row(0), plain.row(0)), 64 * std::numeric_limits<T>::epsilon());
        EXPECT_GT(max_abs_error(out.bottomRows(len - 1), plain.bottomRows(len - 1)), 1e-2);
      }
    }
  }
}

// YaRN with partial rotary against Hugging Face transformers (cos and sin multiplied by the
// attention factor m, only the first rotary_dim features rotated, attention scale 1/sqrt(d)),
// through forward and through decode_step token by token, with the default options: the layer
// applies m itself. With partial rotary no attention scale gives this: m^2 multiplies only the
// rotated features' part of each logit.
TYPED_TEST(MultiHeadTest, YarnRotaryMatchesHuggingFaceWithPartialRotary) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 40;
  const Shape s{4, 2, 16, 16, 48, 48, 48, 48, true};
  const HfYarnConfig yarn{16, 8, 32, 1, std::nullopt};  // m = 0.1 ln 16 + 1 = 1.277; N = 8 < len
  const HfYarnConfig yarn_without_factor{16, 8, 32, 1, 1.0L};
  for (const Index rotary_dim : {8, 16}) {
    SCOPED_TRACE("rotary_dim=" + std::to_string(rotary_dim));
    const RotarySpec rotary{s.d, rotary_dim, RotaryLayout::HalfSplit, 100.0, yarn};
    MultiHeadAttention<T> mha(s.heads, random_weights<T>(s, rng), s.kv_heads);
    mha.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
    const Matrix<T> x = rng.normal<T>(len, s.eq);
    const BoolMatrix visible = causal_visibility(len, len, Alignment::TopLeft);
    const Expected<T> ex = expected_mha<T>(s, mha.weights(), x, x, x, visible, &rotary);
    // The factor moves the result well beyond the tolerance (so this test sees it).
    const RotarySpec unscaled{s.d, rotary_dim, RotaryLayout::HalfSplit, 100.0, yarn_without_factor};
    EXPECT_GT(max_abs_error(ex.output, expected_mha<T>(s, mha.weights(), x, x, x, visible, &unscaled).output), 1e-2);
    for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 16, 8)})
      EXPECT_TRUE(within_tolerance<T>(mha.forward(x, Causal(), o).output, ex.output, ex.base_output));
    KVCache<T> cache(mha, len);
    Matrix<T> decoded(len, s.eout);
    for (Index t = 0; t < len; ++t) decoded.row(t) = decode_step(mha, cache, x.row(t));
    EXPECT_TRUE(within_tolerance<T>(decoded, ex.output, ex.base_output)) << "decode_step";
  }
}

TYPED_TEST(MultiHeadTest, CrossAttentionWithDifferentLengthsAndWidths) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{3, 3, 8, 5, 24, 20, 12, 17, true};
  SCOPED_TRACE(describe(s));
  const MultiHeadAttention<T> mha(3, random_weights<T>(s, rng));
  EXPECT_EQ(mha.head_dim(), 8);
  EXPECT_EQ(mha.value_head_dim(), 5);
  EXPECT_EQ(mha.key_width(), 20);
  EXPECT_EQ(mha.value_width(), 12);
  const Index lq = 13, lk = 29, valid = 19;
  const Matrix<T> query = rng.normal<T>(lq, s.eq), key = rng.normal<T>(lk, s.ek), value = rng.normal<T>(lk, s.ev);
  const Expected<T> ex = expected_mha<T>(s, mha.weights(), query, key, value, padding_visibility(lq, lk, valid));
  const MultiHeadResult<T> r = mha.forward(query, key, value, KeyPadding(valid));
  EXPECT_EQ(r.output.rows(), lq);
  EXPECT_EQ(r.output.cols(), s.eout);
  EXPECT_TRUE(r.weights.empty());
  EXPECT_TRUE(within_tolerance<T>(r.output, ex.output, ex.base_output));
}

TYPED_TEST(MultiHeadTest, CrossAttentionOverMemoryEqualsKeyEqualsValue) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 4, 6, 6, 24, 10, 10, 24, true};
  const MultiHeadAttention<T> mha(4, random_weights<T>(s, rng));
  const Matrix<T> x = rng.normal<T>(9, s.eq), memory = rng.normal<T>(21, s.ek);
  const Matrix<T> cross = mha.forward(x, memory).output;
  EXPECT_EQ(cross, mha.forward(x, memory, memory).output);
  const Expected<T> ex = expected_mha<T>(s, mha.weights(), x, memory, memory, all_visible(9, 21));
  EXPECT_TRUE(within_tolerance<T>(cross, ex.output, ex.base_output));
}

TYPED_TEST(MultiHeadTest, GroupedAndMultiQueryHeads) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 6, len = 31;
  for (const Index kv_heads : {1, 2, 3, 6}) {
    const Shape s{heads, kv_heads, 8, 4, 40, 40, 40, 40, true};
    SCOPED_TRACE(describe(s));
    const MultiHeadAttention<T> mha(heads, random_weights<T>(s, rng), kv_heads);
    EXPECT_EQ(mha.num_kv_heads(), kv_heads);
    const Matrix<T> x = rng.normal<T>(len, s.eq);
    const Expected<T> ex =
        expected_mha<T>(s, mha.weights(), x, x, x, window_visibility(len, len, 5, 0, Alignment::TopLeft));
    for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 8, 4)}) {
      const Matrix<T> out = mha.forward(x, Window(5, 0), o).output;
      EXPECT_TRUE(within_tolerance<T>(out, ex.output, ex.base_output));
    }
  }
}

TYPED_TEST(MultiHeadTest, NeedWeightsPerHeadAndAveraged) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 8, 8, 32, 32, 32, 32, false};
  const MultiHeadAttention<T> mha(4, random_weights<T>(s, rng), 2);
  const Index lq = 11, lk = 15;
  const Matrix<T> x = rng.normal<T>(lq, s.eq), memory = rng.normal<T>(lk, s.ek);
  BoolMatrix visible = rng.bernoulli(lq, lk, 0.7);
  visible.row(3).setConstant(false);  // a query that sees no key: zero output row and weights
  const Expected<T> ex = expected_mha<T>(s, mha.weights(), x, memory, memory, visible);

  MultiHeadOptions per_head;
  per_head.need_weights = NeedWeights::PerHead;
  const MultiHeadResult<T> r = mha.forward(x, memory, BooleanMask(visible), per_head);
  EXPECT_TRUE(within_tolerance<T>(r.output, ex.output, ex.base_output));
  ASSERT_EQ(r.weights.size(), 4u);
  for (std::size_t h = 0; h < 4; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    EXPECT_TRUE(within_tolerance<T>(r.weights[h], ex.weights[h], ex.base_weights[h]));
    EXPECT_TRUE(r.weights[h].row(3).isZero(0));
  }

  MultiHeadOptions averaged;
  averaged.need_weights = NeedWeights::Averaged;
  const MultiHeadResult<T> a = mha.forward(x, memory, BooleanMask(visible), averaged);
  ASSERT_EQ(a.weights.size(), 1u);
  RealMatrix mean = RealMatrix::Zero(lq, lk);
  Matrix<T> base_mean = Matrix<T>::Zero(lq, lk);
  for (std::size_t h = 0; h < 4; ++h) {
    mean += ex.weights[h] / 4;
    base_mean += ex.base_weights[h] / T(4);
  }
  EXPECT_TRUE(within_tolerance<T>(a.weights[0], mean, base_mean));
  EXPECT_EQ(a.output, r.output);
}

TYPED_TEST(MultiHeadTest, PackedPyTorchParametersEqualSeparateWeights) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index e = 24, heads = 4;
  const Matrix<T> in_proj_weight = rng.normal<T>(3 * e, e, 0.2), out_proj_weight = rng.normal<T>(e, e, 0.2);
  const Vector<T> in_proj_bias = rng.normal<T>(3 * e, 1), out_proj_bias = rng.normal<T>(e, 1);
  const MultiHeadAttention<T> packed =
      MultiHeadAttention<T>::from_packed(heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias);
  const MultiHeadWeights<T> separate{in_proj_weight.topRows(e),
                                     in_proj_weight.middleRows(e, e),
                                     in_proj_weight.bottomRows(e),
                                     out_proj_weight,
                                     in_proj_bias.head(e),
                                     in_proj_bias.segment(e, e),
                                     in_proj_bias.tail(e),
                                     out_proj_bias};
  const MultiHeadAttention<T> split(heads, separate);
  const Matrix<T> x = rng.normal<T>(10, e);
  EXPECT_EQ(packed.forward(x, Causal()).output, split.forward(x, Causal()).output);
  const Shape s{heads, heads, e / heads, e / heads, e, e, e, e, true};
  const Expected<T> ex = expected_mha<T>(s, separate, x, x, x, causal_visibility(10, 10, Alignment::TopLeft));
  EXPECT_TRUE(within_tolerance<T>(packed.forward(x, Causal()).output, ex.output, ex.base_output));
}

TYPED_TEST(MultiHeadTest, BatchOfDifferentLengthsWithKeyPadding) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 8, 8, 32, 20, 20, 32, true};
  const MultiHeadAttention<T> mha(4, random_weights<T>(s, rng), 2);
  const std::vector<Index> lq{5, 17, 70}, lk{9, 17, 40}, valid{9, 3, 33};
  std::vector<Matrix<T>> queries, memories;
  for (std::size_t i = 0; i < lq.size(); ++i) {
    queries.push_back(rng.normal<T>(lq[i], s.eq));
    memories.push_back(rng.normal<T>(lk[i], s.ek));
  }
  AttentionOptions blocked;
  blocked.algorithm = Algorithm::Blocked;
  blocked.block_q = 16;
  blocked.block_k = 8;
  const std::vector<Matrix<T>> outs = mha.forward_batch(queries, memories, Causal(Alignment::BottomRight), valid, blocked);
  ASSERT_EQ(outs.size(), lq.size());
  for (std::size_t i = 0; i < lq.size(); ++i) {
    SCOPED_TRACE("sequence " + std::to_string(i));
    BoolMatrix visible = causal_visibility(lq[i], lk[i], Alignment::BottomRight);
    visible = visible.array() && padding_visibility(lq[i], lk[i], valid[i]).array();
    const Expected<T> ex = expected_mha<T>(s, mha.weights(), queries[i], memories[i], memories[i], visible);
    EXPECT_TRUE(within_tolerance<T>(outs[i], ex.output, ex.base_output));
    MultiHeadOptions one;
    static_cast<AttentionOptions&>(one) = blocked;
    EXPECT_EQ(outs[i], mha.forward(queries[i], memories[i], Causal(Alignment::BottomRight) & KeyPadding(valid[i]), one)
                           .output);
  }
}

TYPED_TEST(MultiHeadTest, BatchSelfAttentionWithoutMemories) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{2, 2, 8, 8, 16, 16, 16, 16, false};
  const MultiHeadAttention<T> mha(2, random_weights<T>(s, rng));
  const std::vector<Matrix<T>> xs{rng.normal<T>(1, 16), rng.normal<T>(23, 16)};
  const std::vector<Matrix<T>> outs = mha.forward_batch(xs, {}, Causal());
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const Index len = xs[i].rows();
    const Expected<T> ex = expected_mha<T>(s, mha.weights(), xs[i], xs[i], xs[i],
                                           causal_visibility(len, len, Alignment::TopLeft));
    EXPECT_TRUE(within_tolerance<T>(outs[i], ex.output, ex.base_output));
  }
}

TYPED_TEST(MultiHeadTest, ResultsDoNotDependOnTheThreadCount) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{8, 4, 8, 8, 64, 64, 64, 64, true};
  const MultiHeadAttention<T> mha(8, random_weights<T>(s, rng), 4);
  const std::vector<Matrix<T>> xs{rng.normal<T>(40, 64), rng.normal<T>(7, 64), rng.normal<T>(90, 64)};
  const int saved = omp_get_max_threads();
  std::vector<std::vector<Matrix<T>>> runs;
  for (const int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    std::vector<Matrix<T>> run = mha.forward_batch(xs, {}, Causal());
    run.push_back(mha.forward(xs[2], Window(9, 3)).output);
    runs.push_back(run);
  }
  omp_set_num_threads(saved);
  for (std::size_t r = 1; r < runs.size(); ++r)
    for (std::size_t i = 0; i < runs[0].size(); ++i) EXPECT_EQ(runs[r][i], runs[0][i]) << "threads run " << r;
#endif
}

TYPED_TEST(MultiHeadTest, HeadsAreViewsOfStridedInputs) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  // Projected q, k, v as blocks of one wider packed matrix (a fused QKV projection's output).
  const Index len = 19, heads = 4, kv_heads = 2, d = 8;
  const Matrix<T> qkv = rng.normal<T>(len, (heads + 2 * kv_heads) * d + 3);
  const auto q = qkv.middleCols(0, heads * d);
  const auto k = qkv.middleCols(heads * d, kv_heads * d);
  const auto v = qkv.middleCols((heads + kv_heads) * d, kv_heads * d);
  const Matrix<T> out = multi_head_attention(q, k, v, heads, Causal());
  EXPECT_EQ(out, multi_head_attention(Matrix<T>(q), Matrix<T>(k), Matrix<T>(v), heads, Causal()));
  Matrix<T> wide = Matrix<T>::Zero(len, heads * d + 5);
  multi_head_attention_into(q, k, v, heads, wide.leftCols(heads * d), Causal());
  EXPECT_EQ(Matrix<T>(wide.leftCols(heads * d)), out);
  for (Index h = 0; h < heads; ++h) {
    const Index g = h / 2;
    const BoolMatrix visible = causal_visibility(len, len, Alignment::TopLeft);
    const Reference ref = reference_attention(q.middleCols(h * d, d), k.middleCols(g * d, d), v.middleCols(g * d, d),
                                              1 / std::sqrt(Real(d)), visible);
    const Baseline<T> base = baseline_attention<T>(q.middleCols(h * d, d), k.middleCols(g * d, d),
                                                   v.middleCols(g * d, d), T(1) / std::sqrt(T(d)), visible);
    EXPECT_TRUE(within_tolerance<T>(out.middleCols(h * d, d), ref.output, base.output)) << "head " << h;
  }
}

// Per-head policies through the layer: ALiBi with the standard slopes, a T5 table with a column
// per head and torch-style stacked (H Lq, Lk) boolean and additive masks, with GQA. Each head
// equals the single-head call with that head's policy, bitwise (the same engine on the same
// views), and the long-double reference.
TYPED_TEST(MultiHeadTest, PerHeadPoliciesEqualPerHeadSingleCalls) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, len = 29, e = heads * d, buckets = 16, max_distance = 20;
  const Shape s{heads, kv_heads, d, d, e, e, e, e, true};
  const MultiHeadAttention<T> mha(heads, random_weights<T>(s, rng), kv_heads);
  const Matrix<T> x = rng.normal<T>(len, e);
  const Matrix<T> q = mha.project_query(x), k = mha.project_key(x), v = mha.project_value(x);
  const std::vector<double> slopes = alibi_slopes(heads);
  const Matrix<T> table = rng.normal<T>(buckets, heads);                // (num_buckets, H)
  const BoolMatrix stacked = rng.bernoulli(heads * len, len, 0.8);      // (H Lq, Lk)
  const Matrix<T> additive = rng.normal<T>(heads * len, len, 0.5);      // (H Lq, Lk)
  const Real scale = 1 / std::sqrt(Real(d));
  HeadPolicies expected;
  for (Index h = 0; h < heads; ++h) {
    BoolMatrix visible = causal_visibility(len, len, Alignment::TopLeft);
    RealMatrix bias(len, len);
    for (Index i = 0; i < len; ++i)
      for (Index j = 0; j < len; ++j) {
        visible(i, j) = visible(i, j) && stacked(h * len + i, j);
        bias(i, j) = -Real(slopes[std::size_t(h)]) * Real(std::abs(j - i)) +
                     Real(table(relative_position_bucket(j - i, true, buckets, max_distance), h)) +
                     Real(additive(h * len + i, j));
      }
    expected.visible.push_back(visible);
    expected.bias.push_back(bias);
  }
  for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 8, 8)}) {
    const auto policy = Causal() & Alibi::for_heads(heads) & RelativePositionBias(table, true, max_distance) &
                        BooleanMask(stacked) & AdditiveMask(additive);
    const Matrix<T> out = mha.forward(x, policy, o).output;
    Matrix<T> per_head(len, heads * d);
    for (Index h = 0; h < heads; ++h) {
      const Index g = h / (heads / kv_heads);
      per_head.middleCols(h * d, d) = scaled_dot_product_attention(
          q.middleCols(h * d, d), k.middleCols(g * d, d), v.middleCols(g * d, d),
          Causal() & Alibi(slopes[std::size_t(h)]) & RelativePositionBias(table.col(h), true, max_distance) &
              BooleanMask(stacked.middleRows(h * len, len)) & AdditiveMask(additive.middleRows(h * len, len)),
          o);
    }
    EXPECT_TRUE(identical(out, mha.project_output(per_head)));
    expect_heads_match_reference<T>(q, k, v, heads, per_head, expected, scale);
    const Matrix<T> direct = multi_head_attention(q, k, v, heads, policy, o);
    EXPECT_TRUE(identical(direct, per_head));
  }
}

// A batch: (B H Lq, Lk) masks give each (sequence, head) its own slice.
TYPED_TEST(MultiHeadTest, BatchedCallsTakeASliceOfTheMaskPerSequenceAndHead) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, batch = 3, d = 4, len = 11;
  const Matrix<T> q = rng.normal<T>(batch * len, heads * d), k = rng.normal<T>(batch * len, heads * d),
                  v = rng.normal<T>(batch * len, heads * d);
  const BoolMatrix stacked = rng.bernoulli(batch * heads * len, len, 0.7);  // (B H Lq, Lk)
  for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 4, 4)}) {
    const Matrix<T> out = batched_attention(q, k, v, BatchLayout{heads, batch}, BooleanMask(stacked), o);
    for (Index b = 0; b < batch; ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      HeadPolicies expected;
      for (Index h = 0; h < heads; ++h) expected.visible.push_back(stacked.middleRows((b * heads + h) * len, len));
      expect_heads_match_reference<T>(q.middleRows(b * len, len), k.middleRows(b * len, len),
                                      v.middleRows(b * len, len), heads, out.middleRows(b * len, len), expected,
                                      1 / std::sqrt(Real(d)));
    }
  }
}

// A padded (B L, E) buffer and packed sequences (cu_seqlens), read in place: the layer's batch
// equals the layer on each sequence alone (reference), returns each sequence's weights, and
// zeroes the rows of no sequence; the attention part on projected inputs equals per-sequence
// calls bitwise, with key padding per sequence as lengths of any integer type or torch's
// boolean key_padding_mask.
TYPED_TEST(MultiHeadTest, BatchesReadInPlaceEqualPerSequenceCalls) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 8, e = heads * d, padded = 13;
  const Shape s{heads, kv_heads, d, d, e, e, e, e, true};
  const MultiHeadAttention<T> mha(heads, random_weights<T>(s, rng), kv_heads);
  const std::vector<int> lengths{13, 7, 0, 10};
  const Index batch = Index(lengths.size());
  const Matrix<T> x = rng.normal<T>(batch * padded, e);  // (B L, E), padding rows included
  for (const bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "padded");
    std::vector<unsigned> offsets{0};
    for (const int n : lengths) offsets.push_back(offsets.back() + unsigned(n));
    const SequenceRows rows = packed ? SequenceRows::packed(offsets) : SequenceRows::padded(padded, lengths);
    MultiHeadOptions o = path<T>(Algorithm::Materialized);
    o.need_weights = NeedWeights::PerHead;
    const MultiHeadBatchResult<T> r = mha.forward_batch(x, rows, Causal(), o);
    ASSERT_EQ(r.weights.size(), std::size_t(batch));
    std::vector<bool> used(std::size_t(x.rows()), false);
    for (Index b = 0; b < batch; ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const Index r0 = rows.begin(b), n = rows.length(b);
      for (Index i = r0; i < r0 + n; ++i) used[std::size_t(i)] = true;
      if (n == 0) continue;  // (the reference takes heads of its matrices: none of an empty one)
      const Matrix<T> seq = x.middleRows(r0, n);
      const Expected<T> ex = expected_mha<T>(s, mha.weights(), seq, seq, seq, causal_visibility(n, n, Alignment::TopLeft));
      EXPECT_TRUE(within_tolerance<T>(Matrix<T>(r.output.middleRows(r0, n)), ex.output, ex.base_output));
      ASSERT_EQ(r.weights[std::size_t(b)].size(), std::size_t(heads));
      for (Index h = 0; h < heads; ++h)
        EXPECT_TRUE(within_tolerance<T>(r.weights[std::size_t(b)][std::size_t(h)], ex.weights[std::size_t(h)],
                                        ex.base_weights[std::size_t(h)]));
    }
    for (Index i = 0; i < x.rows(); ++i) {
      if (!used[std::size_t(i)]) {
        EXPECT_TRUE(r.output.row(i).isZero(0)) << "row " << i << " is in no sequence";
      }
    }
    // The attention core on projected inputs: bitwise the per-sequence calls.
    const Matrix<T> q = rng.normal<T>(x.rows(), heads * d), k = rng.normal<T>(x.rows(), kv_heads * d),
                    v = rng.normal<T>(x.rows(), kv_heads * d);
    Matrix<T> out(x.rows(), heads * d);
    multi_head_attention_into(q, k, v, heads, rows, rows, out, Causal() & KeyPadding(std::vector<short>{9, 7, 0, 4}),
                              path<T>(Algorithm::Blocked, 4, 4));
    const std::vector<Index> valid{9, 7, 0, 4};
    for (Index b = 0; b < batch; ++b) {
      const Index r0 = rows.begin(b), n = rows.length(b);
      EXPECT_TRUE(identical(Matrix<T>(out.middleRows(r0, n)),
                            multi_head_attention(q.middleRows(r0, n), k.middleRows(r0, n), v.middleRows(r0, n), heads,
                                                 Causal() & KeyPadding(valid[std::size_t(b)]),
                                                 path<T>(Algorithm::Blocked, 4, 4))))
          << "sequence " << b;
    }
  }
  // The (B L, H d) batched layout with torch's key_padding_mask (true = padding) per sequence.
  const Index len = 9;
  const Matrix<T> q = rng.normal<T>(batch * len, heads * d), k = rng.normal<T>(batch * len, heads * d),
                  v = rng.normal<T>(batch * len, heads * d);
  const BoolMatrix padding = rng.bernoulli(batch, len, 0.3);
  const Matrix<T> out = batched_attention(q, k, v, BatchLayout{heads, batch}, KeyPaddingMask(padding));
  for (Index b = 0; b < batch; ++b) {
    HeadPolicies expected;
    BoolMatrix visible(len, len);
    for (Index i = 0; i < len; ++i)
      for (Index j = 0; j < len; ++j) visible(i, j) = !padding(b, j);
    expected.visible.assign(std::size_t(heads), visible);
    expect_heads_match_reference<T>(q.middleRows(b * len, len), k.middleRows(b * len, len), v.middleRows(b * len, len),
                                    heads, out.middleRows(b * len, len), expected, 1 / std::sqrt(Real(d)));
  }
}

// Learned sinks (gpt-oss) in every forward of a layer: forward (self and cross, both paths,
// with per-head weights that then sum to less than 1), forward_batch of separate sequences and
// forward_batch read in place, against the long-double layer with each head's sink in its
// softmax denominator. Rotary positions and grouped-query heads included.
TYPED_TEST(MultiHeadTest, LearnedSinksInEveryForward) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 8, 8, 32, 32, 32, 24, true};  // (E_k = E_q: self attention too)
  const RotarySpec rotary{s.d, s.d, RotaryLayout::HalfSplit, 100.0};
  MultiHeadAttention<T> mha(s.heads, random_weights<T>(s, rng), s.kv_heads);
  mha.set_rotary(RotaryEmbedding<T>(s.d, rotary.options()));
  Vector<T> sinks(s.heads);
  sinks << T(-1), T(0.5), T(3), -std::numeric_limits<T>::infinity();  // the last: no sink
  const Index lq = 21, lk = 29;
  const Matrix<T> x = rng.normal<T>(lq, s.eq), memory = rng.normal<T>(lk, s.ek);
  BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  visible.row(2).setConstant(false);  // a query that sees no key: zeros (the sink alone)
  const Expected<T> ex = expected_mha_with_sinks<T>(s, mha.weights(), x, memory, memory, visible, sinks, &rotary);
  for (const MultiHeadOptions& o : {path<T>(Algorithm::Materialized), path<T>(Algorithm::Blocked, 8, 8)}) {
    SCOPED_TRACE(o.algorithm == Algorithm::Blocked ? "blocked" : "materialized");
    EXPECT_TRUE(within_tolerance<T>(mha.forward(x, memory, BooleanMask(visible), o, sinks).output, ex.output,
                                    ex.base_output));
    EXPECT_TRUE(within_tolerance<T>(mha.forward(x, memory, memory, BooleanMask(visible), o, sinks).output, ex.output,
                                    ex.base_output));
  }
  MultiHeadOptions per_head;
  per_head.need_weights = NeedWeights::PerHead;
  const MultiHeadResult<T> r = mha.forward(x, memory, BooleanMask(visible), per_head, sinks);
  EXPECT_TRUE(within_tolerance<T>(r.output, ex.output, ex.base_output));
  ASSERT_EQ(r.weights.size(), std::size_t(s.heads));
  for (Index h = 0; h < s.heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    EXPECT_TRUE(within_tolerance<T>(r.weights[std::size_t(h)], ex.weights[std::size_t(h)],
                                    ex.base_weights[std::size_t(h)]));
    for (Index i = 0; i < lq; ++i) {
      const double sum = double(r.weights[std::size_t(h)].row(i).sum());
      if (i == 2) {
        EXPECT_EQ(sum, 0.0);
      } else if (std::isfinite(sinks(h))) {
        EXPECT_LT(sum, 1.0) << "row " << i << ": the sink takes the rest";
      } else {
        EXPECT_NEAR(sum, 1.0, 64 * std::numeric_limits<T>::epsilon()) << "row " << i;
      }
    }
  }
  // Self attention, and batches: separate sequences and one packed matrix.
  const std::vector<Index> lengths{9, 1, 17};
  std::vector<Matrix<T>> xs;
  std::vector<Index> offsets{0};
  for (Index len : lengths) {
    xs.push_back(rng.normal<T>(len, s.eq));
    offsets.push_back(offsets.back() + len);
  }
  Matrix<T> packed(offsets.back(), s.eq);
  for (std::size_t b = 0; b < xs.size(); ++b) packed.middleRows(offsets[b], lengths[b]) = xs[b];
  const AttentionOptions blocked = path<T>(Algorithm::Blocked, 4, 4);
  const std::vector<Matrix<T>> outs = mha.forward_batch(xs, {}, Causal(), std::vector<Index>{}, blocked, sinks);
  const MultiHeadBatchResult<T> in_place = mha.forward_batch(packed, SequenceRows::packed(offsets), Causal(), {}, sinks);
  for (std::size_t b = 0; b < xs.size(); ++b) {
    SCOPED_TRACE("sequence " + std::to_string(b));
    const Index len = lengths[b];
    const Expected<T> e = expected_mha_with_sinks<T>(s, mha.weights(), xs[b], xs[b], xs[b],
                                                     causal_visibility(len, len, Alignment::TopLeft), sinks, &rotary);
    EXPECT_TRUE(within_tolerance<T>(mha.forward(xs[b], Causal(), {}, sinks).output, e.output, e.base_output));
    EXPECT_TRUE(within_tolerance<T>(outs[b], e.output, e.base_output));
    EXPECT_TRUE(within_tolerance<T>(Matrix<T>(in_place.output.middleRows(offsets[b], len)), e.output, e.base_output));
  }
  expect_invalid([&] { mha.forward(x, NoMask{}, {}, Vector<T>(3)); }, {"sinks of size 3", "num_heads = 4"});
}

TEST(MultiHeadErrors, ClearMessagesNamingTheValues) {
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 4, 8, 8, 32, 32, 32, 32, true};
  const MultiHeadWeights<double> good = random_weights<double>(s, rng);
  const Matrix<double> x = rng.normal<double>(5, 32);
  // Input width not divisible by the heads (no projections).
  const Matrix<double> q10 = rng.normal<double>(5, 10);
  expect_invalid([&] { multi_head_attention(q10, q10, q10, 3); }, {"query width 10", "num_heads=3"});
  // Heads not divisible by kv heads.
  expect_invalid([&] { MultiHeadAttention<double>(4, good, 3); }, {"num_heads=4", "num_kv_heads=3"});
  expect_invalid([&] { multi_head_attention(x, x.leftCols(24), x.leftCols(24), 4); },
                 {"num_heads=4", "num_kv_heads=3"});
  // Projected width not divisible by heads.
  expect_invalid([&] { MultiHeadAttention<double>(5, good); }, {"q_proj_weight (32 x 32)", "num_heads=5"});
  // Mismatched weight shapes.
  MultiHeadWeights<double> bad_k = good;
  bad_k.k_proj_weight = rng.normal<double>(24, 32);
  expect_invalid([&] { MultiHeadAttention<double>(4, bad_k); }, {"k_proj_weight (24 x 32)", "4 * 8"});
  MultiHeadWeights<double> bad_o = good;
  bad_o.out_proj_weight = rng.normal<double>(32, 30);
  expect_invalid([&] { MultiHeadAttention<double>(4, bad_o); }, {"out_proj_weight (32 x 30)", "4 * 8"});
  MultiHeadWeights<double> bad_b = good;
  bad_b.v_proj_bias = Vector<double>::Zero(7);
  expect_invalid([&] { MultiHeadAttention<double>(4, bad_b); }, {"v_proj_bias of size 7", "32"});
  // Input width mismatch with the weights.
  const MultiHeadAttention<double> mha(4, good);
  expect_invalid([&] { mha.forward(rng.normal<double>(5, 31)); }, {"q_proj input (5 x 31)", "(32 x 32)"});
  expect_invalid([&] { mha.forward(x, rng.normal<double>(6, 32), rng.normal<double>(7, 32)); },
                 {"key (6 x 32)", "value (7 x 32)"});
  expect_invalid([&] { MultiHeadAttention<double>::from_packed(4, x, {}, x, {}); }, {"in_proj_weight (5 x 32)"});
  expect_invalid([&] { mha.forward_batch({x, x}, {x}); }, {"1 memories for 2"});
  expect_invalid([&] { mha.forward_batch({x}, {}, NoMask{}, std::vector<Index>{6}); }, {"key_valid_lengths[0] = 6", "Lk=5"});
  // Per-head policies that do not fit the heads: one ALiBi slope for four heads names the
  // per-head form; slope and table counts, and stacked masks, must match the heads.
  expect_invalid([&] { mha.forward(x, Causal() & Alibi(0.5)); },
                 {"Alibi(slope) gives one slope to all 4 heads", "Alibi::for_heads(4)"});
  expect_invalid([&] { multi_head_attention(x, x, x, 4, Alibi(0.5)); }, {"one slope to all 4 heads"});
  expect_invalid([&] { mha.forward(x, Alibi::for_heads(3)); }, {"Alibi of 3 slopes in a call of 4 heads"});
  const Matrix<double> table3 = rng.normal<double>(16, 3);
  expect_invalid([&] { mha.forward(x, RelativePositionBias(table3)); }, {"table of 3 heads", "call of 4 heads"});
  const BoolMatrix stacked3 = BoolMatrix::Constant(15, 5, true);
  expect_invalid([&] { mha.forward(x, BooleanMask(stacked3)); }, {"boolean mask of shape (15 x 5)", "(H Lq x Lk) = (20 x 5)"});
  expect_invalid([&] { scaled_dot_product_attention(x, x, x, Alibi::for_heads(2)); }, {"2 slopes in a call of 1 heads"});
  // Batches read in place: layouts that do not fit.
  expect_invalid([&] { SequenceRows::packed(std::vector<int>{1, 4}); }, {"must start with 0"});
  expect_invalid([&] { SequenceRows::packed(std::vector<int>{0, 4, 3}); }, {"offsets[2] = 3 < offsets[1] = 4"});
  expect_invalid([&] { SequenceRows::padded(4, std::vector<int>{2, 5}); }, {"lengths[1] = 5", "padded length 4"});
  expect_invalid([&] { SequenceRows::padded(4, std::vector<int>{2, -1}); }, {"sequence lengths[1] = -1"});
  expect_invalid([&] { mha.forward_batch(x, SequenceRows::packed(std::vector<int>{0, 3, 6})); },
                 {"use 6 query rows", "(5 x 32)"});
  expect_invalid([&] { mha.forward_batch(x, SequenceRows::uniform(1, 5), x, SequenceRows::uniform(2, 2)); },
                 {"1 query sequences and 2 memory sequences"});
  expect_invalid([&] { mha.forward_batch(x, SequenceRows::uniform(1, 5), KeyPadding(std::vector<int>{1, 2})); },
                 {"key padding of 2 lengths in a call of 1 sequences"});
  const BoolMatrix padding = BoolMatrix::Constant(2, 4, false);
  expect_invalid([&] { mha.forward(x, KeyPaddingMask(padding)); }, {"key padding mask of shape (2 x 4)", "(1 x 5)"});
  // A rotary embedding for another head width.
  MultiHeadAttention<double> rotary_mha(4, good);
  expect_invalid([&] { rotary_mha.set_rotary(RotaryEmbedding<double>(6)); }, {"head_dim=6", "head_dim=8"});
  EXPECT_EQ(rotary_mha.rotary(), nullptr);
}

}  // namespace
}  // namespace attend::test
