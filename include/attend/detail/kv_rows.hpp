// SPDX-License-Identifier: MIT
/// \file detail/kv_rows.hpp
/// \brief The row storage of the KV caches in each format: float, double, bf16, half (one value
/// per element, rounded to nearest even on the way in) and q8_0 (quantized.hpp: per head, blocks of
/// 32 values), and the packet loads the decode kernel converts them with.
#pragma once

#include "../quantized.hpp"
#include "../types.hpp"
#include "checks.hpp"
#include "packet.hpp"

#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(EIGEN_VECTORIZE_AVX512) || defined(EIGEN_VECTORIZE_AVX2)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

ATTEND_PACKET_WARNINGS_PUSH

namespace attend {
namespace detail {

/// Whether S names a KV cache format: float, double, Eigen::bfloat16, Eigen::half or Q8_0.
template <class S>
inline constexpr bool is_kv_format = std::is_same_v<S, float> || std::is_same_v<S, double> ||
                                     is_reduced_precision<S> || std::is_same_v<S, Q8_0>;

/// The check of a cache's format, as a static_assert that names the formats.
template <class S>
struct KVFormatCheck {
  static_assert(is_kv_format<S>,
                "attend: a KV cache stores float, double, Eigen::bfloat16, Eigen::half or attend::Q8_0");
  static constexpr bool value = true;
};
template <class S>
inline constexpr bool kv_format = KVFormatCheck<S>::value;

/// What a row element of format S is: S itself, or a q8_0 block.
template <class S>
using kv_element_t = std::conditional_t<std::is_same_v<S, Q8_0>, BlockQ8_0, S>;

/// The scalar a row of format S reads back as (dequantized): S, or float for q8_0.
template <class S>
using kv_value_t = std::conditional_t<std::is_same_v<S, Q8_0>, float, S>;

/// The scalar a decode over format S computes in: double for double, float otherwise.
template <class S>
using kv_compute_t = accumulator_t<kv_value_t<S>>;

/// The query (and output) scalars a cache of format S takes: S, or float for bf16, half and q8_0.
template <class S, class Q>
inline constexpr bool kv_query_scalar =
    std::is_same_v<Q, kv_value_t<S>> || (std::is_same_v<Q, float> && std::is_same_v<kv_compute_t<S>, float>);

/// The check that Q may query a cache of format S, as a static_assert naming the combinations.
template <class S, class Q>
struct KVQueryCheck {
  static_assert(kv_query_scalar<S, Q>,
                "attend: a KV cache of float or double takes queries, keys and values of its own scalar; one of "
                "Eigen::bfloat16 or Eigen::half takes them in its scalar or in float; one of attend::Q8_0 in float");
  static constexpr bool value = true;
};
template <class S, class Q>
inline constexpr bool kv_query = KVQueryCheck<S, Q>::value;

/// The scalar in which a layer (MultiHeadAttention) of scalar L queries a cache of format S: L
/// itself where the cache takes it; otherwise float for a bf16 or half layer (its projections
/// widened exactly, the attention output rounded back to L once), so that such a layer decodes
/// over a cache of any format that computes in float (float, bf16, half, q8_0).
template <class S, class L>
using layer_query_t = std::conditional_t<kv_query_scalar<S, L> || !is_reduced_precision<L>, L, float>;

/// m itself when its scalar is Q, else a copy of it in Q (a plain matrix or vector): a layer's
/// rows in layer_query_t.
template <class Q, class X>
decltype(auto) in_scalar(const Eigen::MatrixBase<X>& m) {
  if constexpr (std::is_same_v<typename X::Scalar, Q>)
    return (m.derived());
  else
    return Eigen::Matrix<Q, X::RowsAtCompileTime, X::ColsAtCompileTime,
                         X::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor>(m.template cast<Q>());
}

/// Elements of one row head of d values: d, or its q8_0 blocks.
template <class E>
constexpr Index kv_head_elements(Index d) {
  if constexpr (std::is_same_v<E, BlockQ8_0>)
    return q8_blocks(d);
  else
    return d;
}

/// W = kLanes<float> signed bytes at p as a float packet, exactly.
inline Packet<float> load_q8(const std::int8_t* p) {
#if defined(EIGEN_VECTORIZE_AVX512)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(EIGEN_VECTORIZE_AVX2)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(Packet<float>) float lanes[kLanes<float>];
  for (Index i = 0; i < kLanes<float>; ++i) lanes[i] = float(p[i]);
  return Eigen::internal::pload<Packet<float>>(lanes);
#endif
}

/// Asks Linux for transparent huge pages over the whole 2 MiB pages of [p, p + bytes), before
/// they are first touched (where THP is in its "madvise" mode). A decode step reads cache rows
/// that are a 4 KiB page or more apart (a row of 8 heads of 128 floats is one page), so with
/// small pages every row costs a TLB miss. A hint: refused or unsupported, nothing changes.
inline void advise_huge_pages(const void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const std::uintptr_t huge = std::uintptr_t(1) << 21, at = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t begin = (at + huge - 1) & ~(huge - 1), end = (at + bytes) & ~(huge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

/// An allocator that leaves trivial elements uninitialized, so that a q8_0 buffer's pages are
/// first touched by its writes (after advise_huge_pages).
template <class T>
struct UninitializedAllocator : std::allocator<T> {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

/// The rows of one cache buffer in format S: `rows` rows of `heads` heads of d values each.
/// Scalar formats are a Matrix<S> (rows, heads d); q8_0 is heads * ceil(d / 32) blocks a row.
/// Writes convert once: bf16 and half round to nearest even, q8_0 quantizes (quantized.hpp).
template <class S>
class KVRows {
 public:
  using Element = kv_element_t<S>;
  using Value = kv_value_t<S>;
  static constexpr bool kQuantized = std::is_same_v<S, Q8_0>;

  KVRows() = default;
  /// \throws attend::invalid_argument naming `what` when no array of that size can exist or be allocated
  KVRows(Index rows, Index heads, Index dim, const char* what)
      : rows_(rows), heads_(heads), dim_(dim), stride_(heads * kv_head_elements<Element>(dim)) {
    if constexpr (kQuantized) {
      check_array_size<float>(rows, stride_ * Index(sizeof(Element) / sizeof(float)), what);
#ifdef ATTEND_NO_EXCEPTIONS
      data_.reserve(std::size_t(rows * stride_));
#else
      try {
        data_.reserve(std::size_t(rows * stride_));
      } catch (const std::bad_alloc&) {
        fail_check(std::string(what) + " of " + std::to_string(rows) + " rows of " + std::to_string(stride_) +
                   " q8_0 blocks cannot be allocated");
      }
#endif
      advise_huge_pages(data_.data(), std::size_t(rows * stride_) * sizeof(Element));
      data_.resize(std::size_t(rows * stride_));  // (uninitialized: touches nothing)
    } else {
      data_ = allocate_array<S>(rows, stride_, what);
      advise_huge_pages(data_.data(), std::size_t(rows * stride_) * sizeof(Element));
    }
  }

  Index rows() const { return rows_; }
  /// Values of a row: heads d.
  Index width() const { return heads_ * dim_; }
  /// Elements from one row to the next.
  Index stride() const { return stride_; }
  /// Bytes of one row.
  Index row_bytes() const { return stride_ * Index(sizeof(Element)); }

  const Element* row(Index r) const { return data_.data() + r * stride_; }

  /// Rows [r, r + n) = x (n, heads d), converted to the format once.
  template <class D>
  void assign(Index r, const Eigen::MatrixBase<D>& x) {
    if constexpr (kQuantized) {
      const Index nb = q8_blocks(dim_);
      std::vector<float> buffer(static_cast<std::size_t>(dim_));
      // A map cannot resize: assigning to a Vector here made GCC 12 see a free before a use
      // (-Wuse-after-free, a false positive that broke -Wall -Werror builds without -march).
      Eigen::Map<Vector<float>> values(buffer.data(), dim_);
      for (Index i = 0; i < x.rows(); ++i)
        for (Index g = 0; g < heads_; ++g) {
          values = x.row(i).segment(g * dim_, dim_).transpose().template cast<float>();
          BlockQ8_0* blocks = data_.data() + (r + i) * stride_ + g * nb;
          for (Index b = 0; b < nb; ++b)
            quantize_q8_0(values.data() + b * kQ8Block, std::min(kQ8Block, dim_ - b * kQ8Block), blocks[b]);
        }
    } else {
      data_.middleRows(r, x.rows()) = x.template cast<S>();
    }
  }

  /// Rows [dst, dst + n) = rows [src, src + n) (the ranges may overlap).
  void copy_rows(Index dst, Index src, Index n) {
    if (n > 0) std::memmove(static_cast<void*>(data_.data() + dst * stride_), data_.data() + src * stride_,
                            std::size_t(n * stride_) * sizeof(Element));
  }

  /// The raw elements of rows [r, r + n), and their restoration (an undo's copy).
  std::vector<Element> save(Index r, Index n) const {
    return std::vector<Element>(row(r), row(r) + n * stride_);
  }
  void restore(Index r, const std::vector<Element>& saved) {
    std::copy(saved.begin(), saved.end(), data_.data() + r * stride_);
  }

  /// (n, heads d) rows [r, r + n) as values: a copy, dequantized for q8_0 (inspection and tests;
  /// the decode kernel reads the rows in their format).
  Matrix<Value> read(Index r, Index n) const {
    if constexpr (kQuantized) {
      Matrix<float> out(n, width());
      const Index nb = q8_blocks(dim_);
      for (Index i = 0; i < n; ++i)
        for (Index g = 0; g < heads_; ++g)
          for (Index c = 0; c < dim_; ++c)
            out(i, g * dim_ + c) = dequantize_q8_0(row(r + i)[g * nb + c / kQ8Block], c % kQ8Block);
      return out;
    } else {
      return data_.middleRows(r, n);
    }
  }

  /// The buffer of a scalar format (rows, heads d).
  const Matrix<S>& matrix() const {
    static_assert(!kQuantized, "a q8_0 buffer is no matrix");
    return data_;
  }

 private:
  Index rows_ = 0, heads_ = 0, dim_ = 0, stride_ = 0;
  std::conditional_t<kQuantized, std::vector<BlockQ8_0, UninitializedAllocator<BlockQ8_0>>, Matrix<S>> data_;
};

}  // namespace detail
}  // namespace attend

ATTEND_PACKET_WARNINGS_POP
