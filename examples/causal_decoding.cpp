// SPDX-License-Identifier: MIT
// Causal decoding with a KV cache: one attention layer with rotary positions (RoPE, half-split
// layout as in GPT-NeoX / HF Llama) and grouped-query heads (8 query heads share 2 key/value
// heads, head width 16) generates 12 tokens one by one. At step t the new token x_t is projected,
//   q_t = R(t) W_q x_t  (H d),   k_t = R(t) W_k x_t  (H_kv d),   v_t = W_v x_t  (H_kv d),
// its k_t, v_t are appended to the cache, and
//   o_t = concat_h softmax(q_{t,h} K_{0..t,g}^T / sqrt(d)) V_{0..t,g},   g = h / (H / H_kv),
//   y_t = W_o o_t,   x_{t+1} = y_t / rms(y_t)   (the toy "model": its next input is its own
// output, RMS-normalized so that the features stay of order 1).
// The layer is an attend::MultiHeadAttention with a rotary embedding; attend::decode_step(layer,
// cache, x_t) does the projection, rotation at the cache's position, append, attention and
// out-projection of one step. Each step is checked against a full recomputation, the layer over
// the whole prefix x_0..x_t with a causal mask (rotary at positions 0..t), whose last row must
// equal the step's output. A second cache with a sliding window of 4 keys is checked the same
// way against the recomputation with the mask Window(3, 0) (each token sees itself and the 3
// before it).
#include <attend/attend.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <utility>

using attend::Index;
using attend::Matrix;

namespace {

constexpr Index kWidth = 32;    // E, the model width
constexpr Index kHeads = 8;     // H query heads
constexpr Index kKvHeads = 2;   // H_kv key/value heads: 4 query heads per group
constexpr Index kHeadDim = 16;  // d (queries, keys and values)
constexpr Index kSteps = 12;    // tokens generated
constexpr Index kWindow = 4;    // keys seen by each token in the sliding-window variant

// A (rows, cols) matrix with entries uniform in [-1/sqrt(cols), 1/sqrt(cols)] (nn.Linear's init).
Matrix<double> random_linear(Index rows, Index cols, std::mt19937& gen) {
  std::uniform_real_distribution<double> uniform(-1 / std::sqrt(double(cols)), 1 / std::sqrt(double(cols)));
  Matrix<double> w(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) w(i, j) = uniform(gen);
  return w;
}

// Max |a - b| over all entries; NaN if either holds a NaN (so a NaN fails every `<=` check).
double max_abs_diff(const Matrix<double>& a, const Matrix<double>& b) {
  const Matrix<double> d = (a - b).cwiseAbs();
  return d.hasNaN() ? NAN : d.maxCoeff();
}

}  // namespace

int main() {
  std::mt19937 gen(2024);
  attend::MultiHeadWeights<double> weights;  // nn.Linear layout (out_features, in_features), no biases
  weights.q_proj_weight = random_linear(kHeads * kHeadDim, kWidth, gen);    // (H d, E)
  weights.k_proj_weight = random_linear(kKvHeads * kHeadDim, kWidth, gen);  // (H_kv d, E)
  weights.v_proj_weight = random_linear(kKvHeads * kHeadDim, kWidth, gen);  // (H_kv d, E)
  weights.out_proj_weight = random_linear(kWidth, kHeads * kHeadDim, gen);  // (E, H d)
  attend::MultiHeadAttention<double> layer(kHeads, std::move(weights), kKvHeads);
  attend::RotaryOptions rotary;
  rotary.layout = attend::RotaryLayout::HalfSplit;  // pair i = (x_i, x_{i + d/2}) in each head
  layer.set_rotary(attend::RotaryEmbedding<double>(kHeadDim, rotary));

  // One cache per layer: K (capacity, H_kv d) and V (capacity, H_kv d), one token per row.
  attend::KVCache<double> cache(layer, kSteps);
  attend::KVCache<double> window_cache(layer, 2 * kWindow, kWindow);  // keeps the last w - 1 rows before an append

  Matrix<double> inputs(kSteps, kWidth);  // (T, E) row t = x_t, kept only for the recomputation
  inputs.row(0) = random_linear(1, kWidth, gen);
  bool ok = true;
  std::printf("step  cache rows  |decode - full|  window rows  |window decode - full|\n");
  for (Index t = 0; t < kSteps; ++t) {
    // Incremental: project the one new token at position cache.position() = t, rotate its q and
    // k, append its k and v, attend over the cache, out-project: y_t (1, E).
    const Matrix<double> y = attend::decode_step(layer, cache, inputs.row(t));
    const Matrix<double> y_window = attend::decode_step(layer, window_cache, inputs.row(t));

    // Full recomputation over the prefix 0..t: the layer over the whole prefix (rotary at
    // positions 0..t) with a causal mask, or a window of w - 1 keys back. Its last row is token t.
    const auto prefix = inputs.topRows(t + 1);
    const Matrix<double> full = layer.forward(prefix, attend::Causal()).output;
    const Matrix<double> full_window = layer.forward(prefix, attend::Window(kWindow - 1, 0)).output;

    const double diff = max_abs_diff(y, full.bottomRows(1));
    const double window_diff = max_abs_diff(y_window, full_window.bottomRows(1));
    ok = ok && diff <= 1e-12 && window_diff <= 1e-12;  // false for NaN too
    std::printf("%4ld  %10ld  %14.3e  %11ld  %21.3e\n", long(t), long(cache.size()), diff, long(window_cache.size()),
                window_diff);

    // The toy model's next input: its own output y_t, scaled to root-mean-square 1.
    if (t + 1 < kSteps) inputs.row(t + 1) = y / std::sqrt(y.squaredNorm() / double(kWidth));
  }
  std::printf("last input, first 4 features: %.6f %.6f %.6f %.6f\n", inputs(kSteps - 1, 0), inputs(kSteps - 1, 1),
              inputs(kSteps - 1, 2), inputs(kSteps - 1, 3));
  std::printf("every step within 1e-12 of the full recomputation: %s\n", ok ? "checks passed" : "CHECKS FAILED");
  return ok ? 0 : 1;
}
