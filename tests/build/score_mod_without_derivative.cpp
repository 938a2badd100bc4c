// SPDX-License-Identifier: MIT
// Compiled by the test build_score_mod_backward_refused, which passes only when the first error
// is attend's static_assert (custom.hpp): the backward of a ScoreMod given no derivative does
// not compile, rather than giving gradients that miss the modifier's derivative.
#include <attend/attend.hpp>

int main() {
  const attend::Matrix<double> q = attend::Matrix<double>::Ones(3, 2), v = attend::Matrix<double>::Ones(3, 2);
  const auto mask = attend::ScoreMod([](double s, attend::Index, attend::Index, attend::Index) { return 2 * s; });
  const attend::AttentionResult<double> f = attend::scaled_dot_product_attention_with_lse(q, q, v, mask);
  const attend::AttentionGradients<double> g = attend::scaled_dot_product_attention_backward(q, q, v, f, v, mask);
  return g.dq.allFinite() ? 0 : 1;
}
