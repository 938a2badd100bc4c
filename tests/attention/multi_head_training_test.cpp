// SPDX-License-Identifier: MIT
// The backward of a whole MultiHeadAttention layer: finite differences in double of every input,
// weight and bias (self, cross, GQA, causal, rotary, both paths), zero gradients where nothing
// is seen, float against double, thread invariance, a batch read in place against training its
// sequences one by one, and the shape checks.
#include "support/attention_case.hpp"
#include "support/expect.hpp"
#include "support/random.hpp"
#include "support/tolerance.hpp"

#include <attend/attention/multi_head_training.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace attend;
using namespace attend::test;

/// A layer's shape: H, H_kv, d, d_v, widths E_q, E_k, E_v, E_out, biases, rotary.
struct LayerShape {
  Index heads, kv_heads, d, dv, eq, ek, ev, eout;
  bool biases;
  std::optional<RotaryOptions> rotary;
};

template <class T>
MultiHeadWeights<T> random_weights(const LayerShape& s, Rng& rng) {
  const auto bias = [&](Index n) { return s.biases ? Vector<T>(rng.normal<T>(n, 1)) : Vector<T>(); };
  return {rng.normal<T>(s.heads * s.d, s.eq, 0.6),  rng.normal<T>(s.kv_heads * s.d, s.ek, 0.6),
          rng.normal<T>(s.kv_heads * s.dv, s.ev, 0.6), rng.normal<T>(s.eout, s.heads * s.dv, 0.6),
          bias(s.heads * s.d),                       bias(s.kv_heads * s.d),
          bias(s.kv_heads * s.dv),                   bias(s.eout)};
}

template <class T>
MultiHeadAttention<T> make_layer(const LayerShape& s, const MultiHeadWeights<T>& w) {
  MultiHeadAttention<T> layer(s.heads, w, s.kv_heads);
  if (s.rotary) layer.set_rotary(RotaryEmbedding<T>(s.d, *s.rotary));
  return layer;
}

/// Full rotary with a short cos/sin cache: the finite differences build a layer per evaluation.
RotaryOptions plain_rotary() {
  RotaryOptions o;
  o.cache_length = 8;
  return o;
}

RotaryOptions yarn_partial_rotary() {
  RotaryOptions o = plain_rotary();
  o.rotary_dim = 2;
  o.layout = RotaryLayout::Interleaved;
  o.scaling = RotaryScaling::yarn(4, 16);
  return o;
}

/// How the layer is called: forward(query, key, value), forward(x) or forward(x, memory).
enum class Inputs { Separate, Self, Memory };

