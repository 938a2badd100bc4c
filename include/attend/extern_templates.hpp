// SPDX-License-Identifier: MIT
/// \file extern_templates.hpp
/// \brief Compile attend's common instantiations once: `extern template` declarations of the
/// heavy cores for float and double, defined in the library attend::precompiled.
///
/// A translation unit that includes <attend/attend.hpp> and makes one call instantiates the
/// whole engine (tile kernels, softmax, Eigen's matrix products): about 4 s of g++ -O2. With
/// these declarations it instantiates only the thin public wrappers (shape checks, views) and
/// calls the cores compiled once in attend::precompiled: about 1 s, near the cost of parsing
/// Eigen/Core (benchmarks/compile_time.sh measures both). Results are bitwise those of the
/// header-only build (tests/precompiled checks it).
///
/// Use (CMake): `target_link_libraries(app PRIVATE attend::precompiled)`. The target defines
/// ATTEND_EXTERN_TEMPLATES for its users, which makes <attend/attend.hpp> include this header.
/// Elsewhere: compile src/precompiled.cpp (it defines ATTEND_INSTANTIATE_PRECOMPILED and includes
/// this header) into your program with the flags of the rest of it, and define
/// ATTEND_EXTERN_TEMPLATES (or include this header) where you use attend.
///
/// What is precompiled, for T in {float, double} (ATTEND_PRECOMPILED_CORES lists it once for
/// both the declarations and the definitions, so the two cannot differ):
/// - the scaled dot-product score's checks and path choice (`detail::attention_into`) for
///   NoMask, Causal, Window, KeyPadding, BooleanMask and AdditiveMask<T>, and its blocked and
///   materialized paths for their bound forms: every scaled_dot_product_attention* and
///   multi-head call with those masks;
/// - the projection `detail::linear<T>` of MultiHeadAttention, the decode step
///   `decode_step_into` over Matrix<T> inputs without a mask (what decode_step with a layer
///   calls), and the classes
///   MultiHeadAttention<T>, RotaryEmbedding<T> and KVCache<T>.
/// Other entry points, scalars and masks (e.g. `a & b`) compile from the headers as before.
///
/// ### The pitfall: the library and its users must be compiled with the same flags
/// An instantiation compiled with `-march=native` contains AVX-512 code and assumes Eigen's
/// 64-byte alignment; a user compiled without it allocates with 16-byte alignment, and the
/// linker keeps one copy of each inline Eigen function that both compiled (an ODR violation:
/// wrong results, misaligned loads or illegal instructions). The same holds for -mfma, the
/// exceptions setting and EIGEN_* configuration macros. So attend::precompiled passes its
/// options on to whoever links it (ATTEND_PRECOMPILED_OPTIONS, PUBLIC), and this header refers to
/// a symbol whose name records the vector ISA, FMA, Eigen's alignment and exceptions
/// (e.g. `attend_precompiled_built_with_avx512_fma_align64_exceptions`): a user compiled
/// otherwise fails to link, naming what it expected, instead of running mismatched code.
#pragma once

#include "attend.hpp"

// Vector instruction set, FMA, alignment and exceptions: what must match between the library
// and its users (see "The pitfall" above).
#if defined(EIGEN_VECTORIZE_AVX512)
#define ATTEND_PRECOMPILED_ISA avx512
#elif defined(EIGEN_VECTORIZE_AVX2)
#define ATTEND_PRECOMPILED_ISA avx2
#elif defined(EIGEN_VECTORIZE_AVX)
#define ATTEND_PRECOMPILED_ISA avx
#elif defined(EIGEN_VECTORIZE_SSE4_2)
#define ATTEND_PRECOMPILED_ISA sse4_2
#elif defined(EIGEN_VECTORIZE_SSE2)
#define ATTEND_PRECOMPILED_ISA sse2
#elif defined(EIGEN_VECTORIZE_NEON)
#define ATTEND_PRECOMPILED_ISA neon
#else
#define ATTEND_PRECOMPILED_ISA scalar
#endif
#if defined(EIGEN_VECTORIZE_FMA)
#define ATTEND_PRECOMPILED_FMA fma
#else
#define ATTEND_PRECOMPILED_FMA nofma
#endif
#if defined(ATTEND_NO_EXCEPTIONS)
#define ATTEND_PRECOMPILED_EXCEPTIONS noexceptions
#else
#define ATTEND_PRECOMPILED_EXCEPTIONS exceptions
#endif
#define ATTEND_PRECOMPILED_CONCAT_(isa, fma, align, exc) \
  attend_precompiled_built_with_##isa##_##fma##_align##align##_##exc
