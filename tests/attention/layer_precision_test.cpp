// SPDX-License-Identifier: MIT
// bf16 and half layers: a MultiHeadAttention of E = 64, H = 4 query heads on H_kv = 2, d = 16,
// with biases, with and without rotary, causal and not, through forward (both paths, and the
// weights), forward_batch (both overloads), decode_step token by token and in chunks over a
// KVCache of its scalar (and of float and q8_0), and the paged layer step; and an
// AdditiveAttention through both paths. Each output is checked against the long-double reference
// of the same model on the same rounded weights and inputs with FlashAttention's rule: error at
// most 2x that of the naive layer in the same precision (support/low_precision_layer.hpp: every
// stage rounded to S, float accumulation) plus the floor of low_precision.hpp (4 float epsilons
// of the largest output). Results do not depend on the thread count (bitwise).
#include "support/low_precision.hpp"
#include "support/low_precision_layer.hpp"
#include "support/masks.hpp"
#include "support/multi_head_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/score_reference.hpp"
#include "support/tolerance.hpp"

#include <attend/attend.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class S>
class LayerPrecisionTest : public ::testing::Test {};
using ReducedScalars = ::testing::Types<Eigen::bfloat16, Eigen::half>;
TYPED_TEST_SUITE(LayerPrecisionTest, ReducedScalars);

const Shape kShape{4, 2, 16, 16, 64, 64, 64, 64, true};              // H, H_kv, d, d_v, E_q, E_k, E_v, E_out, bias
const RotarySpec kRotary{16, 16, RotaryLayout::HalfSplit, 10000.0};  // whole heads, NeoX pairs

/// A normal matrix rounded to S.
template <class S>
Matrix<S> draw(Rng& rng, Index rows, Index cols) {
  return rng.normal<float>(rows, cols).template cast<S>();
}

template <class To, class From>
MultiHeadWeights<To> cast_weights(const MultiHeadWeights<From>& w) {
  return {w.q_proj_weight.template cast<To>(), w.k_proj_weight.template cast<To>(),
          w.v_proj_weight.template cast<To>(), w.out_proj_weight.template cast<To>(),
          w.q_proj_bias.template cast<To>(),   w.k_proj_bias.template cast<To>(),
          w.v_proj_bias.template cast<To>(),   w.out_proj_bias.template cast<To>()};
}

/// A random model in S and the same values in float (what the reference reads).
template <class S>
struct Model {
  MultiHeadWeights<S> weights;
  MultiHeadWeights<float> wide;
  bool rotary;

  Model(Rng& rng, bool with_rotary)
      : weights(cast_weights<S>(random_weights<float>(kShape, rng))),
        wide(cast_weights<float>(weights)),
        rotary(with_rotary) {}

  MultiHeadAttention<S> layer() const {
    MultiHeadAttention<S> l(kShape.heads, weights, kShape.kv_heads);
    if (rotary) l.set_rotary(RotaryEmbedding<float>(kShape.d, kRotary.options()));
    return l;
  }

  /// The reference and the naive S layer on query over key and value with `visible`.
  struct Expectation {
    RealMatrix output;
    Matrix<float> naive;
  };
  Expectation expect(const Matrix<S>& query, const Matrix<S>& key, const Matrix<S>& value,
                     const BoolMatrix& visible) const {
    const RotarySpec* spec = rotary ? &kRotary : nullptr;
    Expected<float> e = expected_mha<float>(kShape, wide, query.template cast<float>(), key.template cast<float>(),
                                            value.template cast<float>(), visible, spec);
    return {std::move(e.output), naive_low_precision_layer<S>(kShape, weights, query, key, value, visible, spec)};
  }
  std::string describe() const { return rotary ? "rotary" : "no rotary"; }
};

BoolMatrix causal_visibility(Index lq, Index lk) {
  BoolMatrix visible(lq, lk);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) visible(i, j) = j <= i;
  return visible;
}

BoolMatrix all_visible(Index lq, Index lk) { return BoolMatrix::Constant(lq, lk, true); }

