// SPDX-License-Identifier: MIT
// benchmarks/compile_time.sh: a translation unit that includes <attend/attend.hpp> and makes one call.
#include <attend/attend.hpp>

#include <cstdio>

int main() {
  const attend::Matrix<float> q = attend::Matrix<float>::Constant(8, 16, 0.25f), k = q, v = q;
  const attend::Matrix<float> out = attend::scaled_dot_product_attention(q, k, v);
  std::printf("%g\n", double(out.sum()));
}
