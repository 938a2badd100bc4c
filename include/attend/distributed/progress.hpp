// SPDX-License-Identifier: MIT
/// \file distributed/progress.hpp
/// \brief A parallel loop whose calling thread drives MPI's progress between work items.
///
/// Open MPI moves a large message (rendezvous protocol, single-copy over shared memory, or TCP)
/// only while some MPI call runs on one of its ends. So while the kernels compute, the thread that
/// called attend (OpenMP's thread 0, the only one that calls MPI: MPI_THREAD_FUNNELED) calls
/// `progress()` (an MPI_Testall of the step's requests) after each work item it finishes; a
/// work item is one query tile of one head, milliseconds at d = 128.
#pragma once

#include "../detail/parallel.hpp"
#include "mpi.hpp"

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

namespace attend::distributed::detail {

/// Whether the thread that called MPI may call it from inside an OpenMP region while the other
/// threads compute: MPI was initialized with at least MPI_THREAD_FUNNELED.
inline bool funneled() {
  int provided = MPI_THREAD_SINGLE;
  MPI_Query_thread(&provided);
  return provided >= MPI_THREAD_FUNNELED;
}

/// Calls body(i, scratch) for i in [0, count) like attend::detail::parallel_for_with_scratch
/// (on the call's team_size() threads, exceptions carried out of the region), and progress() after each
/// item that the calling thread runs. Under MPI_THREAD_SINGLE with several threads, progress()
/// is called only once the loop is done (MPI may not be called while other threads run).
template <class MakeScratch, class Body, class Progress>
void parallel_for_with_progress(Index count, MakeScratch&& make_scratch, Body&& body, Progress&& progress) {
  if (count <= 0) return;
#ifdef _OPENMP
  const int threads = int(std::min<Index>(attend::detail::team_size(), count));
  if (threads > 1) {
    const bool may_progress = funneled();
    attend::detail::FirstException failure;
#pragma omp parallel num_threads(threads)
    {
      std::optional<std::decay_t<decltype(make_scratch())>> scratch;
      failure.run([&] { scratch.emplace(make_scratch()); });
      const bool caller = omp_get_thread_num() == 0 && may_progress;
#pragma omp for schedule(dynamic, 1)
      for (Index i = 0; i < count; ++i) {
        if (!failure.thrown()) failure.run([&] { body(i, *scratch); });
        if (caller) progress();
      }
    }
    failure.rethrow();
    if (!may_progress) progress();
    return;
  }
#endif
  auto scratch = make_scratch();
  for (Index i = 0; i < count; ++i) {
    body(i, scratch);
    progress();
  }
}

/// Pending non-blocking requests of one ring step.
class Requests {
 public:
  void add(MPI_Request request) { requests_.push_back(request); }
  bool empty() const { return requests_.empty(); }
  /// Drives progress; completed requests become MPI_REQUEST_NULL.
  void test() {
    if (requests_.empty()) return;
    int done = 0;
    check_mpi(MPI_Testall(int(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
  }
  void wait() {
    if (requests_.empty()) return;
    check_mpi(MPI_Waitall(int(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
    requests_.clear();
  }

 private:
  std::vector<MPI_Request> requests_;
};

}  // namespace attend::distributed::detail
