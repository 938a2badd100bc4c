// SPDX-License-Identifier: MIT
// A downstream MPI program (run as a singleton, one rank, without mpiexec): ring attention over
// a communicator of one rank equals the single-process call.
#include <attend/distributed.hpp>

#include <cmath>
#include <cstdio>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  // One query against two keys with d = 1, causal bottom-right (the query sees both keys): the
  // output is e / (1 + e), as in ../consumer.cpp.
  attend::Matrix<double> q(1, 1), k(2, 1), v(2, 1), out(1, 1);
  q << 1.0;
  k << 0.0, 1.0;
  v << 0.0, 1.0;
  attend::distributed::ring_attention_into(MPI_COMM_SELF, q, k, v, 1, out, attend::Causal(attend::Alignment::BottomRight));
  MPI_Finalize();
  const double expected = std::exp(1.0) / (1.0 + std::exp(1.0));
  if (!(std::abs(out(0, 0) - expected) <= 1e-12)) {
    std::printf("attend::distributed consumer: expected %.17g, got %.17g\n", expected, out(0, 0));
    return 1;
  }
  std::printf("attend::distributed consumer: %.17g\n", out(0, 0));
  return 0;
}
