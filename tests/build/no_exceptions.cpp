// SPDX-License-Identifier: MIT
// Compiled with -fno-exceptions: a failed precondition must print attend's message and abort
// (test build_no_exceptions_abort).
#include <attend/attend.hpp>

int main() {
  const attend::Matrix<float> q = attend::Matrix<float>::Zero(2, 3);  // (Lq, Dk) = (2, 3)
  const attend::Matrix<float> k = attend::Matrix<float>::Zero(2, 4);  // Dk = 4 disagrees with q
  const attend::Matrix<float> v = attend::Matrix<float>::Zero(2, 4);
  const attend::Matrix<float> out = attend::scaled_dot_product_attention(q, k, v);
  return static_cast<int>(out.size());  // not reached
}
