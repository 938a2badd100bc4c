// SPDX-License-Identifier: MIT
// Attention on bf16 and f16 activations, as a bf16 model runs it: 8 heads of (L, 8 d) matrices
// in bfloat16 and half, computed with float accumulation, against the same attention in double
// on the same rounded inputs. Prints the error of each output format and the bytes the inputs
// take; fails if an error is not within the rounding of the output plus a small margin. Then a
// bf16 MultiHeadAttention layer (weights in bf16, as a checkpoint holds them) runs a prompt
// through forward and decodes over a bf16 KV cache, against the same layer in double.
#include <attend/attend.hpp>

#include <chrono>
#include <cmath>
#include <iostream>

namespace {

constexpr attend::Index kLength = 1024, kHeads = 8, kDim = 64;

/// Largest |a - b| over all entries, in double.
template <class A, class B>
double max_error(const A& a, const B& b) {
  return (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
}

/// Runs the format S: returns false when its error exceeds the bound.
template <class S>
bool run(const char* name, const attend::Matrix<float>& q, const attend::Matrix<float>& k,
         const attend::Matrix<float>& v) {
  // The model's activations, rounded once to S (half the bytes of float).
  const attend::Matrix<S> q_s = q.cast<S>(), k_s = k.cast<S>(), v_s = v.cast<S>();
  // The exact answer for these rounded inputs, computed in double.
  const attend::Matrix<double> exact = attend::multi_head_attention(
      q_s.template cast<float>().template cast<double>(), k_s.template cast<float>().template cast<double>(),
      v_s.template cast<float>().template cast<double>(), kHeads, attend::Causal());

  const auto start = std::chrono::steady_clock::now();
  const attend::Matrix<S> out = attend::multi_head_attention(q_s, k_s, v_s, kHeads, attend::Causal());
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  // A float output of the same inputs: no rounding at the end.
  attend::Matrix<float> out_float(kLength, kHeads * kDim);
  for (attend::Index h = 0; h < kHeads; ++h)
    attend::scaled_dot_product_attention_into(q_s.middleCols(h * kDim, kDim), k_s.middleCols(h * kDim, kDim),
                                              v_s.middleCols(h * kDim, kDim), out_float.middleCols(h * kDim, kDim),
                                              attend::Causal());

  // Rounding an output in [-1, 1] to S costs at most half a unit in the last place: 2^-9 for
  // bf16, 2^-12 for half. The AVX512-BF16 kernels also round each weight p to bf16 before P V
  // (8 significant bits: at most 2^-8 of each weight, so 2^-8 max|v| in the output, usually far
  // less); float accumulation adds ~1e-6.
  const bool bf16 = std::is_same_v<S, Eigen::bfloat16>;
  const double half_ulp = std::ldexp(1.0, bf16 ? -9 : -12), weights = bf16 ? std::ldexp(1.0, -8) : 0.0;
  const double err = max_error(out, exact), err_float = max_error(out_float, exact);
  std::cout << name << ": inputs " << 3 * q_s.size() * attend::Index(sizeof(S)) / 1024 << " KiB, " << ms
            << " ms; max error " << err << " with a " << name << " output (half an ulp: " << half_ulp << "), "
            << err_float << " with a float output\n";
  return err <= half_ulp + weights + 1e-5 && err_float <= weights + 1e-5;
}

/// Random nn.Linear weights (out, in) of unit-variance outputs, rounded to bf16.
attend::Matrix<Eigen::bfloat16> linear_weight(attend::Index out, attend::Index in) {
  const attend::Matrix<float> w = attend::Matrix<float>::Random(out, in) * std::sqrt(3.0f / float(in));
  return w.cast<Eigen::bfloat16>();
}

/// A bf16 layer: E = 256, 8 query heads on 2 key/value heads of 32, biases, rotary. Each stage
/// (projection, rotary, attention, output projection) accumulates in float and rounds to bf16
/// once, as PyTorch runs a bf16 module. Returns false when an error exceeds the bound.
bool run_layer() {
  using bf16 = Eigen::bfloat16;
  constexpr attend::Index e = 256, heads = 8, kv_heads = 2, d = 32, prompt = 48, steps = 16;
  const auto bias = [](attend::Index n) { return attend::Vector<float>::Random(n).cast<bf16>().eval(); };
  const attend::MultiHeadWeights<bf16> weights{
      linear_weight(heads * d, e), linear_weight(kv_heads * d, e), linear_weight(kv_heads * d, e),
      linear_weight(e, heads * d), bias(heads * d),                bias(kv_heads * d),
      bias(kv_heads * d),          bias(e)};
  attend::MultiHeadAttention<bf16> layer(heads, weights, kv_heads);
  layer.set_rotary(attend::RotaryEmbedding<float>(d));  // a bf16 layer rotates in float
  const attend::Matrix<bf16> x = attend::Matrix<float>::Random(prompt + steps, e).cast<bf16>();

  // The same layer in double, on the same bf16 weights and inputs.
  const auto wide = [](const auto& m) { return m.template cast<float>().template cast<double>().eval(); };
  attend::MultiHeadAttention<double> exact_layer(
      heads,
      {wide(weights.q_proj_weight), wide(weights.k_proj_weight), wide(weights.v_proj_weight),
       wide(weights.out_proj_weight), wide(weights.q_proj_bias), wide(weights.k_proj_bias), wide(weights.v_proj_bias),
       wide(weights.out_proj_bias)},
      kv_heads);
  exact_layer.set_rotary(attend::RotaryEmbedding<double>(d));
  const attend::Matrix<double> exact = exact_layer.forward(wide(x), attend::Causal()).output;

  // The prompt through forward; then the same prompt as one chunk into a bf16 KV cache, and
  // the next tokens one at a time (each step projects, rotates at its position, appends, attends).
  const attend::Matrix<bf16> out = layer.forward(x.topRows(prompt), attend::Causal()).output;
  attend::KVCache<bf16> cache(layer, prompt + steps);
  attend::Matrix<bf16> decoded(prompt + steps, e);
  decoded.topRows(prompt) = attend::decode_step(layer, cache, x.topRows(prompt));
  for (attend::Index t = prompt; t < prompt + steps; ++t)
    decoded.row(t) = attend::decode_step(layer, cache, x.middleRows(t, 1));

  // Four bf16 roundings on the way (2^-9 relative each) with gains of order 1 between them:
  // within 1% of the largest output (0.34% here).
  const double largest = exact.cwiseAbs().maxCoeff(), bound = 0.01 * largest;
  const double err = max_error(out, exact.topRows(prompt)), err_decoded = max_error(decoded, exact);
  std::cout << "bf16 layer (E=" << e << ", " << heads << " heads on " << kv_heads << ", rotary): forward max error "
            << err << ", decode " << err_decoded << " (largest output " << largest << ", bound " << bound << ")\n";
  return err <= bound && err_decoded <= bound;
}

}  // namespace

int main() {
  // Unit-scale activations, one token per row, 8 heads side by side.
  const attend::Matrix<float> q = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  const attend::Matrix<float> k = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  const attend::Matrix<float> v = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  std::cout << "float inputs: " << 3 * q.size() * attend::Index(sizeof(float)) / 1024 << " KiB\n";
  const bool bf16_ok = run<Eigen::bfloat16>("bf16", q, k, v);
  const bool f16_ok = run<Eigen::half>("f16", q, k, v);
  const bool layer_ok = run_layer();
  return bf16_ok && f16_ok && layer_ok ? 0 : 1;
}
