// SPDX-License-Identifier: MIT
/// \file detail/parallel.hpp
/// \brief The one place attend uses OpenMP: a parallel loop with per-thread scratch that carries
/// exceptions out of its region, the thread count of a call, and matrix products whose bits
/// never depend on threading.
///
/// Threads of a call: every entry point opens a ThreadScope with its options' num_threads, and
/// each parallel loop inside runs on team_size() threads: num_threads when set; otherwise
/// OpenMP's max threads shared among the caller's threads that are inside attend at that
/// moment (two std::thread workers on a 2-core machine get one thread each, instead of two
/// teams of two fighting over the cores); 1 inside a parallel region of the caller's. Work is
/// cut into pieces that do not depend on the team, so results are bitwise the same for any count.
///
/// Eigen 3.4 threads a large product by itself (internal::parallelize_gemm) whenever it runs in
/// a team of one thread, which attend's own region gets under OMP_THREAD_LIMIT=1, a dynamic
/// team or a nested region, and then blocks the product's depth for Eigen::nbThreads() (set by
/// Eigen::setNbThreads, else OpenMP's max threads). So every product attend forms goes through
/// serial_product, which Eigen computes serially with the blocking of one thread whatever those
/// settings are, on blocks whose sizes depend only on the shapes.
#pragma once

#include "../config.hpp"

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <type_traits>

#ifndef ATTEND_NO_EXCEPTIONS
#include <exception>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace attend::detail {

/// The first exception thrown by the tasks of a parallel loop, kept to be rethrown after it:
/// an exception must not leave an OpenMP region (that calls std::terminate). Without exceptions
/// it only runs the tasks.
class FirstException {
 public:
  /// Runs task(), recording what it throws when it is the first task of the loop to throw.
  template <class Task>
  void run(Task&& task) noexcept {
#ifdef ATTEND_NO_EXCEPTIONS
    task();
#else
    try {
      task();
    } catch (...) {
      if (!thrown_.exchange(true)) first_ = std::current_exception();
    }
#endif
  }

  /// Whether a task has thrown (the remaining tasks are then skipped).
  bool thrown() const {
#ifdef ATTEND_NO_EXCEPTIONS
    return false;
#else
    return thrown_.load(std::memory_order_relaxed);
#endif
  }

  /// Rethrows the recorded exception, if any; call after the region.
  void rethrow() const {
#ifndef ATTEND_NO_EXCEPTIONS
    if (first_) std::rethrow_exception(first_);
#endif
  }

 private:
#ifndef ATTEND_NO_EXCEPTIONS
  std::atomic<bool> thrown_{false};
  std::exception_ptr first_;  // written once, by the thread that set thrown_
#endif
};

/// The thread request of the entry points running on this thread.
struct ThreadRequest {
  int depth = 0;      // entry points open on this thread (nested calls count once)
  int requested = 0;  // num_threads of the outermost one that set it; 0 = the default
};

inline ThreadRequest& thread_request() {
  thread_local ThreadRequest request;
  return request;
}

/// Threads of the caller that are inside an attend entry point now.
inline std::atomic<int>& active_callers() {
  static std::atomic<int> count{0};
  return count;
}