/// Default (Auto), blocked with even tiles (the bf16 dot-product kernels where the target has
/// them), blocked with odd tiles (the portable kernels), materialized.
std::vector<MultiHeadOptions> layer_paths() {
  MultiHeadOptions automatic, even, odd, materialized;
  even.algorithm = odd.algorithm = Algorithm::Blocked;
  even.block_q = 16;
  even.block_k = 32;
  odd.block_q = 7;
  odd.block_k = 9;
  materialized.algorithm = Algorithm::Materialized;
  return {automatic, even, odd, materialized};
}

TYPED_TEST(LayerPrecisionTest, ForwardMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 37;
  for (const bool rotary : {false, true}) {
    const Model<S> model(rng, rotary);
    const MultiHeadAttention<S> layer = model.layer();
    const Matrix<S> x = draw<S>(rng, len, kShape.eq);
    for (const bool causal : {false, true}) {
      SCOPED_TRACE(model.describe() + (causal ? ", causal" : ", no mask"));
      const auto ex = model.expect(x, x, x, causal ? causal_visibility(len, len) : all_visible(len, len));
      const auto forward = [&](const MultiHeadOptions& o) {
        return causal ? layer.forward(x, Causal(), o) : layer.forward(x, NoMask{}, o);
      };
      for (const MultiHeadOptions& o : layer_paths()) {
        SCOPED_TRACE("block " + std::to_string(o.block_q) + "x" + std::to_string(o.block_k));
        const MultiHeadResult<S> r = forward(o);
        EXPECT_TRUE(within_low_precision_rule(r.output, ex.output, ex.naive));
        EXPECT_TRUE(r.weights.empty());
      }
      // The weights, in float: the output is the materialized path's, and the weights those of
      // the layer's own rounded Q and K in float (the float tolerance rule, tolerance.hpp). (Their
      // error against the exact model is that of Q and K's rounding, which the naive layer shares
      // almost exactly: comparing two samples of one error is no rule.)
      MultiHeadOptions with_weights;
      with_weights.need_weights = NeedWeights::PerHead;
      const MultiHeadResult<S> r = forward(with_weights);
      MultiHeadOptions materialized;
      materialized.algorithm = Algorithm::Materialized;
      EXPECT_TRUE(r.output == forward(materialized).output);
      ASSERT_EQ(r.weights.size(), std::size_t(kShape.heads));
      const Matrix<float> q = layer.project_query(x).template cast<float>(),
                          k = layer.project_key(x).template cast<float>();
      const BoolMatrix visible = causal ? causal_visibility(len, len) : all_visible(len, len);
      const float scale = 1 / std::sqrt(float(kShape.d));
      for (Index h = 0; h < kShape.heads; ++h) {
        SCOPED_TRACE("weights of head " + std::to_string(h));
        const Matrix<float> qh = q.middleCols(h * kShape.d, kShape.d);
        const Matrix<float> kh = k.middleCols(h / 2 * kShape.d, kShape.d);
        const Reference ref =
            reference_attention(qh.cast<Real>(), kh.cast<Real>(), kh.cast<Real>(), Real(scale), visible);
        const Baseline<float> base = baseline_attention<float>(qh, kh, kh, scale, visible);
        const Matrix<float>& w = r.weights[std::size_t(h)];  // (the type: float for bf16 and half)
        EXPECT_TRUE(within_tolerance<float>(w, ref.weights, base.weights));
      }
    }
    // Cross attention, Lq != Lk (rotary positions by row in both).
    SCOPED_TRACE(model.describe() + ", cross attention");
    const Matrix<S> memory = draw<S>(rng, 58, kShape.ek);
    const auto ex = model.expect(x, memory, memory, all_visible(len, memory.rows()));
    for (const MultiHeadOptions& o : layer_paths())
      EXPECT_TRUE(within_low_precision_rule(layer.forward(x, memory, NoMask{}, o).output, ex.output, ex.naive));
  }
}