/// Central differences of sum(d_out * layer.forward(query, key, value)) for every entry of the
/// inputs and of every weight and bias, against multi_head_layer_backward.
template <class Mask>
void check_finite_differences(const LayerShape& s, Index lq, Index lk, const Mask& mask, Inputs inputs, Rng& rng) {
  MultiHeadWeights<double> w = random_weights<double>(s, rng);
  Matrix<double> query = rng.normal<double>(lq, s.eq), key = rng.normal<double>(lk, s.ek),
                 value = rng.normal<double>(lk, s.ev);
  if (inputs == Inputs::Self) key = value = query;
  if (inputs == Inputs::Memory) value = key;
  const Matrix<double> d_out = rng.normal<double>(lq, s.eout);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(2, 3)}) {
    SCOPED_TRACE(describe(options));
    MultiHeadOptions mh_options;
    static_cast<AttentionOptions&>(mh_options) = options;
    mh_options.num_threads = 1;  // thousands of tiny forwards: a thread team each would dominate
    const MultiHeadAttention<double> layer = make_layer(s, w);
    const MultiHeadTrainingForward<double> forward =
        inputs == Inputs::Self     ? multi_head_layer_forward(layer, query, mask, options)
        : inputs == Inputs::Memory ? multi_head_layer_forward(layer, query, key, mask, options)
                                   : multi_head_layer_forward(layer, query, key, value, mask, options);
    const Matrix<double> expected_output = layer.forward(query, key, value, mask, mh_options).output;
    EXPECT_TRUE(forward.output.isApprox(expected_output, 1e-13)) << "the training forward is the layer's forward";
    const MultiHeadLayerGradients<double> g = multi_head_layer_backward(layer, forward.context, d_out, mask, options);

    const auto loss = [&](const MultiHeadWeights<double>& weights, const Matrix<double>& qi, const Matrix<double>& ki,
                          const Matrix<double>& vi) {
      return (d_out.array() * make_layer(s, weights).forward(qi, ki, vi, mask, mh_options).output.array()).sum();
    };
    const auto check = [&](const char* what, const auto& analytic, auto&& perturbed_loss, Index rows, Index cols) {
      ASSERT_EQ(analytic.rows(), rows) << what;
      ASSERT_EQ(analytic.cols(), cols) << what;
      for (Index i = 0; i < rows; ++i)
        for (Index j = 0; j < cols; ++j) {
          const double step = 1e-6;
          const double numeric = (perturbed_loss(i, j, step) - perturbed_loss(i, j, -step)) / (2 * step);
          EXPECT_NEAR(analytic(i, j), numeric, 2e-7 * std::max(1.0, std::fabs(numeric)))
              << what << " (" << i << ", " << j << ")";
        }
    };
    const auto input = [&](int which) {
      return [&, which](Index i, Index j, double step) {
        Matrix<double> qi = query, ki = key, vi = value;
        if (inputs == Inputs::Self) {  // one x feeds all three
          qi(i, j) += step;
          return loss(w, qi, qi, qi);
        }
        if (inputs == Inputs::Memory && which == 1) {  // one memory feeds key and value
          ki(i, j) += step;
          return loss(w, qi, ki, ki);
        }
        (which == 0 ? qi : which == 1 ? ki : vi)(i, j) += step;
        return loss(w, qi, ki, vi);
      };
    };
    if (inputs == Inputs::Self) {
      check("d_input", g.d_input(), input(0), lq, s.eq);
    } else if (inputs == Inputs::Memory) {
      check("d_query", g.d_query, input(0), lq, s.eq);
      check("d_memory", g.d_memory(), input(1), lk, s.ek);
    } else {
      check("d_query", g.d_query, input(0), lq, s.eq);
      check("d_key", g.d_key, input(1), lk, s.ek);
      check("d_value", g.d_value, input(2), lk, s.ev);
    }
    const auto weight = [&](auto member) {
      return [&, member](Index i, Index j, double step) {
        MultiHeadWeights<double> perturbed = w;
        (perturbed.*member)(i, j) += step;
        return loss(perturbed, query, key, value);
      };
    };
    using W = MultiHeadWeights<double>;
    check("dW_q", g.weights.q_proj_weight, weight(&W::q_proj_weight), w.q_proj_weight.rows(), w.q_proj_weight.cols());
    check("dW_k", g.weights.k_proj_weight, weight(&W::k_proj_weight), w.k_proj_weight.rows(), w.k_proj_weight.cols());
    check("dW_v", g.weights.v_proj_weight, weight(&W::v_proj_weight), w.v_proj_weight.rows(), w.v_proj_weight.cols());
    check("dW_o", g.weights.out_proj_weight, weight(&W::out_proj_weight), w.out_proj_weight.rows(),
          w.out_proj_weight.cols());
    const auto bias = [&](auto member) {
      return [&, member](Index i, Index, double step) {
        MultiHeadWeights<double> perturbed = w;
        (perturbed.*member)(i) += step;
        return loss(perturbed, query, key, value);
      };
    };
    for (const auto& [name, analytic, member] :
         {std::tuple{"db_q", &g.weights.q_proj_bias, &W::q_proj_bias},
          std::tuple{"db_k", &g.weights.k_proj_bias, &W::k_proj_bias},
          std::tuple{"db_v", &g.weights.v_proj_bias, &W::v_proj_bias},
          std::tuple{"db_o", &g.weights.out_proj_bias, &W::out_proj_bias}})
      check(name, *analytic, bias(member), (w.*member).size(), 1);
  }
}

TEST(MultiHeadTrainingFiniteDifferences, SelfAttentionWithBiases) {
  ATTEND_SEEDED_RNG(rng);
  check_finite_differences({2, 2, 3, 2, 6, 6, 6, 5, true, std::nullopt}, 5, 5, NoMask{}, Inputs::Self, rng);
}

TEST(MultiHeadTrainingFiniteDifferences, CrossAttentionOfOtherWidthsAndLengths) {
  ATTEND_SEEDED_RNG(rng);
  check_finite_differences({2, 2, 3, 4, 6, 5, 3, 4, false, std::nullopt}, 4, 7, NoMask{}, Inputs::Separate, rng);
  check_finite_differences({2, 2, 3, 4, 6, 5, 5, 4, true, std::nullopt}, 4, 7, NoMask{}, Inputs::Memory, rng);
}

