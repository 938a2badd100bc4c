// SPDX-License-Identifier: MIT
// One Transformer encoder layer, post-norm as in "Attention Is All You Need" (and d2l.ai), run on
// a padded batch. With X (L, E) one sequence, one token per row:
//   X0 = embeddings + PE                        sinusoidal positions, PE(p, 2i) = sin(p / 10000^(2i/E)), ...
//   X1 = LayerNorm(X0 + MHA(X0))                multi-head self attention, H = 4 heads of width E / H
//   Y  = LayerNorm(X1 + FFN(X1))                FFN(x) = W_2 ReLU(W_1 x + b_1) + b_2, hidden width F
//   LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) per row (its gain and bias, 1 and 0 at
//   initialization, are left out).
// Three sequences of lengths 5, 3 and 7 are padded to 7 rows; key padding per sequence keeps the
// padded tokens out of every attention. Checks: (a) filling the padding with NaN leaves every real
// token's output bit for bit unchanged, so the padding is never read (a read, even with weight 0,
// would spread the NaN: 0 * NaN = NaN); (b) the output rows have mean 0 and variance ~1;
// (c) the padded batch equals each sequence run alone, unpadded.
#include <attend/attend.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

using attend::Index;
using attend::Matrix;
using attend::Vector;

namespace {

constexpr Index kWidth = 16;   // E, the model width
constexpr Index kHeads = 4;    // H
constexpr Index kHidden = 32;  // F, the feed-forward width

// A (rows, cols) matrix uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)] (nn.Linear's init); a
// (rows, 1) one converts to a bias Vector.
Matrix<double> random_linear(Index rows, Index cols, Index fan_in, std::mt19937& gen) {
  std::uniform_real_distribution<double> uniform(-1 / std::sqrt(double(fan_in)), 1 / std::sqrt(double(fan_in)));
  Matrix<double> w(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) w(i, j) = uniform(gen);
  return w;
}

// Each row of x normalized to mean 0 and variance 1 (the biased variance, as in nn.LayerNorm).
Matrix<double> layer_norm(const Matrix<double>& x, double eps = 1e-5) {
  const Vector<double> mean = x.rowwise().mean();                       // (L)
  const Matrix<double> centered = x.colwise() - mean;                   // (L, E)
  const Vector<double> var = centered.rowwise().squaredNorm() / double(x.cols());  // (L)
  return (var.array() + eps).rsqrt().matrix().asDiagonal() * centered;
}

// y = x W^T + b (nn.Linear): x (L, in), W (out, in), b (out) -> (L, out).
Matrix<double> linear(const Matrix<double>& x, const Matrix<double>& w, const Vector<double>& b) {
  Matrix<double> y = x * w.transpose();
  y.rowwise() += b.transpose();
  return y;
}

// Max |a - b| over all entries; NaN if either holds a NaN.
double max_abs_diff(const Matrix<double>& a, const Matrix<double>& b) {
  const Matrix<double> d = (a - b).cwiseAbs();
  return d.hasNaN() ? NAN : d.maxCoeff();
}

struct EncoderLayer {
  attend::MultiHeadAttention<double> attention;  // PyTorch nn.MultiheadAttention(E, H) weights
  Matrix<double> w1, w2;                         // (F, E), (E, F) in nn.Linear layout
  Vector<double> b1, b2;                         // (F), (E)

  // X1 = LN(X0 + attended), Y = LN(X1 + FFN(X1)); x0 and attended (L, E). Row-wise after attention.
  Matrix<double> add_norm_ffn(const Matrix<double>& x0, const Matrix<double>& attended) const {
    const Matrix<double> x1 = layer_norm(x0 + attended);           // (L, E)
    const Matrix<double> hidden = linear(x1, w1, b1).cwiseMax(0.0);  // (L, F), ReLU
    return layer_norm(x1 + linear(hidden, w2, b2));                  // (L, E)
  }

  // One unpadded sequence x0 (L, E): plain self attention.
  Matrix<double> forward(const Matrix<double>& x0) const { return add_norm_ffn(x0, attention.forward(x0).output); }

  // A padded batch: sequence s has rows [0, lengths[s]) real, the rest padding; keys from row
  // lengths[s] on are masked (KeyPadding), and the padded output rows are to be ignored.
  std::vector<Matrix<double>> forward_batch(const std::vector<Matrix<double>>& x0,
                                            const std::vector<Index>& lengths) const {
    const std::vector<Matrix<double>> attended = attention.forward_batch(x0, {}, attend::NoMask(), lengths);
    std::vector<Matrix<double>> y;
    for (std::size_t s = 0; s < x0.size(); ++s) y.push_back(add_norm_ffn(x0[s], attended[s]));
    return y;
  }
};

}  // namespace

