// SPDX-License-Identifier: MIT
/// \file attention/backward_materialized.hpp
/// \brief The materialized backward: the readable version of the blocked backward's math, with
/// whole (Lq, Lk) matrices.
#pragma once

#include "../masks.hpp"
#include "../softmax.hpp"
#include "../types.hpp"
#include "../detail/backward_kernels.hpp"
#include "../detail/parallel.hpp"
#include "backward_blocked.hpp"

#include <cmath>
#include <limits>

namespace attend::detail {

/// Gradients of out = softmax(S) V with S = modifier(scale Q K^T), masked:
///   P = softmax(S)              (the forward's weights, recomputed whole: the saved log-sum-exp
///                                is not needed, and a row that sees one key has P = 1 exactly)
///   dV = P^T dO
///   dP = dO V^T,  D_i = sum_j P_ij dP_ij (= <dO_i, O_i>),  dS = P * (dP - D)   (0 where P = 0)
///   dZ = dS * modifier'(Z)      (Z = scale Q K^T; the score function's and the mask's score
///                                modifiers, chained, and 0 where P = 0)
///   dQ = scale dZ K,  dK = dZ^T (scale Q)
/// `sink` receives dS whole (task 0). Products run in parallel over blocks of rows.
template <class T, class Modifier, class BoundMask, class Sink>
void materialized_backward(const BackwardHead<T>& head, const ConstMatrixRef<T>& k, const ConstMatrixRef<T>& v, T scale,
                           const Modifier& modifier, const BoundMask& mask, MatrixRef<T> dq, MatrixRef<T> dk,
                           MatrixRef<T> dv, const Sink& sink) {
  const Index num_queries = head.q.rows(), num_keys = k.rows();
  if (num_queries == 0 || num_keys == 0) {  // nothing seen: zero gradients
    dq.setZero();
    dk.setZero();
    dv.setZero();
    return;
  }
  const Matrix<T> sq = scale * head.q;  // (Lq, Dk)
  Matrix<T> p(num_queries, num_keys);   // Z, S, then P
  parallel_product(p, sq, k.transpose());
  constexpr bool chain = needs_slope<Modifier, BoundMask>;
  Matrix<T> slope;  // (Lq, Lk) dS/dZ, through the score function's and the mask's modifiers
  if constexpr (chain) slope.setOnes(num_queries, num_keys);
  if constexpr (Modifier::active) modifier.forward(p, slope);
  switch (mask.classify(0, num_queries, 0, num_keys)) {
    case TileKind::Empty: p.setConstant(-std::numeric_limits<T>::infinity()); break;
    case TileKind::Partial: apply_mask_with_slope(mask, p, slope, 0, 0); break;
    case TileKind::Full: break;
  }
  Matrix<T> ds(num_queries, num_keys);  // dP, then dS
  parallel_product(ds, head.d_out, v.transpose());
  softmax_rows_inplace<T>(p);
  for (Index i = 0; i < num_queries; ++i) {
    T d = 0;
    for (Index j = 0; j < num_keys; ++j)
      if (p(i, j) != T(0)) d += p(i, j) * ds(i, j);
    for (Index j = 0; j < num_keys; ++j) ds(i, j) = p(i, j) == T(0) ? T(0) : p(i, j) * (ds(i, j) - d);
  }
  parallel_product(dv, p.transpose(), head.d_out);
  if constexpr (Sink::active) sink.add(ds, 0, 0, 0);
  if constexpr (chain) chain_score_slope(ds, slope, p);
  parallel_product(dk, ds.transpose(), sq);
  parallel_product(dq, ds, k);
  dq *= scale;
}

}  // namespace attend::detail
