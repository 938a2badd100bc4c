// SPDX-License-Identifier: MIT
// Attention heatmap: the self-attention weights of a short sentence, written as an SVG image with
// the tokens on both axes (attention_heatmap.svg in the working directory).
//
// Each word gets a fixed pseudo-random embedding (the same word, the same vector), so a token
// attends most to the tokens spelled like it: both "the"s look at each other.
#include "svg.hpp"

#include <attend/attend.hpp>

#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

int main() {
  const std::vector<std::string> tokens = {"the", "cat", "sat", "on", "the", "mat", "and", "the", "cat", "slept"};
  const attend::Index length = attend::Index(tokens.size()), dim = 16;

  // (L, d) embeddings of norm 4: a token's score with itself is 16 / sqrt(d) = 4, with another
  // word about N(0, 1).
  attend::Matrix<double> x(length, dim);
  for (attend::Index i = 0; i < length; ++i) {
    std::mt19937 rng(unsigned(std::hash<std::string>{}(tokens[i])));
    std::normal_distribution<double> normal;
    for (attend::Index c = 0; c < dim; ++c) x(i, c) = normal(rng);
    x.row(i) *= 4.0 / x.row(i).norm();
  }

  const auto result = attend::scaled_dot_product_attention_with_weights(x, x, x);
  svg::heatmap("attention_heatmap.svg", result.weights, tokens, tokens, "self-attention weights (%)");

  int failures = 0;
  for (attend::Index i = 0; i < length; ++i) {
    attend::Index best = 0;
    result.weights.row(i).maxCoeff(&best);
    const bool same_word = tokens[best] == tokens[i];
    std::cout << tokens[i] << " -> " << tokens[best] << " (" << result.weights(i, best) << ")"
              << (same_word ? "" : "  UNEXPECTED") << "\n";
    failures += !same_word;
    failures += std::abs(result.weights.row(i).sum() - 1.0) > 1e-12;
  }
  std::cout << "wrote attention_heatmap.svg\n";
  return failures == 0 ? 0 : 1;
}
