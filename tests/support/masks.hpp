// SPDX-License-Identifier: MIT
// Reference masks as plain boolean matrices, written from the definitions in the docs, and a
// catalogue of mask cases that pairs each library mask with its reference visibility.
#pragma once

#include "random.hpp"
#include "reference.hpp"

#include <attend/masks.hpp>
#include <attend/options.hpp>
#include <attend/types.hpp>

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace attend::test {

/// Aligned key of query i.
inline Index aligned_key(Index i, Index lq, Index lk, Alignment alignment) {
  return alignment == Alignment::TopLeft ? i : i + lk - lq;
}

/// Key j is visible to query i iff a - left <= j <= a + right, a the aligned key; -1 unbounded.
inline BoolMatrix window_visibility(Index lq, Index lk, Index left, Index right, Alignment alignment) {
  BoolMatrix m(lq, lk);
  for (Index i = 0; i < lq; ++i) {
    const Index a = aligned_key(i, lq, lk, alignment);
    for (Index j = 0; j < lk; ++j) m(i, j) = (left < 0 || a - j <= left) && (right < 0 || j - a <= right);
  }
  return m;
}

inline BoolMatrix causal_visibility(Index lq, Index lk, Alignment alignment) {
  return window_visibility(lq, lk, -1, 0, alignment);
}

inline BoolMatrix padding_visibility(Index lq, Index lk, Index valid_length) {
  BoolMatrix m(lq, lk);
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) m(i, j) = j < valid_length;
  return m;
}

inline BoolMatrix all_visible(Index lq, Index lk) { return BoolMatrix::Constant(lq, lk, true); }

/// Number of rows of `visible` with no visible entry.
inline Index count_empty_rows(const BoolMatrix& visible) {
  Index n = 0;
  for (Index i = 0; i < visible.rows(); ++i) n += visible.row(i).any() ? 0 : 1;
  return n;
}

/// The kinds of mask the differential grids draw from.
enum class MaskKind {
  None,
  Causal,            // with the spec's alignment
  WindowZero,        // Window(0, 0)
  WindowRandom,      // Window(l, r), l and r uniform in [0, Lk)
  WindowOneSided,    // Window(l, -1) or Window(-1, r)
  WindowHuge,        // Window(l, r) with l, r >= max(Lq, Lk), up to the largest Index
  KeyPadding,        // valid length uniform in [0, Lk] (0 is drawn on purpose now and then)
  Bernoulli,         // dense boolean, p in {0.1, 0.5, 0.9}
  Additive,          // dense randn * 3 with -inf entries (and a -inf row and column)
  CausalAndPadding,  // Causal & KeyPadding
  WindowAndBoolean,  // Window & BooleanMask(p = 0.7)
  AdditiveAndCausal  // AdditiveMask & Causal
};

struct MaskSpec {
  MaskKind kind = MaskKind::None;
  Alignment alignment = Alignment::TopLeft;
};

/// Every kind, with both alignments where the kind has one.
inline std::vector<MaskSpec> all_mask_specs() {
  std::vector<MaskSpec> specs;
  for (MaskKind kind : {MaskKind::None, MaskKind::KeyPadding, MaskKind::Bernoulli, MaskKind::Additive})
    specs.push_back({kind, Alignment::TopLeft});
  for (MaskKind kind : {MaskKind::Causal, MaskKind::WindowZero, MaskKind::WindowRandom, MaskKind::WindowOneSided,
                        MaskKind::WindowHuge, MaskKind::CausalAndPadding, MaskKind::WindowAndBoolean,
                        MaskKind::AdditiveAndCausal})
    for (Alignment a : {Alignment::TopLeft, Alignment::BottomRight}) specs.push_back({kind, a});
  return specs;
}

/// Reference description of a drawn mask.
struct MaskCase {
  std::string description;          // e.g. "Window(3, 5, BottomRight)"
  BoolMatrix visible;               // (Lq, Lk) true = may attend (after -inf bias entries)
  std::optional<RealMatrix> bias;   // (Lq, Lk) additive bias, if any
  bool empty_rows_intended = false;  // the mask may hide every key of most rows by construction
};

/// The oneDNN-style guard against vacuous tests: at least half of the rows see some key, unless
/// the case hides rows on purpose.
inline ::testing::AssertionResult mostly_visible(const MaskCase& c) {
  const Index empty = count_empty_rows(c.visible);
  if (c.empty_rows_intended || 2 * empty <= c.visible.rows()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << c.description << " hides every key of " << empty << " of "
                                       << c.visible.rows() << " rows";
}

inline std::string alignment_name(Alignment a) { return a == Alignment::TopLeft ? "TopLeft" : "BottomRight"; }

namespace detail_masks {

inline std::string window_name(Index l, Index r, Alignment a) {
  return "Window(" + std::to_string(l) + ", " + std::to_string(r) + ", " + alignment_name(a) + ")";
}

/// randn * 3 with about 20% -inf entries, plus a whole -inf row and column when the matrix is large
/// enough that they do not dominate it.
template <class T>
Matrix<T> additive_bias(Index lq, Index lk, Rng& rng) {
  Matrix<T> bias = rng.normal<T>(lq, lk, 3.0);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j)
      if (rng.bernoulli(0.2)) bias(i, j) = kNegInf;
  if (lq >= 4) bias.row(rng.uniform(0, lq - 1)).setConstant(kNegInf);
  if (lk >= 4) bias.col(rng.uniform(0, lk - 1)).setConstant(kNegInf);
  return bias;
}

template <class T>
BoolMatrix finite_entries(const Matrix<T>& bias) {
  BoolMatrix m(bias.rows(), bias.cols());
  for (Index i = 0; i < bias.rows(); ++i)
    for (Index j = 0; j < bias.cols(); ++j) m(i, j) = bias(i, j) != -std::numeric_limits<T>::infinity();
  return m;
}

}  // namespace detail_masks

