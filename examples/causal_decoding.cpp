// SPDX-License-Identifier: MIT
// Causal decoding with a KV cache: one attention layer with rotary positions (RoPE, half-split
// layout as in GPT-NeoX / HF Llama) and grouped-query heads (8 query heads share 2 key/value
// heads, head width 16) generates 12 tokens one by one. At step t the new token x_t is projected,
//   q_t = R(t) W_q x_t  (H d),   k_t = R(t) W_k x_t  (H_kv d),   v_t = W_v x_t  (H_kv d),
// its k_t, v_t are appended to the cache, and
//   o_t = concat_h softmax(q_{t,h} K_{0..t,g}^T / sqrt(d)) V_{0..t,g},   g = h / (H / H_kv),
//   y_t = W_o o_t,   x_{t+1} = y_t / rms(y_t)   (the toy "model": its next input is its own
// output, RMS-normalized so that the features stay of order 1).
// Each step is checked against a full recomputation: causal multi-head attention over the whole
// prefix x_0..x_t with rotary applied at positions 0..t, whose last row must equal the step's
// output. A second cache with a sliding window of 4 keys is checked the same way against the
// full recomputation with the mask Window(3, 0) (each token sees itself and the 3 before it).
#include <attend/attend.hpp>

#include <cmath>
#include <cstdio>
#include <random>

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

// The layer's weights in nn.Linear layout (out_features, in_features), and its rotary embedding.
struct Layer {
  Matrix<double> w_q, w_k, w_v, w_o;  // (H d, E), (H_kv d, E), (H_kv d, E), (E, H d)
  attend::RotaryEmbedding<double> rope;

  // Projections of the tokens x (n, E) at positions first_position.. with rotary on q and k:
  // q (n, H d), k (n, H_kv d), v (n, H_kv d). The decode step and the recomputation share it.
  void project(const Matrix<double>& x, Index first_position, Matrix<double>& q, Matrix<double>& k,
               Matrix<double>& v) const {
    q = x * w_q.transpose();
    k = x * w_k.transpose();
    v = x * w_v.transpose();
    rope.apply(q, first_position);  // every head of row r turned by the angles of position first_position + r
    rope.apply(k, first_position);
  }
};

// Max |a - b| over all entries; NaN if either holds a NaN (so a NaN fails every `<=` check).
double max_abs_diff(const Matrix<double>& a, const Matrix<double>& b) {
  const Matrix<double> d = (a - b).cwiseAbs();
  return d.hasNaN() ? NAN : d.maxCoeff();
}

}  // namespace

int main() {
  std::mt19937 gen(2024);  // a braced initializer list draws its elements in order: W_q, W_k, W_v, W_o
  attend::RotaryOptions rotary;
  rotary.layout = attend::RotaryLayout::HalfSplit;  // pair i = (x_i, x_{i + d/2}) in each head
  const Layer layer{random_linear(kHeads * kHeadDim, kWidth, gen), random_linear(kKvHeads * kHeadDim, kWidth, gen),
                    random_linear(kKvHeads * kHeadDim, kWidth, gen), random_linear(kWidth, kHeads * kHeadDim, gen),
                    attend::RotaryEmbedding<double>(kHeadDim, rotary)};

  // One cache per layer: K (capacity, H_kv d) and V (capacity, H_kv d), one token per row.
  attend::KVCache<double> cache(kSteps, kKvHeads, kHeadDim);
  attend::KVCacheOptions windowed;
  windowed.window = kWindow;  // keeps only the last w - 1 rows before each append
  attend::KVCache<double> window_cache(2 * kWindow, kKvHeads, kHeadDim, windowed);

  Matrix<double> inputs(kSteps, kWidth);  // (T, E) row t = x_t, kept only for the recomputation
  inputs.row(0) = random_linear(1, kWidth, gen);
  bool ok = true;
  std::printf("step  cache rows  |decode - full|  window rows  |window decode - full|\n");
  for (Index t = 0; t < kSteps; ++t) {
    // Incremental: project the one new token at position t, append its k, v, attend over the cache.
    Matrix<double> q, k, v;
    layer.project(inputs.row(t), t, q, k, v);                                  // (1, H d), (1, H_kv d) x 2
    const Matrix<double> heads = attend::decode_step(cache, q, k, v, kHeads);  // (1, H d)
    const Matrix<double> windowed_heads = attend::decode_step(window_cache, q, k, v, kHeads);

    // Full recomputation over the prefix 0..t: rotary at positions 0..t, then causal attention
    // (square, so top-left and bottom-right alignment agree). Its last row is token t.
    Matrix<double> q_all, k_all, v_all;
    layer.project(inputs.topRows(t + 1), 0, q_all, k_all, v_all);  // (t+1, H d), (t+1, H_kv d) x 2
    const Matrix<double> full = attend::multi_head_attention(q_all, k_all, v_all, kHeads, attend::Causal());
    const Matrix<double> full_window =
        attend::multi_head_attention(q_all, k_all, v_all, kHeads, attend::Window(kWindow - 1, 0));  // w - 1 keys back

    const double diff = max_abs_diff(heads, full.bottomRows(1));
    const double window_diff = max_abs_diff(windowed_heads, full_window.bottomRows(1));
    ok = ok && diff <= 1e-12 && window_diff <= 1e-12;  // false for NaN too
    std::printf("%4ld  %10ld  %14.3e  %11ld  %21.3e\n", long(t), long(cache.size()), diff, long(window_cache.size()),
                window_diff);

    // The toy model's next input: its own output y_t, scaled to root-mean-square 1.
    const Matrix<double> y = heads * layer.w_o.transpose();  // (1, E)
    if (t + 1 < kSteps) inputs.row(t + 1) = y / std::sqrt(y.squaredNorm() / double(kWidth));
  }
  std::printf("last input, first 4 features: %.6f %.6f %.6f %.6f\n", inputs(kSteps - 1, 0), inputs(kSteps - 1, 1),
              inputs(kSteps - 1, 2), inputs(kSteps - 1, 3));
  std::printf("every step within 1e-12 of the full recomputation: %s\n", ok ? "checks passed" : "CHECKS FAILED");
  return ok ? 0 : 1;
}