TYPED_TEST(LayerPrecisionTest, ForwardBatchMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<Index> lengths{23, 41};
  for (const bool rotary : {false, true}) {
    const Model<S> model(rng, rotary);
    const MultiHeadAttention<S> layer = model.layer();
    std::vector<Matrix<S>> xs;
    std::vector<Index> offsets{0};
    for (const Index len : lengths) {
      xs.push_back(draw<S>(rng, len, kShape.eq));
      offsets.push_back(offsets.back() + len);
    }
    Matrix<S> packed(offsets.back(), kShape.eq);
    for (std::size_t b = 0; b < xs.size(); ++b) packed.middleRows(offsets[b], lengths[b]) = xs[b];
    const std::vector<Matrix<S>> outputs = layer.forward_batch(xs, {}, Causal());
    const MultiHeadBatchResult<S> in_place = layer.forward_batch(packed, SequenceRows::packed(offsets), Causal());
    ASSERT_EQ(outputs.size(), xs.size());
    for (std::size_t b = 0; b < xs.size(); ++b) {
      SCOPED_TRACE(model.describe() + ", sequence " + std::to_string(b));
      const auto ex = model.expect(xs[b], xs[b], xs[b], causal_visibility(lengths[b], lengths[b]));
      EXPECT_TRUE(within_low_precision_rule(outputs[b], ex.output, ex.naive));
      EXPECT_TRUE(within_low_precision_rule(Matrix<S>(in_place.output.middleRows(offsets[b], lengths[b])), ex.output,
                                            ex.naive));
    }
  }
}

/// Decodes x with decode_step(layer, cache, chunk) in chunks of `chunk` rows.
template <class S, class C>
Matrix<S> decode(const MultiHeadAttention<S>& layer, KVCache<C>& cache, const Matrix<S>& x, Index chunk,
                 const AttentionOptions& options = {}) {
  Matrix<S> out(x.rows(), layer.output_width());
  for (Index t = 0; t < x.rows(); t += chunk) {
    const Index n = std::min(chunk, x.rows() - t);
    out.middleRows(t, n) = decode_step(layer, cache, x.middleRows(t, n), options);
  }
  return out;
}

TYPED_TEST(LayerPrecisionTest, DecodeMeetsTheRuleAsForwardDoes) {
  using S = TypeParam;
  using Other = std::conditional_t<std::is_same_v<S, Eigen::bfloat16>, Eigen::half, Eigen::bfloat16>;
  ATTEND_SEEDED_RNG(rng);
  const Index len = 37;
  for (const bool rotary : {false, true}) {
    SCOPED_TRACE(Model<S>(rng, rotary).describe());
    const Model<S> model(rng, rotary);
    const MultiHeadAttention<S> layer = model.layer();
    const Matrix<S> x = draw<S>(rng, len, kShape.eq);
    const auto ex = model.expect(x, x, x, causal_visibility(len, len));
    // forward(x, Causal()) and decoding token by token (and in chunks of 5) meet the same rule.
    EXPECT_TRUE(within_low_precision_rule(layer.forward(x, Causal()).output, ex.output, ex.naive));
    for (const Index chunk : {Index(1), Index(5)}) {
      SCOPED_TRACE("chunks of " + std::to_string(chunk));
      KVCache<S> cache(layer, len);
      EXPECT_TRUE(within_low_precision_rule(decode(layer, cache, x, chunk), ex.output, ex.naive));
      // A float cache holds the rounded projections exactly: the same rule.
      KVCache<float> wide(layer, len);
      EXPECT_TRUE(within_low_precision_rule(decode(layer, wide, x, chunk), ex.output, ex.naive));
    }
    // A bf16 layer over a half cache: half holds bf16 values exactly (in its range).
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      KVCache<Other> other(layer, len);
      EXPECT_TRUE(within_low_precision_rule(decode(layer, other, x, 1), ex.output, ex.naive));
    }
    // q8_0 K/V: quantization error (at most half a step, 1/254 of a block's largest |value|,
    // per entry), far above S's rounding, so not the rule: within 0.05 of the S cache's output.
    KVCache<S> cache(layer, len);
    KVCache<Q8_0> quantized(layer, len);
    const Matrix<float> exact = decode(layer, cache, x, 1).template cast<float>();
    const Matrix<float> q8 = decode(layer, quantized, x, 1).template cast<float>();
    EXPECT_TRUE(q8.allFinite());
    EXPECT_LE((q8 - exact).cwiseAbs().maxCoeff(), 0.05f);
  }
}