/// Draws a mask of `spec` for an (Lq, Lk) problem and calls f(mask, mask_case), where `mask` is
/// the library's policy (dense masks view matrices that live for the duration of the call) and
/// `mask_case` its reference visibility and bias.
template <class T, class F>
void with_mask(const MaskSpec& spec, Index lq, Index lk, Rng& rng, F&& f) {
  using namespace detail_masks;
  const Alignment a = spec.alignment;
  // Structurally empty rows: no keys, or a band that leaves rows before/after the keys.
  const bool band_may_empty = lk == 0 || lq > lk;
  const bool dense_may_empty = lq < 8 || lk < 8;
  MaskCase c;
  switch (spec.kind) {
    case MaskKind::None: {
      c = {"NoMask", all_visible(lq, lk), std::nullopt, lk == 0};
      f(NoMask{}, c);
      return;
    }
    case MaskKind::Causal: {
      c = {"Causal(" + alignment_name(a) + ")", causal_visibility(lq, lk, a), std::nullopt, band_may_empty};
      f(Causal(a), c);
      return;
    }
    case MaskKind::WindowZero:
    case MaskKind::WindowRandom:
    case MaskKind::WindowOneSided:
    case MaskKind::WindowHuge: {
      Index l = 0, r = 0;
      const Index top = std::max<Index>(lk - 1, 0);
      if (spec.kind == MaskKind::WindowRandom) {
        l = rng.uniform(0, top);
        r = rng.uniform(0, top);
      } else if (spec.kind == MaskKind::WindowOneSided) {
        const bool left_open = rng.bernoulli(0.5);
        l = left_open ? -1 : rng.uniform(0, top);
        r = left_open ? rng.uniform(0, top) : -1;
      } else if (spec.kind == MaskKind::WindowHuge) {
        const Index big = std::max(lq, lk);
        constexpr Index kLargest = std::numeric_limits<Index>::max();
        l = rng.bernoulli(0.3) ? kLargest : big + rng.uniform(0, 3);
        r = rng.bernoulli(0.3) ? kLargest : big + rng.uniform(0, 3);
      }
      c = {window_name(l, r, a), window_visibility(lq, lk, l, r, a), std::nullopt, band_may_empty};
      f(Window(l, r, a), c);
      return;
    }
    case MaskKind::KeyPadding: {
      const Index valid = rng.bernoulli(0.15) ? 0 : rng.uniform(0, lk);
      c = {"KeyPadding(" + std::to_string(valid) + ")", padding_visibility(lq, lk, valid), std::nullopt,
           valid == 0};
      f(KeyPadding(valid), c);
      return;
    }
    case MaskKind::Bernoulli: {
      const double p = rng.pick(std::vector<double>{0.1, 0.5, 0.9});
      const BoolMatrix m = rng.bernoulli(lq, lk, p);
      c = {"BooleanMask(p=" + std::to_string(p) + ")", m, std::nullopt, dense_may_empty || p < 0.2};
      f(BooleanMask(m), c);
      return;
    }
    case MaskKind::Additive: {
      const Matrix<T> bias = additive_bias<T>(lq, lk, rng);
      c = {"AdditiveMask(randn*3, -inf)", finite_entries(bias), bias.template cast<Real>(), dense_may_empty};
      f(AdditiveMask(bias), c);
      return;
    }
    case MaskKind::CausalAndPadding: {
      const Index valid = rng.uniform(std::min<Index>(lk, 1), lk);
      c = {"Causal(" + alignment_name(a) + ") & KeyPadding(" + std::to_string(valid) + ")",
           causal_visibility(lq, lk, a).array() && padding_visibility(lq, lk, valid).array(), std::nullopt,
           band_may_empty};
      f(Causal(a) & KeyPadding(valid), c);
      return;
    }
    case MaskKind::WindowAndBoolean: {
      const Index top = std::max<Index>(lk - 1, 1);
      const Index l = rng.uniform(1, top), r = rng.uniform(1, top);
      const BoolMatrix m = rng.bernoulli(lq, lk, 0.7);
      c = {window_name(l, r, a) + " & BooleanMask(p=0.7)",
           window_visibility(lq, lk, l, r, a).array() && m.array(), std::nullopt, band_may_empty || dense_may_empty};
      f(Window(l, r, a) & BooleanMask(m), c);
      return;
    }
    case MaskKind::AdditiveAndCausal: {
      const Matrix<T> bias = additive_bias<T>(lq, lk, rng);
      c = {"AdditiveMask(randn*3, -inf) & Causal(" + alignment_name(a) + ")",
           finite_entries(bias).array() && causal_visibility(lq, lk, a).array(), bias.template cast<Real>(),
           band_may_empty || dense_may_empty};
      f(AdditiveMask(bias) & Causal(a), c);
      return;
    }
  }
}

}  // namespace attend::test