#define ATTEND_PRECOMPILED_CONCAT(isa, fma, align, exc) ATTEND_PRECOMPILED_CONCAT_(isa, fma, align, exc)
/// The name of the symbol that records the build configuration of attend::precompiled.
#define ATTEND_PRECOMPILED_BUILD_TAG                                                               \
  ATTEND_PRECOMPILED_CONCAT(ATTEND_PRECOMPILED_ISA, ATTEND_PRECOMPILED_FMA, EIGEN_MAX_ALIGN_BYTES, \
                            ATTEND_PRECOMPILED_EXCEPTIONS)

/// The precompiled instantiations for scalar T; PREFIX is `extern template` (declarations) or
/// `template` (definitions, in src/precompiled.cpp). Expanded inside namespace attend.
#define ATTEND_PRECOMPILED_CORES(PREFIX, T)                                                                      \
  ATTEND_PRECOMPILED_PATHS(PREFIX, T, detail::AllVisible)                                                        \
  ATTEND_PRECOMPILED_PATHS(PREFIX, T, detail::Band)                                                              \
  ATTEND_PRECOMPILED_PATHS(PREFIX, T, detail::DenseBoolean)                                                      \
  ATTEND_PRECOMPILED_PATHS(PREFIX, T, detail::DenseBias<T>)                                                      \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, NoMask)                                                                 \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, Causal)                                                                 \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, Window)                                                                 \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, KeyPadding)                                                             \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, BooleanMask)                                                            \
  ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, AdditiveMask<T>)                                                        \
  PREFIX Matrix<T> detail::linear<T>(const ConstMatrixRef<T>&, const Matrix<T>&, const Vector<T>&, const char*); \
  PREFIX void decode_step_into<T, Matrix<T>, Matrix<T>, Matrix<T>, NoMask>(                                      \
      KVCache<T>&, const Eigen::MatrixBase<Matrix<T>>&, const Eigen::MatrixBase<Matrix<T>>&,                     \
      const Eigen::MatrixBase<Matrix<T>>&, Index, MatrixRef<T>, const MaskBase<NoMask>&,                         \
      const AttentionOptions&, const Eigen::Ref<const Vector<T>>&);                                              \
  PREFIX class MultiHeadAttention<T>;                                                                            \
  PREFIX class RotaryEmbedding<T>;                                                                               \
  PREFIX class KVCache<T>;

/// The blocked and materialized paths of the scaled dot-product score for one bound mask.
#define ATTEND_PRECOMPILED_PATHS(PREFIX, T, BOUND)                                                               \
  PREFIX void detail::blocked_attention<T, T, T, detail::ScaledDot<T>, BOUND>(                                   \
      const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const detail::ScaledDot<T>&, \
      const BOUND&, detail::TileShape, MatrixRef<T>, VectorRef<T>);                                              \
  PREFIX void detail::materialized_attention<T, detail::ScaledDot<T>, BOUND>(                                    \
      const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const detail::ScaledDot<T>&, \
      const BOUND&, MatrixRef<T>, VectorRef<T>, MatrixRef<T>);

/// The checks and path choice of the scaled dot-product score for one mask.
#define ATTEND_PRECOMPILED_DISPATCH(PREFIX, T, MASK)                                                             \
  PREFIX void detail::attention_into<T, detail::ScaledDot<T>, MASK>(                                             \
      const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const detail::ScaledDot<T>&, \
      const MASK&, const AttentionOptions&, MatrixRef<T>, VectorRef<T>, const HeadIndex&);

#if defined(ATTEND_INSTANTIATE_PRECOMPILED)
#define ATTEND_PRECOMPILED_PREFIX template
#else
#define ATTEND_PRECOMPILED_PREFIX extern template
#endif

namespace attend {
ATTEND_PRECOMPILED_CORES(ATTEND_PRECOMPILED_PREFIX, float)
ATTEND_PRECOMPILED_CORES(ATTEND_PRECOMPILED_PREFIX, double)
}  // namespace attend

#if defined(ATTEND_INSTANTIATE_PRECOMPILED)
/// Defined by the library only: its build configuration, as a name.
extern "C" const int ATTEND_PRECOMPILED_BUILD_TAG = 1;
#else
extern "C" const int ATTEND_PRECOMPILED_BUILD_TAG;
namespace attend::detail {
/// Refers to the library's configuration symbol from every user, so that a user compiled with
/// other flags fails to link (undefined reference naming the configuration it expected).
/// (GCC and clang; MSVC builds have no such check.)
#if defined(__GNUC__)
[[maybe_unused, gnu::used]] static const int* const precompiled_build_check = &ATTEND_PRECOMPILED_BUILD_TAG;
#endif
}  // namespace attend::detail
#endif