TYPED_TEST(LayerPrecisionTest, PagedLayerStepMeetsTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<Index> lengths{19, 7, 26};
  for (const bool rotary : {false, true}) {
    const Model<S> model(rng, rotary);
    SCOPED_TRACE(model.describe());
    const MultiHeadAttention<S> layer = model.layer();
    std::vector<Matrix<S>> xs;
    for (const Index len : lengths) xs.push_back(draw<S>(rng, len, kShape.eq));
    PagedKVCache<S> cache(layer, 24, {4});
    std::vector<Index> ids, done(lengths.size(), 0);
    std::vector<Matrix<S>> out;
    for (const Index len : lengths) {
      ids.push_back(cache.add_sequence());
      out.push_back(Matrix<S>(len, kShape.eout));
    }
    // A prompt chunk of 6 tokens per sequence, then one or two tokens per step.
    for (Index call = 0;; ++call) {
      std::vector<Index> offsets{0};
      for (std::size_t b = 0; b < lengths.size(); ++b)
        offsets.push_back(offsets.back() +
                          std::min(call == 0 ? Index(6) : Index(1 + (call + Index(b)) % 2), lengths[b] - done[b]));
      if (offsets.back() == 0) break;
      Matrix<S> step(offsets.back(), kShape.eq);
      for (std::size_t b = 0; b < lengths.size(); ++b)
        step.middleRows(offsets[b], offsets[b + 1] - offsets[b]) =
            xs[b].middleRows(done[b], offsets[b + 1] - offsets[b]);
      const Matrix<S> y = paged_decode_step(layer, cache, ids, SequenceRows::packed(offsets), step);
      for (std::size_t b = 0; b < lengths.size(); ++b) {
        out[b].middleRows(done[b], offsets[b + 1] - offsets[b]) = y.middleRows(offsets[b], offsets[b + 1] - offsets[b]);
        done[b] += offsets[b + 1] - offsets[b];
      }
    }
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const auto ex = model.expect(xs[b], xs[b], xs[b], causal_visibility(lengths[b], lengths[b]));
      EXPECT_TRUE(within_low_precision_rule(out[b], ex.output, ex.naive));
    }
  }
}

TYPED_TEST(LayerPrecisionTest, ThreadCountsGiveTheSameBits) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Model<S> model(rng, true);
  const MultiHeadAttention<S> layer = model.layer();
  const Index len = 150;  // projections in three blocks of rows
  const Matrix<S> x = draw<S>(rng, len, kShape.eq);
  for (const MultiHeadOptions& path : layer_paths()) {
    SCOPED_TRACE("block " + std::to_string(path.block_q) + "x" + std::to_string(path.block_k));
    MultiHeadOptions one = path, two = path;
    one.num_threads = 1;
    two.num_threads = 2;
    EXPECT_TRUE(layer.forward(x, Causal(), one).output == layer.forward(x, Causal(), two).output);
    const std::vector<Matrix<S>> xs{x.topRows(60), x.bottomRows(90)};
    const std::vector<Matrix<S>> batch_one = layer.forward_batch(xs, {}, Causal(), std::vector<Index>{}, one);
    const std::vector<Matrix<S>> batch_two = layer.forward_batch(xs, {}, Causal(), std::vector<Index>{}, two);
    EXPECT_TRUE(batch_one[0] == batch_two[0] && batch_one[1] == batch_two[1]);
    const SequenceRows rows = SequenceRows::packed(std::vector<Index>{0, 60, len});
    EXPECT_TRUE(layer.forward_batch(x, rows, Causal(), one).output ==
                layer.forward_batch(x, rows, Causal(), two).output);
  }
  AttentionOptions one, two;
  one.num_threads = 1;
  two.num_threads = 2;
  KVCache<S> cache_one(layer, len), cache_two(layer, len);
  EXPECT_TRUE(decode(layer, cache_one, x, 7, one) == decode(layer, cache_two, x, 7, two));
}

