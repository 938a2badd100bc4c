// SPDX-License-Identifier: MIT
// One step of a Bahdanau decoder: the decoder state attends over the encoder states of a toy
// five-word source sentence with additive attention,
//   e_j = v^T tanh(W_q s + W_k h_j + b),   a = softmax(e),   context = sum_j a_j h_j,
// then prints the weights and the context. The checks redo both by hand: the weights sum to 1
// and the context is the weighted sum of the encoder states.
//
// Then the attention is trained on a toy alignment task (what Bahdanau attention learns in
// translation, where each target word attends to the source words it translates): at decoder
// step t the context must be encoder state t. W_q, W_k, v and b start random and follow the
// gradients of attend's backward (additive_attention_backward) under Adam; the learned weights
// form the diagonal alignment, printed at the end.
#include <attend/attend.hpp>

#include <cmath>
#include <iostream>
#include <random>

namespace {

using attend::Index;
using attend::Matrix;
using attend::Vector;

// Adam's update of one tensor with its two moments (step t from 1).
template <class W>
void adam(W& w, const W& grad, W& m, W& v, int t, double learning_rate) {
  m = 0.9 * m + 0.1 * grad;
  v = 0.999 * v + 0.001 * grad.cwiseProduct(grad);
  const double c1 = 1 - std::pow(0.9, t), c2 = 1 - std::pow(0.999, t);
  w.array() -= learning_rate * (m.array() / c1) / ((v.array() / c2).sqrt() + 1e-8);
}

// Trains additive attention to align decoder step t with source position t: the decoder state
// is t's sinusoidal encoding, the encoder states are random word features next to their own
// position's encoding, and the loss is the mean squared distance between the context at step t
// and encoder state t. Returns true when every step ends up attending to its own position.
bool train_alignment() {
  const Index length = 6, features = 4, width = 8, hidden = 16;
  std::mt19937 gen(5);
  std::normal_distribution<double> normal(0, 1);
  const auto random = [&](Index rows, Index cols, double scale) {
    Matrix<double> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * normal(gen);
    return m;
  };
  Matrix<double> encoder(length, width);  // (L, 8): [word features, position encoding]
  encoder.leftCols(features) = random(length, features, 1.0);
  encoder.rightCols(width - features).setZero();
  attend::add_sinusoidal_encoding<double>(encoder.rightCols(width - features));
  Matrix<double> decoder = Matrix<double>::Zero(length, width - features);  // (L, 4): step t's encoding
  attend::add_sinusoidal_encoding(decoder);

  Matrix<double> w_query = random(hidden, decoder.cols(), 0.5), w_key = random(hidden, width, 0.5);
  Vector<double> v = random(hidden, 1, 0.5), bias = Vector<double>::Zero(hidden);
  Matrix<double> m_q = 0 * w_query, s_q = m_q, m_k = 0 * w_key, s_k = m_k;
  Vector<double> m_v = 0 * v, s_v = m_v, m_b = 0 * bias, s_b = m_b;
  double loss = 0;
  for (int step = 1; step <= 300; ++step) {
    const attend::AdditiveAttention<double> attention(w_query, w_key, v, bias);
    const auto forward = attention.forward_with_lse(decoder, encoder, encoder);  // context (L, 8)
    const Matrix<double> error = forward.output - encoder;                       // target: encoder state t
    loss = error.squaredNorm() / double(length);
    const auto grad = attend::additive_attention_backward(attention, decoder, encoder, encoder, forward,
                                                          2 * error / double(length));
    adam(w_query, grad.dw_query, m_q, s_q, step, 0.05);
    adam(w_key, grad.dw_key, m_k, s_k, step, 0.05);
    adam(v, grad.dw_v, m_v, s_v, step, 0.05);
    adam(bias, grad.dbias, m_b, s_b, step, 0.05);
    if (step % 100 == 0 || step == 1) std::cout << "alignment training step " << step << "  loss " << loss << "\n";
  }
  const attend::AdditiveAttention<double> trained(w_query, w_key, v, bias);
  const Matrix<double> alignment = trained.forward_with_weights(decoder, encoder, encoder).weights;
  std::cout << "learned alignment (row t: decoder step t over the source positions):\n" << alignment << "\n";
  bool diagonal = true;
  for (Index t = 0; t < length; ++t) {
    Index best = 0;
    alignment.row(t).maxCoeff(&best);
    diagonal &= best == t;
  }
  return diagonal && loss < 0.1;
}

}  // namespace

int main() {
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
  std::cout << (ok ? "checks passed" : "CHECKS FAILED") << "\n\n";
  const bool aligned = train_alignment();
  std::cout << (aligned ? "each decoder step attends to its own source position" : "ALIGNMENT NOT LEARNED") << "\n";
  return ok && aligned ? 0 : 1;
}
