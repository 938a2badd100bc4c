// SPDX-License-Identifier: MIT
/// \file distributed/mpi.hpp
/// \brief The MPI plumbing of attend's distributed component: scalar types, error checks, a
/// row datatype, and the collective agreement that turns one rank's invalid argument into an
/// exception on every rank (instead of a deadlock).
///
/// Threads: attend calls MPI only from the thread that calls it, which must be the thread that
/// initialized MPI (`MPI_Is_thread_main`); OpenMP threads of the kernels never call MPI. So
/// `MPI_Init_thread(..., MPI_THREAD_FUNNELED, ...)` is enough.
#pragma once

#include "../detail/checks.hpp"
#include "../types.hpp"

// Only MPI's C interface: the deprecated C++ bindings (removed in MPI-3) are not used, and Open
// MPI's trip -Wcast-function-type.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

namespace attend::distributed {
namespace detail {

/// The MPI datatype of a float or double.
template <class T>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attend: float or double");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

/// Throws attend::invalid_argument naming the MPI call and its error string when rc is not
/// MPI_SUCCESS (seen only under a communicator whose error handler returns, MPI_ERRORS_RETURN).
inline void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  ATTEND_CHECK(false, std::string(call) + " failed: " + std::string(text, std::size_t(length)));
}

/// Rank and size of a communicator, after checking that the caller may call MPI.
struct CommInfo {
  int rank;
  int size;
};

inline CommInfo comm_info(MPI_Comm comm) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  ATTEND_CHECK(initialized && !finalized, "attend::distributed needs MPI initialized (MPI_Init_thread) and not finalized");
  int main_thread = 0;
  check_mpi(MPI_Is_thread_main(&main_thread), "MPI_Is_thread_main");
  ATTEND_CHECK(main_thread, "attend::distributed must be called from the thread that initialized MPI "
                            "(MPI_THREAD_FUNNELED: only that thread calls MPI)");
  CommInfo info{};
  check_mpi(MPI_Comm_rank(comm, &info.rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &info.size), "MPI_Comm_size");
  return info;
}

/// A committed contiguous datatype of `count` scalars (one row of a packed buffer), freed on
/// destruction: message counts are then rows, which stay far below INT_MAX.
template <class T>
class RowType {
 public:
  explicit RowType(Index count) {
    ATTEND_CHECK(count >= 1 && count <= Index(INT32_MAX),
                 "a row of " + std::to_string(count) + " scalars does not fit one MPI datatype");
    check_mpi(MPI_Type_contiguous(int(count), mpi_type<T>(), &type_), "MPI_Type_contiguous");
    check_mpi(MPI_Type_commit(&type_), "MPI_Type_commit");
  }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  ~RowType() { MPI_Type_free(&type_); }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

/// A message count in rows, checked against MPI's int.
inline int row_count(Index rows) {
  ATTEND_CHECK(rows >= 0 && rows <= Index(INT32_MAX), std::to_string(rows) + " rows exceed an MPI count");
  return int(rows);
}

/// Runs `check()` on every rank and agrees on the outcome: `facts` (the same count on every
/// rank) are gathered from all ranks into a (size x facts.size()) table, row r from rank r.
/// When some rank's check threw, that rank rethrows its exception and every other rank throws
/// attend::invalid_argument naming it, so that no rank is left waiting in a collective.
template <class Check>
std::vector<std::int64_t> agree(MPI_Comm comm, const CommInfo& info, std::vector<std::int64_t> facts, Check&& check) {
  std::int64_t ok = 1;
#ifndef ATTEND_NO_EXCEPTIONS
  std::exception_ptr failure;
  try {
    check();
  } catch (...) {
    failure = std::current_exception();
    ok = 0;
  }
#else
  check();
#endif
  facts.insert(facts.begin(), ok);
  const int width = int(facts.size());
  std::vector<std::int64_t> table(std::size_t(info.size) * facts.size());
  check_mpi(MPI_Allgather(facts.data(), width, MPI_INT64_T, table.data(), width, MPI_INT64_T, comm), "MPI_Allgather");
#ifndef ATTEND_NO_EXCEPTIONS
  if (failure) std::rethrow_exception(failure);
#endif
  for (int r = 0; r < info.size; ++r)
    ATTEND_CHECK(table[std::size_t(r) * facts.size()] == 1,
                 "rank " + std::to_string(r) + " rejected its arguments (see its own exception)");
  std::vector<std::int64_t> rest;  // the facts, without the ok column
  for (int r = 0; r < info.size; ++r)
    for (int c = 1; c < width; ++c) rest.push_back(table[std::size_t(r) * facts.size() + std::size_t(c)]);
  return rest;
}

}  // namespace detail
}  // namespace attend::distributed
