// SPDX-License-Identifier: MIT
// benchmarks/compile_time.sh: a small model's translation unit. A MultiHeadAttention layer with
// a rotary embedding runs a causal forward pass, then decodes the same tokens one by one over a
// KVCache; it prints the largest difference between the two (a rounding error).
#include <attend/attend.hpp>

#include <cstdio>

int main() {
  using attend::Index;
  using attend::Matrix;
  const Index width = 64, heads = 4, length = 32;
  const attend::MultiHeadWeights<float> weights{Matrix<float>::Random(width, width),
                                                Matrix<float>::Random(width, width),
                                                Matrix<float>::Random(width, width),
                                                Matrix<float>::Random(width, width),
                                                {},
                                                {},
                                                {},
                                                {}};
  attend::MultiHeadAttention<float> layer(heads, weights);
  layer.set_rotary(attend::RotaryEmbedding<float>(width / heads));
  const Matrix<float> x = Matrix<float>::Random(length, width);
  const Matrix<float> y = layer.forward(x, attend::Causal()).output;  // (length, width)
  attend::KVCache<float> cache(layer, length);
  Matrix<float> decoded(length, width);
  for (Index t = 0; t < length; ++t) decoded.row(t) = attend::decode_step(layer, cache, x.row(t));
  std::printf("%g\n", double((y - decoded).cwiseAbs().maxCoeff()));
}
