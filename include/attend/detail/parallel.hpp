// SPDX-License-Identifier: MIT
/// \file detail/parallel.hpp
/// \brief The one place attend uses OpenMP: a parallel loop with per-thread scratch, and
/// matrix products split over it.
///
/// Eigen parallelizes a large product by itself only outside a parallel region, and then
/// blocks its depth by the thread count, so the product's bits depend on that count. Every
/// product attend forms therefore runs inside one of these loops (where Eigen's stays serial),
/// on blocks whose sizes do not depend on the thread count.
#pragma once

#include "../config.hpp"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attend::detail {

/// Calls body(i, scratch) for i in [0, count), in parallel when OpenMP is enabled. Each thread
/// builds its scratch once with make_scratch(). The loop always runs inside a parallel region,
/// so Eigen's own GEMM threading (which stays serial inside one) is never nested in it. Called
/// inside an active parallel region (an enclosing loop of attend's, or the caller's), it runs
/// serially in the calling thread: a nested region would get one thread, and inside a team of
/// one Eigen would parallelize its products again, blocked for the outer thread count.
template <class MakeScratch, class Body>
void parallel_for_with_scratch(Index count, MakeScratch&& make_scratch, Body&& body) {
  if (count <= 0) return;
#ifdef _OPENMP
  if (!omp_in_parallel()) {
#pragma omp parallel
    {
      auto scratch = make_scratch();
#pragma omp for schedule(dynamic, 1)
      for (Index i = 0; i < count; ++i) body(i, scratch);
    }
    return;
  }
#endif
  auto scratch = make_scratch();
  for (Index i = 0; i < count; ++i) body(i, scratch);
}

/// Rows of the output per task of parallel_product: fixed, so the result never depends on the
/// thread count.
inline constexpr Index kProductRows = 64;

/// dst = lhs rhs, in parallel over blocks of kProductRows rows of dst (each a serial Eigen
/// product). dst must not alias lhs or rhs.
template <class Dst, class Lhs, class Rhs>
void parallel_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  const Index rows = dst.rows();
  parallel_for_with_scratch(
      (rows + kProductRows - 1) / kProductRows, [] { return 0; },
      [&](Index block, int&) {
        const Index r0 = block * kProductRows, n = std::min(kProductRows, rows - r0);
        dst.middleRows(r0, n).noalias() = lhs.middleRows(r0, n) * rhs;
      });
}

}  // namespace attend::detail
