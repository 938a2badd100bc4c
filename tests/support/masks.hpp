// SPDX-License-Identifier: MIT
// Reference masks as plain boolean matrices, written from the definitions in the docs, and a
// catalogue of mask cases that pairs each library mask with its reference visibility.
#pragma once

#include "random.hpp"
#include "reference.hpp"

#include <attend/biases.hpp>
#include <attend/masks.hpp>
#include <attend/options.hpp>
#include <attend/types.hpp>

#include <algorithm>
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
  Real largest_bias = 0;             // largest finite |bias| of one operand, when two add biases
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
  if (lq >= 4 && lk >= 1) bias.row(rng.uniform(0, lq - 1)).setConstant(kNegInf);
  if (lk >= 4 && lq >= 1) bias.col(rng.uniform(0, lk - 1)).setConstant(kNegInf);  // (no block of an empty matrix)
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

/// The built-in masks and biases, as operands of `a & b`.
enum class OperandKind { None, Causal, Window, KeyPadding, Boolean, Additive, Alibi, RelativePosition };

inline std::vector<OperandKind> all_operand_kinds() {
  return {OperandKind::None,    OperandKind::Causal,   OperandKind::Window, OperandKind::KeyPadding,
          OperandKind::Boolean, OperandKind::Additive, OperandKind::Alibi,  OperandKind::RelativePosition};
}

/// One operand of a composed mask, drawn before the mask is built so that each operand can plant
/// values where the other hides keys. Dense operands view `boolean`, `additive` or `table`.
template <class T>
struct Operand {
  OperandKind kind = OperandKind::None;
  std::string description;
  BoolMatrix visible;              // (Lq, Lk) keys this operand lets through
  std::optional<RealMatrix> bias;  // (Lq, Lk) what it adds to the scores, if anything
  Alignment alignment = Alignment::TopLeft;
  Index left = -1, right = -1;  // Window
  Index valid_length = 0;       // KeyPadding
  double slope = 0;             // Alibi
  BoolMatrix boolean;           // Boolean (Lq, Lk)
  Matrix<T> additive;           // Additive (Lq, Lk)
  Vector<T> table;              // RelativePosition (32 buckets, bidirectional, max distance 16)
  Matrix<Index> bucket;         // RelativePosition: bucket of (i, j)
};

namespace detail_masks {

inline constexpr Index kBuckets = 32, kMaxDistance = 16;

/// The values planted where the other operand hides a key, in turn.
template <class T>
T planted_value(Index n) {
  const T values[] = {std::numeric_limits<T>::infinity(), std::numeric_limits<T>::quiet_NaN(),
                      -std::numeric_limits<T>::infinity()};
  return values[n % 3];
}

}  // namespace detail_masks

/// Draws an operand of `kind` for an (Lq, Lk) problem: windows of sides in [1, Lk), padding of at
/// least half the keys, booleans with p = 0.7, additive randn * 3 with 20% -inf, ALiBi slopes in
/// (0, 1), T5 tables of randn * 3.
template <class T>
Operand<T> draw_operand(OperandKind kind, Index lq, Index lk, Alignment a, Rng& rng) {
  using namespace detail_masks;
  Operand<T> o;
  o.kind = kind;
  o.alignment = a;
  o.visible = all_visible(lq, lk);
  switch (kind) {
    case OperandKind::None: o.description = "NoMask"; break;
    case OperandKind::Causal:
      o.description = "Causal(" + alignment_name(a) + ")";
      o.visible = causal_visibility(lq, lk, a);
      break;
    case OperandKind::Window:
      o.left = rng.uniform(1, std::max<Index>(lk - 1, 1));
      o.right = rng.uniform(1, std::max<Index>(lk - 1, 1));
      o.description = window_name(o.left, o.right, a);
      o.visible = window_visibility(lq, lk, o.left, o.right, a);
      break;
    case OperandKind::KeyPadding:
      o.valid_length = rng.uniform((lk + 1) / 2, lk);
      o.description = "KeyPadding(" + std::to_string(o.valid_length) + ")";
      o.visible = padding_visibility(lq, lk, o.valid_length);
      break;
    case OperandKind::Boolean:
      o.boolean = rng.bernoulli(lq, lk, 0.7);
      o.description = "BooleanMask(p=0.7)";
      o.visible = o.boolean;
      break;
    case OperandKind::Additive:
      o.additive = rng.normal<T>(lq, lk, 3.0);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
          if (rng.bernoulli(0.2)) o.additive(i, j) = -std::numeric_limits<T>::infinity();
      o.description = "AdditiveMask(randn*3, -inf)";
      o.visible = finite_entries(o.additive);
      o.bias = o.additive.template cast<Real>();
      break;
    case OperandKind::Alibi: {
      o.slope = std::ldexp(double(rng.uniform(1, 255)), -8);  // exact in float
      o.description = "Alibi(" + std::to_string(o.slope) + ", " + alignment_name(a) + ")";
      RealMatrix bias(lq, lk);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j) bias(i, j) = -Real(o.slope) * Real(std::abs(j - aligned_key(i, lq, lk, a)));
      o.bias = bias;
      break;
    }
    case OperandKind::RelativePosition: {
      o.table = rng.normal<T>(kBuckets, 1, 3.0);
      o.description = "RelativePositionBias(" + alignment_name(a) + ")";
      o.bucket.resize(lq, lk);
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
          o.bucket(i, j) = relative_position_bucket(j - aligned_key(i, lq, lk, a), true, kBuckets, kMaxDistance);
      break;
    }
  }
  return o;
}

