// SPDX-License-Identifier: MIT
// One step of a Bahdanau decoder: the decoder state attends over the encoder states of a toy
// five-word source sentence with additive attention,
//   e_j = v^T tanh(W_q s + W_k h_j + b),   a = softmax(e),   context = sum_j a_j h_j,
// then prints the weights and the context. The checks at the end redo both by hand: the weights
// sum to 1 and the context is the weighted sum of the encoder states.
#include <attend/attend.hpp>

#include <cmath>
#include <iostream>

int main() {
  using attend::Matrix;
  using attend::Vector;

  // Encoder states h_j (one source word per row, 4 features) and the decoder state s (3 features).
  Matrix<double> encoder(5, 4);
  encoder << 0.9, 0.1, 0.0, 0.3,  // "the"
      0.1, 0.8, 0.2, 0.0,         // "cat"
      0.0, 0.3, 0.9, 0.1,         // "sat"
      0.2, 0.0, 0.1, 0.9,         // "on"
      0.5, 0.5, 0.5, 0.5;         // "mats"
  Matrix<double> decoder_state(1, 3);
  decoder_state << 0.2, 1.0, -0.4;

  // Parameters in nn.Linear layout: W_q (h x 3), W_k (h x 4), b (h), v (h), with h = 2.
  Matrix<double> w_query(2, 3), w_key(2, 4);
  w_query << 0.5, 1.0, 0.0,  //
      -0.3, 0.2, 0.8;
  w_key << 0.1, 1.5, -0.2, 0.0,  //
      0.4, -0.1, 0.3, 1.2;
  Vector<double> v(2), bias(2);
  v << 1.0, -0.5;
  bias << 0.1, 0.0;
  const attend::AdditiveAttention<double> attention(w_query, w_key, v, bias);

  // The encoder states are both the keys and the values.
  const auto result = attention.forward_with_weights(decoder_state, encoder, encoder);
  std::cout << "attention weights over the source words:\n" << result.weights << "\n\n";
  std::cout << "context vector:\n" << result.output << "\n\n";

  // Check 1: the weights are a distribution.
  const double total = result.weights.sum();
  // Check 2: each score by hand, its softmax, and the weighted sum of encoder states.
  Vector<double> scores(5);
  for (int j = 0; j < 5; ++j) {
    const Vector<double> pre =
        w_query * decoder_state.row(0).transpose() + w_key * encoder.row(j).transpose() + bias;
    scores(j) = v.dot(pre.array().tanh().matrix());
  }
  Vector<double> by_hand(5);
  for (int j = 0; j < 5; ++j) by_hand(j) = std::exp(scores(j) - scores.maxCoeff());
  by_hand /= by_hand.sum();
  const Matrix<double> context_by_hand = by_hand.transpose() * encoder;
  std::cout << "sum of weights: " << total << "\n";
  std::cout << "weights by hand:\n" << by_hand.transpose() << "\n";
  std::cout << "context by hand:\n" << context_by_hand << "\n";

  const bool ok = std::fabs(total - 1) < 1e-12 && (result.weights.row(0) - by_hand.transpose()).norm() < 1e-12 &&
                  (result.output - context_by_hand).norm() < 1e-12;
  std::cout << (ok ? "checks passed" : "CHECKS FAILED") << "\n";
  return ok ? 0 : 1;
}