// AdditiveAttention in S: W_q (h, d_q), W_k (h, d_k), v, b rounded to S.
TYPED_TEST(LayerPrecisionTest, AdditiveMeetsTheRuleOnBothPaths) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index h = 32, dq = 24, dk = 40, dv = 16, lq = 33, lk = 70;
  const Matrix<S> w_query = rng.normal<float>(h, dq, 1 / std::sqrt(double(dq))).template cast<S>();
  const Matrix<S> w_key = rng.normal<float>(h, dk, 1 / std::sqrt(double(dk))).template cast<S>();
  const Vector<S> v = Vector<float>(rng.normal<float>(h, 1)).template cast<S>();
  const Vector<S> bias = Vector<float>(rng.normal<float>(h, 1)).template cast<S>();
  const AdditiveAttention<S> layer(w_query, w_key, v, bias);
  const Matrix<S> q = draw<S>(rng, lq, dq), k = draw<S>(rng, lk, dk), values = draw<S>(rng, lk, dv);
  // s_ij = v^T tanh(W_q q_i + b + W_k k_j) in long double on the same rounded values.
  const RealMatrix qp =
      q.template cast<float>().template cast<Real>() * w_query.template cast<float>().template cast<Real>().transpose();
  const RealMatrix kp =
      k.template cast<float>().template cast<Real>() * w_key.template cast<float>().template cast<Real>().transpose();
  RealMatrix scores(lq, lk);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      Real sum = 0;
      for (Index c = 0; c < h; ++c) sum += Real(float(v(c))) * std::tanh(qp(i, c) + Real(float(bias(c))) + kp(j, c));
      scores(i, j) = sum;
    }
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "no mask");
    const BoolMatrix visible = causal ? causal_visibility(lq, lk) : all_visible(lq, lk);
    const Reference ref = reference_from_scores(scores, values.template cast<float>(), visible);
    const Matrix<float> naive = naive_low_precision_additive<S>(w_query, w_key, v, bias, q, k, values, visible);
    const auto forward = [&](const AttentionOptions& o) {
      return causal ? layer.forward(q, k, values, Causal(), o) : layer.forward(q, k, values, NoMask{}, o);
    };
    for (const MultiHeadOptions& o : layer_paths()) {
      SCOPED_TRACE("block " + std::to_string(o.block_q) + "x" + std::to_string(o.block_k));
      const Matrix<S> out = forward(o);
      EXPECT_TRUE(within_low_precision_rule(out, ref.output, naive));
      AttentionOptions two = o;
      two.num_threads = 2;
      EXPECT_TRUE(forward(two) == out);
    }
    AttentionOptions materialized;
    materialized.algorithm = Algorithm::Materialized;
    const AttentionResult<S> with_weights =
        causal ? layer.forward_with_weights(q, k, values, Causal()) : layer.forward_with_weights(q, k, values);
    EXPECT_TRUE(with_weights.output == forward(materialized));
    // The weights: those of the layer's own rounded projections, in float (tolerance.hpp), as
    // for the multi-head weights.
    const Matrix<float> qp_own = layer.project_queries(q).template cast<float>();
    const Matrix<float> kp_own = layer.project_keys(k).template cast<float>();
    RealMatrix own_scores(lq, lk);
    Matrix<float> own_base_scores(lq, lk);
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < lk; ++j) {
        Real sum = 0;
        float base = 0;
        for (Index c = 0; c < h; ++c) {
          sum += Real(float(v(c))) * std::tanh(Real(qp_own(i, c)) + Real(kp_own(j, c)));
          base += float(v(c)) * std::tanh(qp_own(i, c) + kp_own(j, c));
        }
        own_scores(i, j) = sum;
        own_base_scores(i, j) = base;
      }
    const Matrix<float> wide_values = values.template cast<float>();
    EXPECT_TRUE(within_tolerance<float>(with_weights.weights,
                                        reference_from_scores(own_scores, wide_values, visible).weights,
                                        baseline_from_scores<float>(own_base_scores, wide_values, visible).weights));
  }
}

}  // namespace
