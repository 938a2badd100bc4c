// SPDX-License-Identifier: MIT
// Attention heatmap: the self-attention weights of a short sentence, written as an SVG image with
// the tokens on both axes (attention_heatmap.svg in the working directory).
//
// Each word gets a fixed pseudo-random embedding (the same word, the same vector), so a token
// attends most to the tokens spelled like it: both "the"s look at each other.
#include <attend/attend.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace {

// Writes the (n, n) weights as an SVG heatmap (darker = larger, in percent) labelled by `tokens`.
void write_heatmap(const std::string& path, const attend::Matrix<double>& weights,
                   const std::vector<std::string>& tokens) {
  const int cell = 44, left = 70, top = 70, n = int(tokens.size());
  std::ofstream out(path);
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << left + cell * n << "' height='" << top + cell * n
      << "' font-family='sans-serif' font-size='12'><rect width='100%' height='100%' fill='white'/>\n";
  for (int i = 0; i < n; ++i) {
    out << "<text x='" << left - 6 << "' y='" << top + i * cell + cell / 2 << "' text-anchor='end'>" << tokens[i]
        << "</text><text transform='translate(" << left + i * cell + cell / 2 << "," << top - 6 << ") rotate(-60)'>"
        << tokens[i] << "</text>\n";
    for (int j = 0; j < n; ++j) {
      const double w = std::clamp(weights(i, j), 0.0, 1.0);
      const long shade = std::lround(255 * (1 - w));
      out << "<rect x='" << left + j * cell << "' y='" << top + i * cell << "' width='" << cell << "' height='" << cell
          << "' fill='rgb(" << shade << "," << shade << ",255)'/><text x='" << left + j * cell + cell / 2 << "' y='"
          << top + i * cell + cell / 2 << "' text-anchor='middle' fill='" << (w > 0.5 ? "white" : "black") << "'>"
          << std::lround(100 * w) << "</text>\n";
    }
  }
  out << "</svg>\n";
}

}  // namespace

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
  write_heatmap("attention_heatmap.svg", result.weights, tokens);

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
