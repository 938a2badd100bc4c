// SPDX-License-Identifier: MIT
/// \file custom.hpp
/// \brief Policies written by users: FlexAttention's `mask_mod` and `score_mod`, and the
/// protocol every mask, bias and score modifier of attend follows.
///
/// The quick way is a function of indices, wrapped once:
///   MaskMod([&](Index h, Index q, Index k) { return doc[q] == doc[k]; })          // visible?
///   ScoreMod([&](float s, Index h, Index q, Index k) { return s - slope[h] * (q - k); })
/// Either function may also take the sequence first, (b, h, q, k) and (s, b, h, q, k), for
/// batched calls. A MaskMod may be given a block classification, classify(h, q0, q1, k0, k1)
/// (or with b first) returning TileKind::Empty, Full or Partial for the tile of queries
/// [q0, q1) and keys [k0, k1): kernels skip Empty tiles and call the predicate only in Partial
/// ones. It must be exact: Empty only when no key of the tile is visible, Full only when all are.
/// Both compose with every mask through `&` and work on every path, in every multi-head and
/// batched entry point (h and b are the head and sequence there) and in decoding (where q and k
/// are absolute positions, see decode_step).
///
/// The protocol, for a policy class of one's own (what the built-in ones implement):
///  - derive from `MaskBase<Derived>`, and give it `bind(const HeadIndex& at, Index Lq, Index Lk)`
///    (or `bind(Index Lq, Index Lk)` for a policy that is the same for every head), which
///    validates it against the problem (throw attend::invalid_argument) and returns a bound
///    policy with:
///  - `TileKind classify(q0, q1, k0, k1) const`: Empty, Full (nothing to do) or Partial;
///  - `KeyRange keys(q0, q1) const`: a range holding every key rows [q0, q1) may see;
///  - `void add_bias(S&& s, q0, k0) const`: changes the scores of a Partial tile whose first
///    element is (q0, k0): s(r, c) is query q0 + r against key k0 + c. Biases add here, and
///    score modifiers transform here, in the order the operands of `&` are written;
///  - `void hide(S&& s, q0, k0) const`: sets the scores of hidden keys to -infinity; runs after
///    every operand's add_bias, so what a policy hides stays hidden.
/// S is an Eigen block of the policy's scalar type, of any orientation and stride.
#pragma once

#include "masks.hpp"
#include "types.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace attend {

namespace detail {

/// Calls f(b, h, rest...) when f takes the sequence index, else f(h, rest...).
template <class F, class... Rest>
decltype(auto) call_with_head(const F& f, const HeadIndex& at, Rest... rest) {
  if constexpr (std::is_invocable_v<const F&, Index, Index, Rest...>)
    return f(at.batch, at.head, rest...);
  else
    return f(at.head, rest...);
}

/// Calls f(s, b, h, q, k) when f takes the sequence index, else f(s, h, q, k).
template <class F, class T>
decltype(auto) call_score_mod(const F& f, T s, const HeadIndex& at, Index q, Index k) {
  if constexpr (std::is_invocable_v<const F&, T, Index, Index, Index, Index>)
    return f(s, at.batch, at.head, q, k);
  else
    return f(s, at.head, q, k);
}

/// No block classification: every tile is Partial.
struct EveryTilePartial {
  TileKind operator()(Index, Index, Index, Index, Index) const { return TileKind::Partial; }
};

template <class Predicate, class Classify>
struct BoundMaskMod {
  Predicate visible;
  Classify classify_tile;
  HeadIndex at;
  Index num_keys;

  TileKind classify(Index q0, Index q1, Index k0, Index k1) const {
    return call_with_head(classify_tile, at, q0, q1, k0, k1);
  }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }
  template <class Scores>
  void add_bias(Scores&&, Index, Index) const {}
  template <class Scores>
  void hide(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c)
        if (!call_with_head(visible, at, q0 + r, k0 + c)) s(r, c) = -std::numeric_limits<T>::infinity();
  }
};

template <class Modify>
struct BoundScoreMod {
  Modify modify;
  HeadIndex at;
  Index num_keys;

  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }
  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c) s(r, c) = static_cast<T>(call_score_mod(modify, s(r, c), at, q0 + r, k0 + c));
  }
  template <class Scores>
  void hide(Scores&&, Index, Index) const {}
};

/// Logit soft-capping of a tile: s <- cap tanh(s / cap).
struct SoftCapPolicy {
  double cap;
  Index num_keys;

  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }
  template <class Scores>
  void add_bias(Scores&& s, Index, Index) const {
    using T = typename std::decay_t<Scores>::Scalar;
    const T c = static_cast<T>(cap);
    s.array() = c * (s.array() / c).tanh();
  }
  template <class Scores>
  void hide(Scores&&, Index, Index) const {}
};

}  // namespace detail

/// Visibility from a predicate of indices, FlexAttention's mask_mod: key k is visible to query q
/// of head h iff visible(h, q, k) (or visible(b, h, q, k)). With `classify` (see the file
/// comment) the kernels skip the tiles it calls Empty; without it every tile is Partial and the
/// predicate is called for every score. The functions are copied into every bound policy (keep
/// their captures cheap: references or small values) and called concurrently from several
/// threads: they must not modify shared state.
template <class Predicate, class Classify = detail::EveryTilePartial>
class MaskMod : public MaskBase<MaskMod<Predicate, Classify>> {
 public:
  explicit MaskMod(Predicate visible, Classify classify = {})
      : visible_(std::move(visible)), classify_(std::move(classify)) {}

  detail::BoundMaskMod<Predicate, Classify> bind(const HeadIndex& at, Index /*num_queries*/, Index num_keys) const {
    return {visible_, classify_, at, num_keys};
  }

 private:
  Predicate visible_;
  Classify classify_;
};

/// A score modifier from a function of the score and its indices, FlexAttention's score_mod:
/// s_qk <- modify(s_qk, h, q, k) (or modify(s, b, h, q, k)), with s the scaled score in the
/// call's scalar type. It runs on every score a mask does not skip, before any key is hidden;
/// a result of -infinity drops the key from the softmax. Copied and called as MaskMod's functions.
template <class Modify>
class ScoreMod : public MaskBase<ScoreMod<Modify>> {
 public:
  explicit ScoreMod(Modify modify) : modify_(std::move(modify)) {}

  detail::BoundScoreMod<Modify> bind(const HeadIndex& at, Index /*num_queries*/, Index num_keys) const {
    return {modify_, at, num_keys};
  }

 private:
  Modify modify_;
};

/// Logit soft-capping as a score modifier, s <- cap tanh(s / cap) (Gemma 2, Grok), for any entry
/// point that takes a mask, decoding included: `Causal() & SoftCap(50)`. Write it first in an
/// `&` so that biases written after it add to the capped scores, as Gemma 2 does. The cap must be
/// a positive finite number as a float (the narrowest scalar). soft_capped_attention
/// (attention/dot_family.hpp) computes the same scores.
struct SoftCap : MaskBase<SoftCap> {
  double cap;

  explicit SoftCap(double cap_) : cap(cap_) {}

  /// \throws attend::invalid_argument unless 0 < cap <= FLT_MAX and cap is at least FLT_MIN.
  detail::SoftCapPolicy bind(Index /*num_queries*/, Index num_keys) const {
    ATTEND_CHECK(cap >= double(std::numeric_limits<float>::min()) && cap <= double(std::numeric_limits<float>::max()),
                 "soft cap " + detail::number_string(cap) + " must be a positive finite number as a float");
    return {cap, num_keys};
  }
};

}  // namespace attend