/// The reference bias of a T5 operand, from its table (after any planting).
template <class T>
RealMatrix relative_position_reference(const Operand<T>& o) {
  RealMatrix bias(o.bucket.rows(), o.bucket.cols());
  for (Index i = 0; i < bias.rows(); ++i)
    for (Index j = 0; j < bias.cols(); ++j) bias(i, j) = Real(o.table(o.bucket(i, j)));
  return bias;
}

/// Plants +inf, NaN and -inf in turn into the data of `o` where only `hidden` keys read them: every
/// hidden entry of an additive mask, and every bucket of a T5 table that only hidden keys fall in.
template <class T>
void plant_where_hidden(Operand<T>& o, const BoolMatrix& hidden) {
  using namespace detail_masks;
  Index n = 0;
  if (o.kind == OperandKind::Additive) {
    for (Index i = 0; i < hidden.rows(); ++i)
      for (Index j = 0; j < hidden.cols(); ++j)
        if (hidden(i, j)) o.additive(i, j) = planted_value<T>(n++);
    o.bias = o.additive.template cast<Real>();
  } else if (o.kind == OperandKind::RelativePosition) {
    std::vector<bool> read_by_visible(static_cast<std::size_t>(kBuckets), false), read(read_by_visible);
    for (Index i = 0; i < hidden.rows(); ++i)
      for (Index j = 0; j < hidden.cols(); ++j) {
        read[std::size_t(o.bucket(i, j))] = true;
        if (!hidden(i, j)) read_by_visible[std::size_t(o.bucket(i, j))] = true;
      }
    for (Index b = 0; b < kBuckets; ++b)
      if (read[std::size_t(b)] && !read_by_visible[std::size_t(b)]) o.table(b) = planted_value<T>(n++);
    o.bias = relative_position_reference(o);
  }
}

/// Calls f(mask) with the library's policy for `o` (dense ones view the data of `o`).
template <class T, class F>
void with_operand_mask(const Operand<T>& o, F&& f) {
  switch (o.kind) {
    case OperandKind::None: f(NoMask{}); return;
    case OperandKind::Causal: f(Causal(o.alignment)); return;
    case OperandKind::Window: f(Window(o.left, o.right, o.alignment)); return;
    case OperandKind::KeyPadding: f(KeyPadding(o.valid_length)); return;
    case OperandKind::Boolean: f(BooleanMask(o.boolean)); return;
    case OperandKind::Additive: f(AdditiveMask(o.additive)); return;
    case OperandKind::Alibi: f(Alibi(o.slope, o.alignment)); return;
    case OperandKind::RelativePosition:
      f(RelativePositionBias(o.table, true, detail_masks::kMaxDistance, o.alignment));
      return;
  }
}

/// Draws operands of kinds `a` and `b` (with one alignment), plants +inf, NaN and -inf in each
/// where only the other hides keys, and calls f(mask, mask_case) with `A & B` and then with `B & A`:
/// both have the reference of the intersection (the keys both let through, the sum of the biases),
/// which the planted values never reach. When `nan_at_visible` and an operand is additive, one key
/// that both let through holds NaN as well, so one row's reference is NaN.
template <class T, class F>
void with_mask_pair(OperandKind a, OperandKind b, Index lq, Index lk, Alignment alignment, bool nan_at_visible,
                    Rng& rng, F&& f) {
  Operand<T> first = draw_operand<T>(a, lq, lk, alignment, rng), second = draw_operand<T>(b, lq, lk, alignment, rng);
  const BoolMatrix visible = first.visible.array() && second.visible.array();
  // Each operand keeps hiding what it hides itself (two additive masks may share a -inf key).
  const BoolMatrix only_second_hides = first.visible.array() && !second.visible.array();
  const BoolMatrix only_first_hides = second.visible.array() && !first.visible.array();
  plant_where_hidden(first, only_second_hides);
  plant_where_hidden(second, only_first_hides);
  if (nan_at_visible)
    for (Operand<T>* o : {&first, &second}) {
      if (o->kind != OperandKind::Additive || !visible.any()) continue;
      Index i = 0, j = 0;
      do {
        i = rng.uniform(0, lq - 1);
        j = rng.uniform(0, lk - 1);
      } while (!visible(i, j));
      o->additive(i, j) = std::numeric_limits<T>::quiet_NaN();
      (*o->bias)(i, j) = std::numeric_limits<Real>::quiet_NaN();
      break;
    }
  std::optional<RealMatrix> bias = first.bias;
  Real largest_bias = 0;
  if (second.bias && bias) {
    for (const RealMatrix* m : {&*first.bias, &*second.bias})
      for (Index i = 0; i < lq; ++i)
        for (Index j = 0; j < lk; ++j)
          if (std::isfinite((*m)(i, j))) largest_bias = std::max(largest_bias, std::fabs((*m)(i, j)));
    bias = RealMatrix(*bias + *second.bias);
  } else if (second.bias) {
    bias = second.bias;
  }
  MaskCase c{first.description + " & " + second.description, visible, bias, false, largest_bias};
  with_operand_mask(first, [&](const auto& mask_a) {
    with_operand_mask(second, [&](const auto& mask_b) {
      f(mask_a & mask_b, c);
      MaskCase reversed = c;
      reversed.description = second.description + " & " + first.description;
      f(mask_b & mask_a, reversed);
    });
  });
}

}  // namespace attend::test
