// SPDX-License-Identifier: MIT
// The same entry points, compiled twice (tests/precompiled/CMakeLists.txt): once header-only,
// once against attend::precompiled (extern templates). Each build prints one line per result:
// its name, its size and an FNV-1a hash of its bytes; the test requires the two outputs to be
// identical, i.e. the precompiled cores give bitwise the header-only results.
#include <attend/attend.hpp>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(ATTEND_EXPECT_PRECOMPILED) && !defined(ATTEND_EXTERN_TEMPLATES)
#error "linking attend::precompiled must define ATTEND_EXTERN_TEMPLATES"
#endif

namespace {

using attend::Index;
using attend::Matrix;

/// A deterministic matrix with entries in [-1, 1) that differ from row to row and column to column.
template <class T>
Matrix<T> filled(Index rows, Index cols, int seed) {
  Matrix<T> m(rows, cols);
  std::uint32_t state = 2654435761u * std::uint32_t(seed + 1);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      state = state * 1664525u + 1013904223u;
      m(i, j) = T(double(state >> 8) / double(1u << 23) - 1.0);
    }
  return m;
}

template <class D>
void print(const std::string& name, const Eigen::DenseBase<D>& result) {
  const Matrix<typename D::Scalar> values = result;
  std::uint64_t hash = 14695981039346656037ull;
  const auto* bytes = reinterpret_cast<const unsigned char*>(values.data());
  for (std::size_t i = 0; i < std::size_t(values.size()) * sizeof(typename D::Scalar); ++i)
    hash = (hash ^ bytes[i]) * 1099511628211ull;
  std::printf("%s %ldx%ld %016llx\n", name.c_str(), long(values.rows()), long(values.cols()),
              static_cast<unsigned long long>(hash));
}

/// Every precompiled path of one scalar type (extern_templates.hpp lists them).
template <class T>
void run(const char* scalar) {
  const std::string prefix = std::string(scalar) + " ";
  const Index lq = 37, lk = 45, d = 16;
  const Matrix<T> q = filled<T>(lq, d, 1), k = filled<T>(lk, d, 2), v = filled<T>(lk, d, 3);
  const attend::BoolMatrix visible = (filled<T>(lq, lk, 4).array() > T(-0.5)).matrix();
  const Matrix<T> bias = filled<T>(lq, lk, 5);
  for (const attend::Algorithm algorithm : {attend::Algorithm::Materialized, attend::Algorithm::Blocked}) {
    attend::AttentionOptions options;
    options.algorithm = algorithm;
    options.block_q = 16;
    options.block_k = 16;
    const std::string path = prefix + (algorithm == attend::Algorithm::Blocked ? "blocked " : "materialized ");
    print(path + "none", attend::scaled_dot_product_attention(q, k, v, attend::NoMask(), options));
    print(path + "causal", attend::scaled_dot_product_attention(q, k, v, attend::Causal(), options));
    print(path + "window", attend::scaled_dot_product_attention(q, k, v, attend::Window(5, 2), options));
    print(path + "padding", attend::scaled_dot_product_attention(q, k, v, attend::KeyPadding(30), options));
    print(path + "boolean", attend::scaled_dot_product_attention(q, k, v, attend::BooleanMask(visible), options));
    print(path + "additive", attend::scaled_dot_product_attention(q, k, v, attend::AdditiveMask<T>(bias), options));
    print(path + "lse", attend::scaled_dot_product_attention_with_lse(q, k, v, attend::Causal(), options).lse);
    const Matrix<T> d_out = filled<T>(lq, d, 13);
    const auto backward = [&](const std::string& name, const auto& mask) {
      const attend::AttentionResult<T> f = attend::scaled_dot_product_attention_with_lse(q, k, v, mask, options);
      const attend::AttentionGradients<T> g =
          attend::scaled_dot_product_attention_backward(q, k, v, f, d_out, mask, options);
      print(path + "backward " + name + " dq", g.dq);
      print(path + "backward " + name + " dk", g.dk);
      print(path + "backward " + name + " dv", g.dv);
    };
    backward("causal", attend::Causal());
    backward("additive", attend::AdditiveMask<T>(bias));
    Matrix<T> d_bias;
    attend::BiasGradients<T> request;
    request.d_bias = &d_bias;
    const attend::AttentionResult<T> f =
        attend::scaled_dot_product_attention_with_lse(q, k, v, attend::AdditiveMask<T>(bias), options);
    attend::scaled_dot_product_attention_backward(q, k, v, f, d_out, attend::AdditiveMask<T>(bias), options, request);
    print(path + "backward additive d_bias", d_bias);
  }
  print(prefix + "weights", attend::scaled_dot_product_attention_with_weights(q, k, v, attend::Causal()).weights);

  // A small model: projections with rotary, causal forward with per-head weights, a decode loop.
  const Index e = 32, heads = 4, kv_heads = 2, length = 20;
  attend::MultiHeadWeights<T> weights{filled<T>(e, e, 6),
                                      filled<T>(e / 2, e, 7),
                                      filled<T>(e / 2, e, 8),
                                      filled<T>(e, e, 9),
                                      filled<T>(e, 1, 10),
                                      {},
                                      {},
                                      filled<T>(e, 1, 11)};
  attend::MultiHeadAttention<T> layer(heads, weights, kv_heads);
  layer.set_rotary(attend::RotaryEmbedding<T>(e / heads));
  const Matrix<T> x = filled<T>(length, e, 12);
  attend::MultiHeadOptions need_weights;
  need_weights.need_weights = attend::NeedWeights::PerHead;
  const attend::MultiHeadResult<T> forward = layer.forward(x, attend::Causal(), need_weights);
  print(prefix + "multi-head forward", forward.output);
  for (std::size_t h = 0; h < forward.weights.size(); ++h)
    print(prefix + "multi-head weights " + std::to_string(h), forward.weights[h]);
  attend::KVCache<T> cache(layer, length);
  Matrix<T> decoded(length, e);
  for (Index t = 0; t < length; ++t) decoded.row(t) = attend::decode_step(layer, cache, x.row(t));
  print(prefix + "decode", decoded);
  const std::vector<Matrix<T>> batch = layer.forward_batch({x, x.topRows(7)}, {}, attend::Causal(), {15, 5});
  print(prefix + "batch 0", batch[0]);
  print(prefix + "batch 1", batch[1]);
  const attend::MultiHeadTrainingForward<T> trained = attend::multi_head_layer_forward(layer, x, attend::Causal());
  const attend::MultiHeadLayerGradients<T> grads =
      attend::multi_head_layer_backward(layer, trained.context, filled<T>(length, e, 14), attend::Causal());
  print(prefix + "layer backward d_input", grads.d_input());
  print(prefix + "layer backward d_q_proj_weight", grads.weights.q_proj_weight);
}

}  // namespace

int main() {
  run<float>("float");
  run<double>("double");
}