TEST(MultiHeadTrainingFiniteDifferences, GroupedQueryCausal) {
  ATTEND_SEEDED_RNG(rng);
  check_finite_differences({4, 2, 2, 3, 5, 4, 4, 6, true, std::nullopt}, 6, 5, Causal(Alignment::BottomRight),
                           Inputs::Separate, rng);
}

TEST(MultiHeadTrainingFiniteDifferences, RotaryCausalSelfAttention) {
  ATTEND_SEEDED_RNG(rng);
  check_finite_differences({2, 1, 4, 3, 6, 6, 6, 6, true, plain_rotary()}, 6, 6, Causal(), Inputs::Self, rng);
  check_finite_differences({2, 2, 4, 2, 5, 3, 4, 5, true, yarn_partial_rotary()}, 5, 7, Causal(), Inputs::Separate,
                           rng);
}

/// Self attention saves x once, cross attention its memory once; the gradients are the same as
/// through forward(query, key, value) with copies.
TEST(MultiHeadTraining, SharedInputsAreSavedOnce) {
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{2, 2, 3, 3, 6, 6, 6, 5, true, std::nullopt};
  const MultiHeadAttention<double> layer = make_layer(s, random_weights<double>(s, rng));
  const Matrix<double> x = rng.normal<double>(4, 6), memory = rng.normal<double>(5, 6), d_out = rng.normal<double>(4, 5);
  const auto self = multi_head_layer_forward(layer, x, Causal());
  EXPECT_TRUE(self.context.key_is_query && self.context.value_is_key);
  EXPECT_EQ(self.context.key.size() + self.context.value.size(), 0);
  const auto copies = multi_head_layer_forward(layer, x, x, x, Causal());
  EXPECT_TRUE(identical(self.output, copies.output));
  const auto g_self = multi_head_layer_backward(layer, self.context, d_out, Causal());
  const auto g_copies = multi_head_layer_backward(layer, copies.context, d_out, Causal());
  EXPECT_TRUE(identical(g_self.d_input(), g_copies.d_input()));
  EXPECT_TRUE(identical(g_self.weights.k_proj_weight, g_copies.weights.k_proj_weight));
  const auto cross = multi_head_layer_forward(layer, x, memory);
  EXPECT_TRUE(!cross.context.key_is_query && cross.context.value_is_key && cross.context.value.size() == 0);
  const auto g_cross = multi_head_layer_backward(layer, cross.context, d_out);
  const auto g_cross_copies =
      multi_head_layer_backward(layer, multi_head_layer_forward(layer, x, memory, memory).context, d_out);
  EXPECT_TRUE(identical(g_cross.d_memory(), g_cross_copies.d_memory()));
  EXPECT_TRUE(identical(g_cross.weights.v_proj_weight, g_cross_copies.weights.v_proj_weight));
}

/// Rows that see no key pass nothing to Q, K, V or the input projections; out = b_o there.
TEST(MultiHeadTraining, NothingSeenGivesZeroGradients) {
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{2, 1, 4, 3, 6, 5, 5, 4, true, plain_rotary()};
  const MultiHeadAttention<double> layer = make_layer(s, random_weights<double>(s, rng));
  const Matrix<double> x = rng.normal<double>(5, 6), memory = rng.normal<double>(3, 5), d_out = rng.normal<double>(5, 4);
  for (const AttentionOptions& options : {materialized_path(), blocked_path(2, 2)}) {
    SCOPED_TRACE(describe(options));
    const auto expect_nothing_passes = [&](const MultiHeadLayerGradients<double>& g, Index keys) {
      EXPECT_TRUE(g.d_query.isZero(0));
      EXPECT_TRUE(g.d_key.isZero(0) && g.d_key.rows() == keys);
      EXPECT_TRUE(g.d_value.isZero(0) && g.d_value.rows() == keys);
      EXPECT_TRUE(g.weights.q_proj_weight.isZero(0) && g.weights.k_proj_weight.isZero(0) &&
                  g.weights.v_proj_weight.isZero(0) && g.weights.out_proj_weight.isZero(0));
      EXPECT_TRUE(g.weights.q_proj_bias.isZero(0) && g.weights.k_proj_bias.isZero(0) &&
                  g.weights.v_proj_bias.isZero(0));
      EXPECT_TRUE(g.weights.out_proj_bias.isApprox(d_out.colwise().sum().transpose()));
    };
    const Matrix<double> no_memory(0, 5);
    const auto empty = multi_head_layer_forward(layer, x, no_memory, NoMask{}, options);
    expect_nothing_passes(multi_head_layer_backward(layer, empty.context, d_out, NoMask{}, options), 0);
    const auto padded = multi_head_layer_forward(layer, x, memory, KeyPadding(0), options);
    expect_nothing_passes(multi_head_layer_backward(layer, padded.context, d_out, KeyPadding(0), options), 3);
    // Bottom-right causal with Lq = 5 > Lk = 3: queries 0 and 1 see no key, query 2 sees one (a
    // softmax of one score has zero gradient), query 3 sees two.
    const auto causal = multi_head_layer_forward(layer, x, memory, Causal(Alignment::BottomRight), options);
    const auto g = multi_head_layer_backward(layer, causal.context, d_out, Causal(Alignment::BottomRight), options);
    EXPECT_TRUE(g.d_query.topRows(2).isZero(0));
    EXPECT_FALSE(g.d_query.row(3).isZero(0));
  }
}

