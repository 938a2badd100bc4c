// SPDX-License-Identifier: MIT
/// \file detail/checks.hpp
/// \brief Shape and aliasing checks shared by the attention entry points.
#pragma once

#include "../types.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <string>
#include <type_traits>

namespace attend::detail {

/// Q (Lq, Dk), K (Lk, Dk), V (Lk, Dv) with Dk >= 1, of one floating-point scalar type.
template <class Q, class K, class V>
void check_qkv(const Q& q, const K& k, const V& v) {
  static_assert(supported_scalars<Q, K, V>);
  ATTEND_CHECK(q.cols() == k.cols(), "q " + shape_of(q) + " and k " + shape_of(k) +
                                         " must have the same head dimension (columns)");
  ATTEND_CHECK(k.rows() == v.rows(), "k " + shape_of(k) + " and v " + shape_of(v) +
                                         " must have the same number of rows (keys)");
  ATTEND_CHECK(q.cols() >= 1, "q " + shape_of(q) + " must have a head dimension of at least 1");
}

/// `m` has exactly the shape (rows, cols).
template <class M>
void check_shape(const M& m, Index rows, Index cols, const char* what) {
  ATTEND_CHECK(m.rows() == rows && m.cols() == cols,
               std::string(what) + " " + shape_of(m) + " must be (" + std::to_string(rows) + " x " +
                   std::to_string(cols) + ")");
}

/// Rejects an array of rows x cols elements of T (rows, cols >= 0) whose size in bytes exceeds
/// PTRDIFF_MAX, the largest object C++ allows (pointer differences, Eigen's and malloc's limit):
/// no such array can exist, so its size is an invalid argument rather than a failed allocation.
/// Checked without forming the product. (allocate_array also turns a failed allocation of a
/// smaller array into invalid_argument.)
/// \param what names the array and its dimensions, e.g. "KV cache keys (capacity x kv_heads * head_dim)"
template <class T>
void check_array_size(Index rows, Index cols, const char* what) {
  constexpr std::ptrdiff_t kMaxBytes = std::numeric_limits<std::ptrdiff_t>::max();
  constexpr Index kMaxElements = Index(kMaxBytes / std::ptrdiff_t(sizeof(T)));
  ATTEND_CHECK(cols == 0 || rows <= kMaxElements / cols, std::string(what) + " of (" + std::to_string(rows) + " x " +
                                                             std::to_string(cols) + ") " + scalar_name<T>() +
                                                             "s exceeds PTRDIFF_MAX = " + std::to_string(kMaxBytes) +
                                                             " bytes, the largest array size");
}

/// A (rows, cols) matrix of T for a buffer sized by the caller's arguments (a cache capacity, a
/// table length), allocated up front: a size that no array can have, or that the allocator
/// refuses (std::bad_alloc: more than the address space or the overcommit limit), is an
/// invalid argument naming `what`, its shape and its bytes, not an allocation failure deep in a
/// call. Without exceptions a refused allocation aborts, as Eigen's does.
template <class T>
Matrix<T> allocate_array(Index rows, Index cols, const char* what) {
  check_array_size<T>(rows, cols, what);
#ifdef ATTEND_NO_EXCEPTIONS
  return Matrix<T>(rows, cols);
#else
  try {
    return Matrix<T>(rows, cols);
  } catch (const std::bad_alloc&) {
    fail_check(std::string(what) + " of (" + std::to_string(rows) + " x " + std::to_string(cols) + ") " +
               scalar_name<T>() + "s, " + number_string(double(rows) * double(cols) * double(sizeof(T))) +
               " bytes, cannot be allocated");
  }
#endif
}

/// The memory of a dense view: element (i, j) occupies the `bytes` bytes at
/// begin + i row_stride + j col_stride (strides in bytes, non-negative). Empty for a view with no
/// element, and for an expression without storage of its own (Eigen evaluates it into a
/// temporary before anything reads it).
struct MemorySpan {
  std::uintptr_t begin = 0;
  Index rows = 0, cols = 0, row_stride = 0, col_stride = 0, bytes = 0;

