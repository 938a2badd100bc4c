// SPDX-License-Identifier: MIT
// The floor of benchmarks/compile_time.sh: Eigen/Core alone, one dynamic matrix, one reduction.
#include <Eigen/Core>

#include <cstdio>

int main() {
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> m =
      Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>::Constant(8, 16, 0.5f);
  std::printf("%g\n", double(m.sum()));
}