/// Opened by every entry point with its options' num_threads: records the request for the
/// parallel loops of the call, and counts the calling thread as active while the outermost
/// scope is open. A nested scope with num_threads = 0 keeps the enclosing request.
/// \throws attend::invalid_argument when num_threads < 0.
class ThreadScope {
 public:
  explicit ThreadScope(int num_threads) : saved_(thread_request()) {
    ATTEND_CHECK(num_threads >= 0,
                 "num_threads=" + std::to_string(num_threads) + " must be positive, or 0 for the default");
    ThreadRequest& request = thread_request();
    if (request.depth++ == 0) active_callers().fetch_add(1, std::memory_order_relaxed);
    if (num_threads > 0) request.requested = num_threads;
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;
  ~ThreadScope() {
    if (saved_.depth == 0) active_callers().fetch_sub(1, std::memory_order_relaxed);
    thread_request() = saved_;
  }

 private:
  ThreadRequest saved_;
};

/// Threads a parallel loop of the current call runs on (see the file comment).
inline int team_size() {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  if (thread_request().requested > 0) return thread_request().requested;
  const int callers = std::max(1, active_callers().load(std::memory_order_relaxed));
  return std::max(1, omp_get_max_threads() / callers);
#else
  return 1;
#endif
}

/// Calls body(i, scratch) for i in [0, count), in parallel when OpenMP is enabled. Each thread
/// builds its scratch once with make_scratch(). Called inside an active parallel region (an
/// enclosing loop of attend's, or the caller's), it runs serially in the calling thread.
///
/// An exception thrown by make_scratch or body (std::bad_alloc included) reaches the caller:
/// the first one is carried out of the region and rethrown after it, the iterations not yet
/// started are skipped, and what the loop writes is then unspecified (the basic guarantee).
template <class MakeScratch, class Body>
void parallel_for_with_scratch(Index count, MakeScratch&& make_scratch, Body&& body) {
  if (count <= 0) return;
#ifdef _OPENMP
  const int threads = int(std::min<Index>(team_size(), count));
  if (threads > 1) {
    FirstException failure;
#pragma omp parallel num_threads(threads)
    {
      std::optional<std::decay_t<decltype(make_scratch())>> scratch;
      failure.run([&] { scratch.emplace(make_scratch()); });
      // Every thread reaches the loop, as a worksharing loop requires, even without scratch.
#pragma omp for schedule(dynamic, 1)
      for (Index i = 0; i < count; ++i) {
        if (!failure.thrown()) failure.run([&] { body(i, *scratch); });
      }
    }
    failure.rethrow();
    return;
  }
#endif
  auto scratch = make_scratch();
  for (Index i = 0; i < count; ++i) body(i, scratch);
}

/// Calls body(i) for i in [0, count), as parallel_for_with_scratch without a scratch.
template <class Body>
void parallel_for(Index count, Body&& body) {
  parallel_for_with_scratch(
      count, [] { return 0; }, [&](Index i, int&) { body(i); });
}

/// Eigen never threads a product whose destination has at most this many rows at compile time
/// (the condition of internal::parallelize_gemm, Eigen/src/Core/products/GeneralMatrixMatrix.h).
inline constexpr int kSerialProductRows = 32;

/// dst = lhs rhs by Eigen's GEMM kernel called directly, serially and blocked for one thread:
/// what Eigen's product does without threads (generic_product_impl<..., GemmProduct>::
/// scaleAndAddTo in GeneralMatrixMatrix.h), minus parallelize_gemm. dst has at least one
/// coefficient and lhs at least one column.
template <class Dst, class Lhs, class Rhs>
void serial_gemm(Dst& dst, const Lhs& a_lhs, const Rhs& a_rhs) {
  namespace ei = Eigen::internal;
  using Scalar = typename Dst::Scalar;
  using LhsTraits = ei::blas_traits<Lhs>;
  using RhsTraits = ei::blas_traits<Rhs>;
  using ActualLhs = typename LhsTraits::DirectLinearAccessType;  // Lhs, or its evaluation
  using ActualRhs = typename RhsTraits::DirectLinearAccessType;
  using PlainLhs = typename ei::remove_all<ActualLhs>::type;
  using PlainRhs = typename ei::remove_all<ActualRhs>::type;
  constexpr auto order = [](bool row_major) { return row_major ? Eigen::RowMajor : Eigen::ColMajor; };
  using Gemm =
      ei::general_matrix_matrix_product<Index, Scalar, order(PlainLhs::IsRowMajor), bool(LhsTraits::NeedToConjugate),
                                        Scalar, order(PlainRhs::IsRowMajor), bool(RhsTraits::NeedToConjugate),
                                        order(Dst::IsRowMajor), Dst::InnerStrideAtCompileTime>;
  using Blocking =
      ei::gemm_blocking_space<order(Dst::IsRowMajor), Scalar, Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::Dynamic>;
  typename ei::add_const_on_value_type<ActualLhs>::type lhs = LhsTraits::extract(a_lhs);
  typename ei::add_const_on_value_type<ActualRhs>::type rhs = RhsTraits::extract(a_rhs);
  const Scalar alpha = ei::combine_scalar_factors<Scalar>(a_lhs, a_rhs);
  Blocking blocking(dst.rows(), dst.cols(), lhs.cols(), 1, true);
  dst.setZero();
  ei::gemm_functor<Scalar, Index, Gemm, PlainLhs, PlainRhs, Dst, Blocking>(lhs, rhs, dst, alpha, blocking)(
      0, dst.rows(), 0, dst.cols());
}

/// dst = lhs rhs, computed serially with a blocking that depends only on the shapes, whatever
/// Eigen::setNbThreads, omp_set_num_threads, OMP_THREAD_LIMIT, OMP_DYNAMIC or the nesting.
/// Up to kSerialProductRows rows, Eigen's own product (coefficient-based, GEMV or GEMM) into a
/// view whose rows are bounded at compile time; beyond, its GEMM kernel called serially.
/// dst must not alias lhs or rhs.
template <class Dst, class Lhs, class Rhs>
void serial_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  using D = std::decay_t<Dst>;
  const Index rows = dst.rows(), cols = dst.cols();
  if (rows == 0 || cols == 0) return;
  if (lhs.cols() == 0) {
    dst.setZero();
  } else if (rows > kSerialProductRows) {
    serial_gemm(dst, lhs.derived(), rhs.derived());
  } else {
    using Bounded =
        Eigen::Matrix<typename D::Scalar, Eigen::Dynamic, Eigen::Dynamic,
                      D::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor, kSerialProductRows, Eigen::Dynamic>;
    using Stride = Eigen::Stride<Eigen::Dynamic, D::InnerStrideAtCompileTime>;
    Eigen::Map<Bounded, Eigen::Unaligned, Stride>(&dst.coeffRef(0, 0), rows, cols,
                                                  Stride(dst.outerStride(), dst.innerStride()))
        .noalias() = lhs * rhs;
  }
}

/// Rows of the output per task of parallel_product: fixed, so the result never depends on the
/// thread count.
inline constexpr Index kProductRows = 64;

/// dst = lhs rhs, in parallel over blocks of kProductRows rows of dst (each a serial_product).
/// dst must not alias lhs or rhs.
template <class Dst, class Lhs, class Rhs>
void parallel_product(Dst&& dst, const Lhs& lhs, const Rhs& rhs) {
  const Index rows = dst.rows();
  parallel_for((rows + kProductRows - 1) / kProductRows, [&](Index block) {
    const Index r0 = block * kProductRows, n = std::min(kProductRows, rows - r0);
    serial_product(dst.middleRows(r0, n), lhs.middleRows(r0, n), rhs);
  });
}

}  // namespace attend::detail
