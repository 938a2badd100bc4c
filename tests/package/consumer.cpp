// SPDX-License-Identifier: MIT
// A downstream program, built by the consumer projects in tests/package/ the way users build
// theirs: it includes the umbrella header, calls the front function and checks one value.
#include <attend/attend.hpp>

#include <cmath>
#include <cstdio>

int main() {
  // One query against two keys with d = 1: the scores are (0, 1) (scale 1/sqrt(1) = 1), the
  // weights (1, e) / (1 + e), and the values (0, 1), so the output is e / (1 + e).
  attend::Matrix<double> q(1, 1), k(2, 1), v(2, 1);
  q << 1.0;
  k << 0.0, 1.0;
  v << 0.0, 1.0;
  const attend::Matrix<double> out = attend::scaled_dot_product_attention(q, k, v);

  const double expected = std::exp(1.0) / (1.0 + std::exp(1.0));
  if (out.rows() != 1 || out.cols() != 1 || !(std::abs(out(0, 0) - expected) <= 1e-12)) {
    std::printf("attend consumer: expected a (1 x 1) output %.17g\n", expected);
    return 1;
  }
  std::printf("attend %d.%d.%d consumer: %.17g\n", ATTEND_VERSION_MAJOR, ATTEND_VERSION_MINOR, ATTEND_VERSION_PATCH,
              out(0, 0));
  return 0;
}