/// The backward (attention/backward.hpp) of the scaled dot-product score, for T in {float,
/// double}: the checks and path choice (`detail::attention_backward_into`) for the masks above,
/// and the blocked and materialized paths and the multi-head passes for their bound forms, with
/// and without bias gradients: the cores of every scaled_dot_product_attention_backward*,
/// multi-head and layer backward with those masks (local window, top-k, soft-capped, bilinear and
/// cosine backward, other masks and `a & b` compile from the headers).
#define ATTEND_PRECOMPILED_BACKWARD_CORES(PREFIX, T)               \
  ATTEND_PRECOMPILED_BACKWARD_PATHS(PREFIX, T, detail::AllVisible)   \
  ATTEND_PRECOMPILED_BACKWARD_PATHS(PREFIX, T, detail::Band)         \
  ATTEND_PRECOMPILED_BACKWARD_PATHS(PREFIX, T, detail::DenseBoolean) \
  ATTEND_PRECOMPILED_BACKWARD_PATHS(PREFIX, T, detail::DenseBias<T>) \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, NoMask)            \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, Causal)            \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, Window)            \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, KeyPadding)        \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, BooleanMask)       \
  ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, AdditiveMask<T>)

/// The blocked and materialized backward and the multi-head passes for one bound mask, without
/// and with the sinks of bias gradients (the entry points choose at run time).
#define ATTEND_PRECOMPILED_BACKWARD_PATHS(PREFIX, T, BOUND)                       \
  ATTEND_PRECOMPILED_BACKWARD_SINK_PATHS(PREFIX, T, BOUND, detail::NoBiasGradient) \
  ATTEND_PRECOMPILED_BACKWARD_SINK_PATHS(PREFIX, T, BOUND, detail::BiasGradientSink<T>)

#define ATTEND_PRECOMPILED_BACKWARD_SINK_PATHS(PREFIX, T, BOUND, SINK)                                           \
  PREFIX void detail::blocked_backward<T, detail::IdentityModifier, BOUND, SINK>(                                \
      const detail::BackwardHead<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, T,                     \
      const detail::IdentityModifier&, const BOUND&, detail::TileShape, MatrixRef<T>, MatrixRef<T>, MatrixRef<T>, \
      const SINK&);                                                                                              \
  PREFIX void detail::materialized_backward<T, detail::IdentityModifier, BOUND, SINK>(                           \
      const detail::BackwardHead<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, T,                     \
      const detail::IdentityModifier&, const BOUND&, MatrixRef<T>, MatrixRef<T>, MatrixRef<T>, const SINK&);     \
  PREFIX void detail::multi_head_backward_passes<T, BOUND, SINK>(                                                \
      const std::vector<detail::BackwardSequence<T, BOUND, SINK>>&, const detail::HeadLayout&, T);

/// The checks and path choice of the backward for one mask, without and with bias gradients.
#define ATTEND_PRECOMPILED_BACKWARD_DISPATCH(PREFIX, T, MASK)                     \
  ATTEND_PRECOMPILED_BACKWARD_SINK_DISPATCH(PREFIX, T, MASK, detail::NoBiasGradient) \
  ATTEND_PRECOMPILED_BACKWARD_SINK_DISPATCH(PREFIX, T, MASK, detail::BiasGradientSink<T>)

#define ATTEND_PRECOMPILED_BACKWARD_SINK_DISPATCH(PREFIX, T, MASK, SINK)                                         \
  PREFIX void detail::attention_backward_into<T, detail::IdentityModifier, MASK, SINK>(                          \
      const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&, const ConstMatrixRef<T>&,   \
      const detail::ConstStridedVectorRef<T>&, const ConstMatrixRef<T>&, T, const detail::IdentityModifier&,     \
      const MASK&, const AttentionOptions&, MatrixRef<T>, MatrixRef<T>, MatrixRef<T>, const SINK&);

namespace attend {
ATTEND_PRECOMPILED_BACKWARD_CORES(ATTEND_PRECOMPILED_PREFIX, float)
ATTEND_PRECOMPILED_BACKWARD_CORES(ATTEND_PRECOMPILED_PREFIX, double)
}  // namespace attend