/// float gradients agree with double ones to float accuracy.
TEST(MultiHeadTraining, FloatAgreesWithDouble) {
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{4, 2, 8, 8, 32, 32, 32, 32, true, plain_rotary()};
  const MultiHeadWeights<double> w = random_weights<double>(s, rng);
  const MultiHeadWeights<float> wf{w.q_proj_weight.cast<float>(),   w.k_proj_weight.cast<float>(),
                                   w.v_proj_weight.cast<float>(),   w.out_proj_weight.cast<float>(),
                                   w.q_proj_bias.cast<float>(),     w.k_proj_bias.cast<float>(),
                                   w.v_proj_bias.cast<float>(),     w.out_proj_bias.cast<float>()};
  const Matrix<double> x = rng.normal<double>(40, 32), d_out = rng.normal<double>(40, 32);
  const auto gd = multi_head_layer_backward(make_layer(s, w), multi_head_layer_forward(make_layer(s, w), x, Causal()).context,
                                            d_out, Causal());
  const Matrix<float> xf = x.cast<float>(), d_outf = d_out.cast<float>();
  const auto gf = multi_head_layer_backward(make_layer(s, wf),
                                            multi_head_layer_forward(make_layer(s, wf), xf, Causal()).context, d_outf,
                                            Causal());
  const auto close = [](const auto& f, const auto& d) {
    return (f.template cast<double>() - d).cwiseAbs().maxCoeff() <= 1e-4 * std::max(1.0, d.cwiseAbs().maxCoeff());
  };
  EXPECT_TRUE(close(gf.d_input(), gd.d_input()));
  EXPECT_TRUE(close(gf.weights.q_proj_weight, gd.weights.q_proj_weight));
  EXPECT_TRUE(close(gf.weights.k_proj_weight, gd.weights.k_proj_weight));
  EXPECT_TRUE(close(gf.weights.v_proj_weight, gd.weights.v_proj_weight));
  EXPECT_TRUE(close(gf.weights.out_proj_weight, gd.weights.out_proj_weight));
  EXPECT_TRUE(close(gf.weights.k_proj_bias, gd.weights.k_proj_bias));
}

TEST(MultiHeadTraining, BitwiseInvariantToThreadCount) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{4, 2, 8, 8, 32, 32, 32, 32, true, plain_rotary()};
  const MultiHeadAttention<float> layer = make_layer(s, random_weights<float>(s, rng));
  const Matrix<float> x = rng.normal<float>(150, 32), d_out = rng.normal<float>(150, 32);
  const auto run = [&](int threads) {
    AttentionOptions options = blocked_path(32, 64);
    options.num_threads = threads;
    return multi_head_layer_backward(layer, multi_head_layer_forward(layer, x, Causal(), options).context, d_out,
                                     Causal(), options);
  };
  const auto one = run(1);
  for (const int threads : {2, 3}) {
    const auto g = run(threads);
    EXPECT_TRUE(identical(g.d_query, one.d_query) && identical(g.d_key, one.d_key) && identical(g.d_value, one.d_value));
    EXPECT_TRUE(identical(g.weights.q_proj_weight, one.weights.q_proj_weight) &&
                identical(g.weights.k_proj_weight, one.weights.k_proj_weight) &&
                identical(g.weights.v_proj_weight, one.weights.v_proj_weight) &&
                identical(g.weights.out_proj_weight, one.weights.out_proj_weight));
  }
