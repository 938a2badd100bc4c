// SPDX-License-Identifier: MIT
/// \file detail/parallel.hpp
/// \brief The one place attend uses OpenMP: a parallel loop with per-thread scratch.
#pragma once

#include "../config.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attend::detail {

/// Calls body(i, scratch) for i in [0, count), in parallel when OpenMP is enabled. Each thread
/// builds its scratch once with make_scratch(). The loop always runs inside a parallel region,
/// so Eigen's own GEMM threading (which stays serial inside one) is never nested in it.
template <class MakeScratch, class Body>
void parallel_for_with_scratch(Index count, MakeScratch&& make_scratch, Body&& body) {
  if (count <= 0) return;
#ifdef _OPENMP
#pragma omp parallel
  {
    auto scratch = make_scratch();
#pragma omp for schedule(dynamic, 1)
    for (Index i = 0; i < count; ++i) body(i, scratch);
  }
#else
  auto scratch = make_scratch();
  for (Index i = 0; i < count; ++i) body(i, scratch);
#endif
}

}  // namespace attend::detail
