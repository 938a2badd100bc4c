// SPDX-License-Identifier: MIT
/// \file distributed/shard_mask.hpp
/// \brief A mask of global positions seen from one pair of shard segments.
///
/// A ring step computes queries [q_begin, q_begin + lq) against keys [k_begin, k_begin + lk) of
/// the global (Lq, Lk) problem. A band mask (causal, window, key padding: masks.hpp's `Band`,
/// lo(i) <= j < hi(i) with lo and hi moving one key per query) stays a band in the pair's local
/// coordinates i' = i - q_begin, j' = j - k_begin:
///   offset' = offset + q_begin - k_begin,   key_end' = clamp(key_end - k_begin, 0, lk),
/// with the same left and right sides. `shard_mask(mask, Lq, Lk, q_begin, k_begin)` maps NoMask,
/// Causal (either alignment), Window, KeyPadding and their intersections `a & b` to that local
/// mask; it binds the global mask first, so it throws where the global mask would (a bad window,
/// a padding length past Lk). Dense masks (BooleanMask, AdditiveMask) are not supported: they
/// would need the whole (Lq, Lk) matrix on every rank.
#pragma once

#include "../masks.hpp"
#include "../types.hpp"

#include <algorithm>
#include <type_traits>

namespace attend::distributed {

/// The band `global` (bound to the global problem) seen from the segment pair whose first query
/// is global query `query_begin` and whose first key is global key `key_begin`.
struct ShiftedBand : MaskBase<ShiftedBand> {
  attend::detail::Band global;
  Index query_begin = 0;
  Index key_begin = 0;

  ShiftedBand(const attend::detail::Band& band, Index q_begin, Index k_begin)
      : global(band), query_begin(q_begin), key_begin(k_begin) {}

  attend::detail::Band bind(Index /*num_queries*/, Index num_keys) const {
    return {std::clamp(global.key_end - key_begin, Index(0), num_keys), global.offset + query_begin - key_begin,
            global.left, global.right};
  }
};

namespace detail {

/// sharded<M>::map(mask, Lq, Lk, q_begin, k_begin) is M's local mask; no map: M is not supported.
template <class M, class = void>
struct sharded {};

template <>
struct sharded<NoMask> {
  static NoMask map(const NoMask&, Index, Index, Index, Index) { return {}; }
};

template <class M>
struct sharded<M, std::enable_if_t<std::is_same_v<M, Causal> || std::is_same_v<M, Window> ||
                                   std::is_same_v<M, KeyPadding>>> {
  static ShiftedBand map(const M& mask, Index num_queries, Index num_keys, Index q_begin, Index k_begin) {
    return {mask.bind(num_queries, num_keys), q_begin, k_begin};
  }
};

template <class A, class B>
struct sharded<Intersection<A, B>, std::void_t<decltype(&sharded<A>::map), decltype(&sharded<B>::map)>> {
  static auto map(const Intersection<A, B>& mask, Index num_queries, Index num_keys, Index q_begin, Index k_begin) {
    return sharded<A>::map(mask.first, num_queries, num_keys, q_begin, k_begin) &
           sharded<B>::map(mask.second, num_queries, num_keys, q_begin, k_begin);
  }
};

template <class M, class = void>
struct is_shardable : std::false_type {};
template <class M>
struct is_shardable<M, std::void_t<decltype(&sharded<M>::map)>> : std::true_type {};

}  // namespace detail

/// True for the masks `shard_mask` maps: NoMask, Causal, Window, KeyPadding and their `&`.
template <class M>
inline constexpr bool is_shardable_mask = detail::is_shardable<M>::value;

/// The mask of the global (Lq, Lk) problem seen from the segment pair whose first query is
/// global query `q_begin` and whose first key is global key `k_begin`.
/// \throws attend::invalid_argument where binding the global mask to (Lq, Lk) throws.
template <class M>
auto shard_mask(const MaskBase<M>& mask, Index num_queries, Index num_keys, Index q_begin, Index k_begin) {
  static_assert(is_shardable_mask<M>,
                "attend::distributed: sequence-parallel attention takes NoMask, Causal, Window, KeyPadding and "
                "their intersections (a & b); dense masks would need the whole (Lq, Lk) matrix on every rank");
  return detail::sharded<M>::map(mask.derived(), num_queries, num_keys, q_begin, k_begin);
}

}  // namespace attend::distributed