int main() {
  // Weights drawn one statement at a time, so the draws happen in a fixed order.
  std::mt19937 gen(7);
  const Matrix<double> in_proj_weight = random_linear(3 * kWidth, kWidth, kWidth, gen);  // (3E, E) = [W_q; W_k; W_v]
  const Vector<double> in_proj_bias = random_linear(3 * kWidth, 1, kWidth, gen);         // (3E)
  const Matrix<double> out_proj_weight = random_linear(kWidth, kWidth, kWidth, gen);     // (E, E)
  const Vector<double> out_proj_bias = random_linear(kWidth, 1, kWidth, gen);            // (E)
  const Matrix<double> w1 = random_linear(kHidden, kWidth, kWidth, gen);                 // (F, E)
  const Vector<double> b1 = random_linear(kHidden, 1, kWidth, gen);                      // (F)
  const Matrix<double> w2 = random_linear(kWidth, kHidden, kHidden, gen);                // (E, F)
  const Vector<double> b2 = random_linear(kWidth, 1, kHidden, gen);                      // (E)
  const EncoderLayer layer{attend::MultiHeadAttention<double>::from_packed(kHeads, in_proj_weight, in_proj_bias,
                                                                           out_proj_weight, out_proj_bias),
                           w1, w2, b1, b2};

  // The batch: random token embeddings, padded with zero rows to the longest length, plus positions.
  const std::vector<Index> lengths{5, 3, 7};
  const Index padded_length = *std::max_element(lengths.begin(), lengths.end());
  std::normal_distribution<double> normal;
  std::vector<Matrix<double>> batch;  // B matrices (padded_length, E)
  for (const Index length : lengths) {
    Matrix<double> x = Matrix<double>::Zero(padded_length, kWidth);
    for (Index i = 0; i < length; ++i)
      for (Index j = 0; j < kWidth; ++j) x(i, j) = normal(gen);
    attend::add_sinusoidal_encoding<double>(x);  // row r gets PE(r, :)
    batch.push_back(x);
  }

  const std::vector<Matrix<double>> out = layer.forward_batch(batch, lengths);
  std::printf("batch of %zu sequences, lengths %ld %ld %ld padded to %ld; output of each: (%ld x %ld)\n", out.size(),
              long(lengths[0]), long(lengths[1]), long(lengths[2]), long(padded_length), long(out[0].rows()),
              long(out[0].cols()));
  for (std::size_t s = 0; s < out.size(); ++s)
    std::printf("sequence %zu, token 0, features 0..3: %9.6f %9.6f %9.6f %9.6f\n", s, out[s](0, 0), out[s](0, 1),
                out[s](0, 2), out[s](0, 3));

  // (a) NaN padding; (b) statistics of the real rows; (c) each sequence alone, unpadded.
  std::vector<Matrix<double>> poisoned = batch;
  for (std::size_t s = 0; s < batch.size(); ++s)
    poisoned[s].bottomRows(padded_length - lengths[s]).setConstant(std::numeric_limits<double>::quiet_NaN());
  const std::vector<Matrix<double>> out_poisoned = layer.forward_batch(poisoned, lengths);
  bool ok = true;
  std::printf("sequence  (a) |change| with NaN padding  (b) max |mean|  max |var - 1|  (c) |batch - alone|\n");
  for (std::size_t s = 0; s < batch.size(); ++s) {
    const Index length = lengths[s];
    const Matrix<double> real = out[s].topRows(length);  // (length, E), the real tokens
    const double padding_diff = max_abs_diff(out_poisoned[s].topRows(length), real);
    const Vector<double> mean = real.rowwise().mean();
    const Vector<double> var = (real.colwise() - mean).rowwise().squaredNorm() / double(kWidth);
    const double worst_mean = mean.cwiseAbs().maxCoeff(), worst_var = (var.array() - 1).abs().maxCoeff();
    const double alone_diff = max_abs_diff(layer.forward(batch[s].topRows(length)), real);
    std::printf("%8zu  %27.3e  %16.3e  %13.3e  %19.3e\n", s, padding_diff, worst_mean, worst_var, alone_diff);
    // (a) bit for bit; (b) var = s^2 / (s^2 + eps) with eps = 1e-5; (c) a few roundings. NaN fails all.
    ok = ok && padding_diff == 0 && worst_mean <= 1e-12 && worst_var <= 1e-3 && alone_diff <= 1e-12;
  }
  std::printf("%s\n", ok ? "checks passed" : "CHECKS FAILED");
  return ok ? 0 : 1;
}