  bool empty() const { return rows == 0 || cols == 0; }
  /// One past the last byte.
  std::uintptr_t end() const {
    return begin + std::uintptr_t((rows - 1) * row_stride + (cols - 1) * col_stride + bytes);
  }
};

template <class D>
MemorySpan memory_span(const Eigen::DenseBase<D>& m) {
  if constexpr (bool(D::Flags & Eigen::DirectAccessBit)) {
    const D& d = m.derived();
    const Index bytes = Index(sizeof(typename D::Scalar));
    return {reinterpret_cast<std::uintptr_t>(d.data()), d.rows(), d.cols(), d.rowStride() * bytes,
            d.colStride() * bytes, bytes};
  } else {
    return {};
  }
}

/// A span as `count` contiguous runs of `length` bytes, `stride` bytes apart (stride >= length,
/// so the runs are disjoint and ascending): the rows of a view whose rows are contiguous, or
/// its columns. Empty optional when neither is contiguous (e.g. an inner stride > 1).
struct MemoryRuns {
  std::intptr_t begin;  // relative to a common origin
  Index count, length, stride;
};

inline std::optional<MemoryRuns> memory_runs(const MemorySpan& s, std::uintptr_t origin) {
  const auto begin = static_cast<std::intptr_t>(s.begin - origin);
  std::optional<MemoryRuns> best;
  const auto consider = [&](Index count, Index length, Index stride) {
    if ((count == 1 || stride >= length) && (!best || count < best->count))
      best = MemoryRuns{begin, count, length, stride};
  };
  if (s.cols == 1 || s.col_stride == s.bytes) consider(s.rows, s.cols * s.bytes, s.row_stride);  // rows
  if (s.rows == 1 || s.row_stride == s.bytes) consider(s.cols, s.rows * s.bytes, s.col_stride);  // columns
  return best;
}

/// Whether two spans share a byte. Exact for views whose rows (or columns) are contiguous, so
/// side-by-side column blocks of one row-major matrix do not overlap; otherwise true as soon
/// as their address ranges meet. O(min(rows)) when the ranges meet, O(1) otherwise.
inline bool overlaps(const MemorySpan& a, const MemorySpan& b) {
  if (a.empty() || b.empty() || a.end() <= b.begin || b.end() <= a.begin) return false;
  const std::uintptr_t origin = std::min(a.begin, b.begin);
  std::optional<MemoryRuns> x = memory_runs(a, origin), y = memory_runs(b, origin);
  if (!x || !y) return true;
  if (x->count > y->count) std::swap(x, y);
  for (Index r = 0; r < x->count; ++r) {
    // Run r of x is [lo, lo + length); the first run m of y ending after lo is the only one
    // that can start before lo + length.
    const std::intptr_t lo = x->begin + r * x->stride, past = lo - y->begin - y->length;
    const Index m = past < 0 ? 0 : y->count == 1 ? 1 : past / y->stride + 1;
    if (m < y->count && y->begin + m * y->stride < lo + x->length) return true;
  }
  return false;
}

/// Rejects an output view that shares memory with a view the call reads while writing it: the
/// kernels read their inputs in place, so an overlap would feed them half-written results.
/// Pass the views the kernel actually reads (an argument bound to a temporary copy cannot
/// alias). An expression with no storage of its own never aliases. The message reads
/// "<out_name> (r x c) aliases <in_name> (r x c): ...", e.g. out_name "output", in_name "input v".
template <class Out, class In>
void check_no_alias(const Out& out, const char* out_name, const In& in, const char* in_name) {
  ATTEND_CHECK(!overlaps(memory_span(out), memory_span(in)),
               std::string(out_name) + " " + shape_of(out) + " aliases " + in_name + " " + shape_of(in) +
                   ": they share memory, so writing one would corrupt the other (pass a separate matrix)");
}

/// Rejects an attention output `out` or its log-sum-exp `lse` (possibly empty) sharing memory
/// with the views q, k, v the kernel reads, or with each other. Inputs are stored as S, the
/// output as O, the log-sum-exp as T.
template <class S, class O = S, class T = S>
void check_outputs_do_not_alias(const ConstMatrixRef<identity_t<S>>& q, const ConstMatrixRef<identity_t<S>>& k,
                                const ConstMatrixRef<identity_t<S>>& v, const MatrixRef<identity_t<O>>& out,
                                const VectorRef<identity_t<T>>& lse) {
  check_no_alias(out, "output", q, "input q");
  check_no_alias(out, "output", k, "input k");
  check_no_alias(out, "output", v, "input v");
  check_no_alias(lse, "log-sum-exp", q, "input q");
  check_no_alias(lse, "log-sum-exp", k, "input k");
  check_no_alias(lse, "log-sum-exp", v, "input v");
  check_no_alias(lse, "log-sum-exp", out, "output");
}

}  // namespace attend::detail
