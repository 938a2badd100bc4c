// SPDX-License-Identifier: MIT
// A user's translation unit built with the strictest common warning set, -Werror, and attend as
// an ordinary (non-system) include path, so every warning inside attend's headers counts: it
// calls each public entry point family once, for float and for double (the build check
// build_strict_warnings; compiling is the test, which compiles it as object files and links
// nothing: main is a smoke check for anyone who builds it as a program).
#include <attend/attend.hpp>

#include <cstdio>
#include <type_traits>
#include <vector>

namespace {

template <class T>
int exercise() {
  using attend::Index;
  using attend::Matrix;
  using attend::Vector;
  constexpr Index kLength = 70, kDim = 8, kHeads = 2, kKvHeads = 1;
  const Matrix<T> q = Matrix<T>::Random(kLength, kDim), k = Matrix<T>::Random(kLength, kDim),
                  v = Matrix<T>::Random(kLength, kDim), d_out = Matrix<T>::Random(kLength, kDim);
  attend::AttentionOptions blocked;
  blocked.algorithm = attend::Algorithm::Blocked;
  blocked.block_q = 16;
  blocked.block_k = 32;
  const attend::BoolMatrix visible = attend::BoolMatrix::Ones(kLength, kLength);
  const Matrix<T> bias = Matrix<T>::Zero(kLength, kLength);
  const Vector<T> buckets = Vector<T>::LinSpaced(32, 0, 1);

  // The dot family, both paths, masks and biases.
  Matrix<T> out = attend::scaled_dot_product_attention(q, k, v, attend::Causal(), blocked);
  out += attend::scaled_dot_product_attention(q, k, v, attend::Window(4, 4) & attend::KeyPadding(60));
  out += attend::scaled_dot_product_attention_with_lse(q, k, v, attend::Alibi(0.5) & attend::Causal(), blocked).output;
  out += attend::scaled_dot_product_attention_with_weights(q, k, v, attend::BooleanMask(visible)).output;
  out += attend::scaled_dot_product_attention(q, k, v, attend::AdditiveMask(bias), blocked);
  out += attend::scaled_dot_product_attention(q, k, v, attend::RelativePositionBias<T>(buckets));
  out += attend::dot_product_attention(q, k, v);
  out += attend::bilinear_attention(q, k, v, Matrix<T>::Identity(kDim, kDim), attend::NoMask(), blocked);
  out += attend::cosine_attention(q, k, v, 0.5);
  out += attend::soft_capped_attention(q, k, v, 30.0, attend::Causal(), blocked);
  out += attend::local_window_attention(q, k, v, attend::sliding_window(8));
  out += attend::top_k_attention(q, k, v, 4) + attend::hard_attention(q, k, v);
  out += attend::AdditiveAttention<T>(Matrix<T>::Random(6, kDim), Matrix<T>::Random(6, kDim), Vector<T>::Random(6))
             .forward(q, k, v, attend::Causal(), blocked);

  // Softmax, batched and multi-head calls, projections, positions.
  Matrix<T> scores = q * k.transpose();
  attend::softmax_rows_inplace<T>(scores);
  out += attend::batched_attention(q, k, v, attend::BatchLayout{kHeads, 2}, attend::Causal(), blocked);
  out += attend::multi_head_attention(q, k.leftCols(kDim / kHeads), v.leftCols(kDim / kHeads), kHeads);
  Matrix<T> x = q;
  attend::add_sinusoidal_encoding(x);
  const attend::RotaryEmbedding<T> rope(kDim / kHeads);
  rope.apply(x, 3);
  attend::MultiHeadWeights<T> weights;
  weights.q_proj_weight = Matrix<T>::Random(kDim, kDim);
  weights.k_proj_weight = Matrix<T>::Random(kDim / kHeads, kDim);
  weights.v_proj_weight = Matrix<T>::Random(kDim / kHeads, kDim);
  weights.out_proj_weight = Matrix<T>::Random(kDim, kDim);
  attend::MultiHeadAttention<T> layer(kHeads, weights, kKvHeads);
  layer.set_rotary(rope);
  out += layer.forward(x, attend::Causal()).output;
  const attend::MultiHeadTrainingForward<T> trained = attend::multi_head_layer_forward(layer, x, attend::Causal());
  out += attend::multi_head_layer_backward(layer, trained.context, d_out, attend::Causal()).d_input();

  // Training: the backward of a masked call on both paths, of multi-head attention (GQA, with
  // a one-pass and a two-pass schedule alike) and of the whole layer.
  for (const attend::Algorithm algorithm : {attend::Algorithm::Blocked, attend::Algorithm::Materialized}) {
    attend::AttentionOptions path = blocked;
    path.algorithm = algorithm;
    const attend::AttentionResult<T> fwd =
        attend::scaled_dot_product_attention_with_lse(q, k, v, attend::Causal() & attend::Window(8, 0), path);
    out += attend::scaled_dot_product_attention_backward(q, k, v, fwd, d_out, attend::Causal() & attend::Window(8, 0),
                                                         path)
               .dq;
  }
  const Matrix<T> k_group = k.leftCols(kDim / kHeads), v_group = v.leftCols(kDim / kHeads);
  const attend::MultiHeadLseResult<T> heads = attend::multi_head_attention_with_lse(q, k_group, v_group, kHeads);
  out += attend::multi_head_attention_backward(q, k_group, v_group, kHeads, heads, d_out).dq;

  // Decoding: the layer over a KV cache, already projected rows, split-KV merges.
  attend::KVCache<T> cache(layer, kLength + 1);
  for (Index t = 0; t < 3; ++t) out.row(t) += attend::decode_step(layer, cache, x.row(t));
  Matrix<T> one(1, kDim);
  attend::decode_attention_into(q.topRows(1), k.leftCols(kDim / kHeads), v.leftCols(kDim / kHeads), kHeads, one);
  const auto a = attend::scaled_dot_product_attention_with_lse(q, k.topRows(30), v.topRows(30));
  const auto b = attend::scaled_dot_product_attention_with_lse(q, k.bottomRows(40), v.bottomRows(40));
  out += attend::merge_partials(a, b).output;
  out += attend::sinusoidal_encoding<T>(kLength, kDim);
  out.topRows(kDim) += attend::permute_rotary_weight(
      weights.q_proj_weight, kDim / kHeads, attend::RotaryLayout::Interleaved, attend::RotaryLayout::HalfSplit);
  return out.allFinite() && one.allFinite() ? 0 : 1;
}

/// A float layer decoding from caches in every reduced format S (bf16, half, q8_0), contiguous
/// and paged (their conversions on append are where GCC 12 once warned inside Eigen), and for
/// bf16 and half a layer in S (its projections round through attend's packet stores).
template <class S>
int exercise_cache_format() {
  using attend::Index;
  using attend::Matrix;
  constexpr Index kDim = 8, kHeads = 2, kKvHeads = 1;
  attend::MultiHeadWeights<float> weights;
  weights.q_proj_weight = Matrix<float>::Random(kDim, kDim);
  weights.k_proj_weight = Matrix<float>::Random(kDim / kHeads, kDim);
  weights.v_proj_weight = Matrix<float>::Random(kDim / kHeads, kDim);
  weights.out_proj_weight = Matrix<float>::Random(kDim, kDim);
  const attend::MultiHeadAttention<float> layer(kHeads, weights, kKvHeads);
  const Matrix<float> x = Matrix<float>::Random(3, kDim);
  attend::KVCache<S> cache(layer, 8);
  attend::PagedKVCache<S> paged(layer, 4);
  const Index sequence = paged.add_sequence();
  const std::vector<Index> sequences{sequence};
  Matrix<float> out(3, kDim);
  for (Index t = 0; t < 3; ++t)
    out.row(t) = attend::decode_step(layer, cache, x.row(t)) +
                 attend::paged_decode_step(layer, paged, sequences, attend::SequenceRows::packed(std::vector<Index>{0, 1}), x.row(t));
  if constexpr (!std::is_same_v<S, attend::Q8_0>) {
    attend::MultiHeadWeights<S> reduced;
    reduced.q_proj_weight = weights.q_proj_weight.template cast<S>();
    reduced.k_proj_weight = weights.k_proj_weight.template cast<S>();
    reduced.v_proj_weight = weights.v_proj_weight.template cast<S>();
    reduced.out_proj_weight = weights.out_proj_weight.template cast<S>();
    const attend::MultiHeadAttention<S> reduced_layer(kHeads, reduced, kKvHeads);
    out += reduced_layer.forward(x.template cast<S>()).output.template cast<float>();
  }
  return out.allFinite() ? 0 : 1;
}

}  // namespace

int main() {
  const int failures = exercise<float>() + exercise<double>() + exercise_cache_format<Eigen::bfloat16>() +
                       exercise_cache_format<Eigen::half>() + exercise_cache_format<attend::Q8_0>();
  std::printf("strict consumer: %s\n", failures == 0 ? "finite" : "non-finite output");
  return failures;
}