#endif
}

/// A batch read in place (multi_head_layer_forward_batch): its output is bitwise forward_batch's,
/// each sequence's input gradients are those of training it alone and the weights' their sum
/// (to rounding: the projections run over all rows at once), rows of no sequence get nothing.
TEST(MultiHeadTraining, BatchReadInPlaceMatchesPerSequenceTraining) {
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{4, 2, 8, 6, 24, 24, 24, 16, true, plain_rotary()};  // (self attention: E_q = E_k = E_v)
  const MultiHeadAttention<double> layer = make_layer(s, random_weights<double>(s, rng));
  const std::vector<Index> lengths{13, 0, 9, 21}, memory_lengths{17, 5, 0, 30};
  const auto close = [](const Matrix<double>& a, const Matrix<double>& b) {
    return a.rows() == b.rows() && a.cols() == b.cols() &&
           (a.size() == 0 || (a - b).cwiseAbs().maxCoeff() <= 1e-12 * std::max(1.0, b.cwiseAbs().maxCoeff()));
  };
  const auto close_v = [&](const Vector<double>& a, const Vector<double>& b) { return close(a, b); };
  for (const bool packed : {false, true})
    for (const bool self : {true, false}) {
      SCOPED_TRACE(std::string(packed ? "packed" : "padded") + (self ? " self" : " cross"));
      const auto layout = [&](const std::vector<Index>& n, Index padded) {
        std::vector<Index> offsets{0};
        for (const Index l : n) offsets.push_back(offsets.back() + l);
        return packed ? SequenceRows::packed(offsets) : SequenceRows::padded(padded, n);
      };
      const SequenceRows rows = layout(lengths, 21), memory_rows = self ? rows : layout(memory_lengths, 30);
      const Matrix<double> x = rng.normal<double>(rows.rows_used() + 2, 24);  // (2 rows of no sequence)
      const Matrix<double> memory = self ? x : rng.normal<double>(memory_rows.rows_used(), 24);
      const Matrix<double> d_out = rng.normal<double>(x.rows(), 16);
      const AttentionOptions options = blocked_path(8, 8);
      const MultiHeadTrainingForward<double> f =
          self ? multi_head_layer_forward_batch(layer, x, rows, Causal(), options)
               : multi_head_layer_forward_batch(layer, x, rows, memory, memory_rows, KeyPadding(memory_lengths), options);
      const MultiHeadBatchResult<double> inference =
          self ? layer.forward_batch(x, rows, Causal(), MultiHeadOptions{options})
               : layer.forward_batch(x, rows, memory, memory_rows, KeyPadding(memory_lengths), MultiHeadOptions{options});
      EXPECT_TRUE(identical(f.output, inference.output));
      const MultiHeadLayerGradients<double> g =
          self ? multi_head_layer_backward(layer, f.context, d_out, Causal(), options)
               : multi_head_layer_backward(layer, f.context, d_out, KeyPadding(memory_lengths), options);
      const Matrix<double> d_x = self ? g.d_input() : g.d_query, d_memory = self ? d_x : g.d_memory();
      MultiHeadWeights<double> sum{Matrix<double>::Zero(s.heads * s.d, 24), Matrix<double>::Zero(s.kv_heads * s.d, 24),
                                   Matrix<double>::Zero(s.kv_heads * s.dv, 24), Matrix<double>::Zero(16, s.heads * s.dv),
                                   Vector<double>::Zero(s.heads * s.d), Vector<double>::Zero(s.kv_heads * s.d),
                                   Vector<double>::Zero(s.kv_heads * s.dv), Vector<double>::Zero(16)};
      std::vector<bool> used(std::size_t(x.rows()), false), memory_used(std::size_t(memory.rows()), false);
      for (Index b = 0; b < rows.size(); ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        const Index r0 = rows.begin(b), n = rows.length(b), m0 = memory_rows.begin(b), m = memory_rows.length(b);
        std::fill(used.begin() + r0, used.begin() + r0 + n, true);
        std::fill(memory_used.begin() + m0, memory_used.begin() + m0 + m, true);
        const Matrix<double> xb = x.middleRows(r0, n), mb = memory.middleRows(m0, m), db = d_out.middleRows(r0, n);
        const MultiHeadTrainingForward<double> fb =
            self ? multi_head_layer_forward(layer, xb, Causal(), options)
                 : multi_head_layer_forward(layer, xb, mb, KeyPadding(memory_lengths[std::size_t(b)]), options);
        const MultiHeadLayerGradients<double> gb =
            self ? multi_head_layer_backward(layer, fb.context, db, Causal(), options)
                 : multi_head_layer_backward(layer, fb.context, db, KeyPadding(memory_lengths[std::size_t(b)]), options);
        EXPECT_TRUE(close(f.output.middleRows(r0, n), fb.output)) << "output";
        if (self) {
          EXPECT_TRUE(close(d_x.middleRows(r0, n), gb.d_input())) << "d_input";
        } else {
          EXPECT_TRUE(close(d_x.middleRows(r0, n), gb.d_query)) << "d_query";
          EXPECT_TRUE(close(d_memory.middleRows(m0, m), gb.d_memory())) << "d_memory";
        }
        sum.q_proj_weight += gb.weights.q_proj_weight;
        sum.k_proj_weight += gb.weights.k_proj_weight;
        sum.v_proj_weight += gb.weights.v_proj_weight;
        sum.out_proj_weight += gb.weights.out_proj_weight;
        sum.q_proj_bias += gb.weights.q_proj_bias;
        sum.k_proj_bias += gb.weights.k_proj_bias;
        sum.v_proj_bias += gb.weights.v_proj_bias;
        sum.out_proj_bias += gb.weights.out_proj_bias;
      }
      EXPECT_TRUE(close(g.weights.q_proj_weight, sum.q_proj_weight)) << "q_proj_weight";
      EXPECT_TRUE(close(g.weights.k_proj_weight, sum.k_proj_weight)) << "k_proj_weight";
      EXPECT_TRUE(close(g.weights.v_proj_weight, sum.v_proj_weight)) << "v_proj_weight";
      EXPECT_TRUE(close(g.weights.out_proj_weight, sum.out_proj_weight)) << "out_proj_weight";
      EXPECT_TRUE(close_v(g.weights.q_proj_bias, sum.q_proj_bias)) << "q_proj_bias";
      EXPECT_TRUE(close_v(g.weights.k_proj_bias, sum.k_proj_bias)) << "k_proj_bias";
      EXPECT_TRUE(close_v(g.weights.v_proj_bias, sum.v_proj_bias)) << "v_proj_bias";
      EXPECT_TRUE(close_v(g.weights.out_proj_bias, sum.out_proj_bias)) << "out_proj_bias";
      for (Index r = 0; r < x.rows(); ++r) {
        if (!used[std::size_t(r)]) {
          EXPECT_TRUE(d_x.row(r).isZero(0)) << "row " << r << " is in no sequence";
        }
      }
      for (Index r = 0; r < memory.rows(); ++r) {
        if (!memory_used[std::size_t(r)]) {
          EXPECT_TRUE(d_memory.row(r).isZero(0)) << "memory row " << r << " is in no sequence";
        }
      }
    }
}

