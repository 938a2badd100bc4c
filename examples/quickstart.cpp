// SPDX-License-Identifier: MIT
// Quick start: self attention over four tokens, printing the output and the weights.
#include <attend/attend.hpp>

#include <iostream>

int main() {
  // Four tokens with three features each, one token per row.
  attend::Matrix<double> x(4, 3);
  x << 1.0, 0.0, 1.0,  //
      0.0, 2.0, 0.0,   //
      1.0, 1.0, 1.0,   //
      0.0, 0.0, 3.0;

  // Self attention: Q = K = V = x, each token attending to itself and the tokens before it.
  const auto result = attend::scaled_dot_product_attention_with_weights(x, x, x, attend::Causal());

  std::cout << "weights (row i: how much token i attends to each token):\n" << result.weights << "\n\n";
  std::cout << "output (each row a weighted average of the value rows):\n" << result.output << "\n";

  // The first token can only see itself, so its output is its own value row.
  return (result.output.row(0) - x.row(0)).norm() < 1e-12 ? 0 : 1;
}
