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
///
/// Gradients (attention/backward.hpp). The backward recomputes the scores with the same calls,
/// and needs the derivative of every score modifier. A policy whose add_bias is not a plain
/// addition of a term that does not depend on s (a modifier: s <- f(s)) must also give
///  - `void add_bias(S&& s, G&& slope, q0, k0) const`: the same change of s, and slope(r, c) *=
///    f'(s(r, c)), the derivative at the score it received (G has S's shape and orientation).
/// The backward calls that form instead, so that the chain rule runs through the modifiers in
/// the order of `&`; a policy without it is taken as additive (derivative 1), so a modifier that
/// lacks it gets wrong gradients. SoftCap has it. A ScoreMod has it when it is given the
/// derivative: `ScoreMod(modify, derivative)` with derivative(s, h, q, k) (or (s, b, h, q, k))
/// = d modify(s, h, q, k) / ds, or a modify object with a member `grad` of either form; a
/// backward of a ScoreMod without one fails to compile, naming what to provide.
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

/// A ScoreMod given no derivative: its backward does not compile (BoundScoreMod::add_bias).
struct NoScoreDerivative {};

/// Whether a ScoreMod's modify function has a member grad(s, h, q, k) or grad(s, b, h, q, k).
template <class Modify, class T, class = void>
struct has_grad_member : std::false_type {};

template <class Modify, class T>
struct has_grad_member<Modify, T,
                       std::void_t<decltype(std::declval<const Modify&>().grad(T(0), Index(0), Index(0), Index(0)))>>
    : std::true_type {};

template <class Modify, class T, class = void>
struct has_batched_grad_member : std::false_type {};

template <class Modify, class T>
struct has_batched_grad_member<
    Modify, T, std::void_t<decltype(std::declval<const Modify&>().grad(T(0), Index(0), Index(0), Index(0), Index(0)))>>
    : std::true_type {};

/// Logit soft-capping of a tile with its derivative: s <- cap tanh(s / cap), and
/// slope *= d s_new / d s = 1 - tanh^2(s / cap). The one routine of the SoftCap policy's
/// backward and soft_capped_attention's (detail::SoftCapModifier); its scores round as
/// SoftCapPolicy::add_bias's.
template <class Scores, class Slopes, class T>
void soft_cap_with_slope(Scores&& s, Slopes&& slope, T cap) {
  s.array() = (s.array() / cap).tanh();
  slope.array() *= T(1) - s.array().square();
  s.array() *= cap;
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

template <class Modify, class Derivative>
struct BoundScoreMod {
  Modify modify;
  Derivative derivative;
  HeadIndex at;
  Index num_keys;

  TileKind classify(Index, Index, Index, Index) const { return TileKind::Partial; }
  KeyRange keys(Index, Index) const { return {0, num_keys}; }
  template <class Scores>
  void add_bias(Scores&& s, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c)
        s(r, c) = static_cast<T>(call_score_mod(modify, s(r, c), at, q0 + r, k0 + c));
  }
  /// For the backward: the same scores, and slope *= d modify(s) / ds at each score.
  template <class Scores, class Slopes>
  void add_bias(Scores&& s, Slopes&& slope, Index q0, Index k0) const {
    using T = typename std::decay_t<Scores>::Scalar;
    constexpr bool given = !std::is_same_v<Derivative, NoScoreDerivative>;
    constexpr bool member = has_grad_member<Modify, T>::value || has_batched_grad_member<Modify, T>::value;
    static_assert(given || member,
                  "attend: the backward of a ScoreMod needs the derivative of its function: construct it as "
                  "ScoreMod(modify, derivative) with derivative(s, h, q, k) (or (s, b, h, q, k)) returning "
                  "d modify(s, h, q, k) / ds, or give the modify object a member grad(s, h, q, k)");
    for (Index r = 0; r < s.rows(); ++r)
      for (Index c = 0; c < s.cols(); ++c) {
        const T x = s(r, c);
        const Index q = q0 + r, k = k0 + c;
        s(r, c) = static_cast<T>(call_score_mod(modify, x, at, q, k));
        if constexpr (given)
          slope(r, c) *= static_cast<T>(call_score_mod(derivative, x, at, q, k));
        else if constexpr (has_batched_grad_member<Modify, T>::value)
          slope(r, c) *= static_cast<T>(modify.grad(x, at.batch, at.head, q, k));
        else if constexpr (member)
          slope(r, c) *= static_cast<T>(modify.grad(x, at.head, q, k));
      }
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
  /// For the backward: the same scores, and slope *= 1 - tanh^2(s / cap).
  template <class Scores, class Slopes>
  void add_bias(Scores&& s, Slopes&& slope, Index, Index) const {
    soft_cap_with_slope(s, slope, static_cast<typename std::decay_t<Scores>::Scalar>(cap));
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
/// For gradients, give `derivative(s, h, q, k)` (or (s, b, h, q, k)) = d modify(s, h, q, k) / ds,
/// evaluated at the same s; or a modify object with a member `grad` of that form. A dropped key
/// (-infinity) gets no gradient whatever the derivative says there.
template <class Modify, class Derivative = detail::NoScoreDerivative>
class ScoreMod : public MaskBase<ScoreMod<Modify, Derivative>> {
 public:
  explicit ScoreMod(Modify modify, Derivative derivative = {})
      : modify_(std::move(modify)), derivative_(std::move(derivative)) {}

  detail::BoundScoreMod<Modify, Derivative> bind(const HeadIndex& at, Index /*num_queries*/, Index num_keys) const {
    return {modify_, derivative_, at, num_keys};
  }

 private:
  Modify modify_;
  Derivative derivative_;
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