TEST(MultiHeadTraining, BadShapesThrowNamingThem) {
  ATTEND_SEEDED_RNG(rng);
  const LayerShape s{2, 2, 3, 3, 6, 6, 6, 5, false, std::nullopt};
  const MultiHeadAttention<double> layer = make_layer(s, random_weights<double>(s, rng));
  const auto forward = multi_head_layer_forward(layer, rng.normal<double>(4, 6));
  expect_invalid([&] { multi_head_layer_backward(layer, forward.context, Matrix<double>(4, 6)); },
                 {"d_output (4 x 6)", "(4 x 5)"});
  MultiHeadContext<double> truncated = forward.context;
  truncated.lse = Matrix<double>(4, 1);
  expect_invalid([&] { multi_head_layer_backward(layer, truncated, Matrix<double>(4, 5)); },
                 {"saved log-sum-exp (4 x 1)"});
  expect_invalid([&] { multi_head_layer_forward(layer, rng.normal<double>(4, 7)); }, {"q_proj"});
  const Matrix<double> x = rng.normal<double>(6, 6);
  expect_invalid([&] { multi_head_layer_forward_batch(layer, x, SequenceRows::uniform(2, 4)); },
                 {"8 query rows", "(6 x 6)"});
  expect_invalid(
      [&] { multi_head_layer_forward_batch(layer, x, SequenceRows::uniform(2, 3), x, SequenceRows::uniform(3, 2)); },
      {"2 query sequences and 3 memory sequences"});
}

}  // namespace
