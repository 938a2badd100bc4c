// SPDX-License-Identifier: MIT
// Attention on bf16 and f16 activations, as a bf16 model runs it: 8 heads of (L, 8 d) matrices
// in bfloat16 and half, computed with float accumulation, against the same attention in double
// on the same rounded inputs. Prints the error of each output format and the bytes the inputs
// take; fails if an error is not within the rounding of the output plus a small margin.
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

}  // namespace

int main() {
  // Unit-scale activations, one token per row, 8 heads side by side.
  const attend::Matrix<float> q = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  const attend::Matrix<float> k = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  const attend::Matrix<float> v = attend::Matrix<float>::Random(kLength, kHeads * kDim);
  std::cout << "float inputs: " << 3 * q.size() * attend::Index(sizeof(float)) / 1024 << " KiB\n";
  const bool ok = run<Eigen::bfloat16>("bf16", q, k, v) & run<Eigen::half>("f16", q, k, v);
  return ok ? 0 : 1;
}
