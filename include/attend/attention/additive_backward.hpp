// SPDX-License-Identifier: MIT
/// \file attention/additive_backward.hpp
/// \brief Gradients of additive (Bahdanau) attention: of Q, K, the values, W_q, W_k, v and b.
///
/// With qp_i = W_q q_i + b, kp_j = W_k k_j, t_ij = tanh(qp_i + kp_j) (h), s_ij = v^T t_ij
/// (+ the mask's bias), P = softmax(S), O = P V and dO given:
///
///     dV = P^T dO,   D_i = sum_c dO_ic O_ic,   dS_ij = P_ij (dO_i . V_j - D_i),
///     g_ij = dS_ij v * (1 - t_ij^2)                (h, elementwise),
///     dqp_i = sum_j g_ij,   dkp_j = sum_i g_ij,   dv = sum_ij dS_ij t_ij,   db = sum_i dqp_i,
///     dq = dqp W_q,   dk = dkp W_k,   dW_q = dqp^T q,   dW_k = dkp^T k.
///
/// P is recomputed from the forward's log-sum-exp, P_ij = exp(s_ij - lse_i), so nothing of size
/// (Lq, Lk) is saved. The blocked path (FlashAttention-2's backward) makes two passes over
/// tiles, each recomputing t_ij: one over query tiles for dqp and the per-tile partials of dv,
/// one over key tiles for dkp and dV; each task writes only its own rows, so nothing is
/// accumulated atomically, and the partials of dv are summed in tile order: the results are
/// bitwise the same for any thread count. Memory beyond the inputs and gradients: the
/// projections (L, h), one (Bq, Bk) tile of mask values per thread and (Lq / Bq, h) partials.
/// The materialized path forms S, P and dS whole: the readable version of the same math.
/// Masked keys and rows that see no key (lse = -inf) get exactly zero gradient.
#pragma once

#include "../detail/checks.hpp"
#include "../detail/parallel.hpp"
#include "../masks.hpp"
#include "../options.hpp"
#include "../types.hpp"
#include "additive.hpp"
#include "blocked.hpp"
#include "scaled_dot_product.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace attend {

/// Gradients of a scalar loss through additive attention.
template <class T>
struct AdditiveGradients {
  Matrix<T> dq;        ///< (Lq, d_q)
  Matrix<T> dk;        ///< (Lk, d_k)
  Matrix<T> dv;        ///< (Lk, Dv), of the values
  Matrix<T> dw_query;  ///< (h, d_q), of W_q
  Matrix<T> dw_key;    ///< (h, d_k), of W_k
  Vector<T> dw_v;      ///< (h), of the score vector v
  Vector<T> dbias;     ///< (h), of b; empty when the layer has no bias
};

namespace detail {

/// X itself, in a context that does not take part in deducing a template's parameters (so that
/// a Matrix binds to a view parameter whose scalar another argument deduces).
template <class X>
struct SameType {
  using type = X;
};
template <class X>
using Same = typename SameType<X>::type;

/// What both paths read: projections, values, the forward's output statistics and dO.
template <class T>
struct AdditiveBackwardInputs {
  const Matrix<T>& q_proj;                 // (Lq, h) W_q q_i + b
  const Matrix<T>& k_proj;                 // (Lk, h) W_k k_j
  const Vector<T>& v;                      // (h)
  const ConstMatrixRef<T>& values;         // (Lk, Dv)
  const Eigen::Ref<const Vector<T>>& lse;  // (Lq)
  const Vector<T>& delta;                  // (Lq) D_i = sum_c dO_ic O_ic
  const ConstMatrixRef<T>& d_out;          // (Lq, Dv)

  /// Writes t = tanh(qp_i + kp_j) (h), P_ij = exp(v^T t + bias - lse_i) and
  /// dS_ij = P_ij (dP_ij - D_i), given dP_ij = dO_i . V_j (both 0 when the row sees nothing).
  void pair(Index i, Index j, T bias, T dp, Eigen::Array<T, 1, Eigen::Dynamic>& t, T& p, T& ds) const {
    t = (q_proj.row(i) + k_proj.row(j)).array().tanh();
    const T s = t.matrix().dot(v.transpose()) + bias;
    p = lse(i) == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(s - lse(i));
    ds = p * (dp - delta(i));
  }
};

/// The mask's value at each entry of a tile: its bias, -inf where it hides the key, 0 elsewhere.
template <class T, class BoundMask>
void mask_tile(const BoundMask& mask, Matrix<T>& tile, Index q0, Index rows, Index k0, Index cols) {
  auto view = tile.topLeftCorner(rows, cols);
  view.setZero();
  switch (mask.classify(q0, q0 + rows, k0, k0 + cols)) {
    case TileKind::Empty: view.setConstant(-std::numeric_limits<T>::infinity()); break;
    case TileKind::Partial: apply_mask(mask, view, q0, k0); break;
    case TileKind::Full: break;
  }
}

/// The blocked backward: writes dqp (Lq, h), dkp (Lk, h), dvalues (Lk, Dv) and dw_v (h). Each
/// tile's dP = dO V^T and (key pass) dV += P^T dO are products; the tanh, P and dS are per pair.
template <class T, class BoundMask>
void additive_backward_blocked(const AdditiveBackwardInputs<T>& in, const BoundMask& mask, TileShape tiles,
                               Matrix<T>& dqp, Matrix<T>& dkp, Matrix<T>& dvalues, Vector<T>& dw_v) {
  const Index lq = in.q_proj.rows(), lk = in.k_proj.rows(), h = in.v.size(), dv = in.values.cols();
  const Index query_tiles = (lq + tiles.queries - 1) / tiles.queries;
  const Index key_tiles = (lk + tiles.keys - 1) / tiles.keys;
  struct Scratch {
    Matrix<T> bias;                        // (Bq, Bk) the mask's values on a tile
    Matrix<T> dp;                          // (Bq, Bk) dO V^T
    Matrix<T> p;                           // (Bq, Bk) P (key pass)
    Matrix<T> d_values;                    // (Bk, Dv) P^T dO (key pass)
    Eigen::Array<T, 1, Eigen::Dynamic> t;  // (h) tanh(qp_i + kp_j)
  };
  const auto make_scratch = [&](bool key_pass) {
    return [&, key_pass] {
      return Scratch{Matrix<T>(tiles.queries, tiles.keys), Matrix<T>(tiles.queries, tiles.keys),
                     key_pass ? Matrix<T>(tiles.queries, tiles.keys) : Matrix<T>(),
                     key_pass ? Matrix<T>(tiles.keys, dv) : Matrix<T>(), Eigen::Array<T, 1, Eigen::Dynamic>(h)};
    };
  };
  // The mask's values and dP of a tile; false when the mask hides all of it.
  const auto prepare = [&](Scratch& scratch, Index q0, Index rows, Index k0, Index cols) {
    if (mask.classify(q0, q0 + rows, k0, k0 + cols) == TileKind::Empty) return false;
    mask_tile(mask, scratch.bias, q0, rows, k0, cols);
    serial_product(scratch.dp.topLeftCorner(rows, cols), in.d_out.middleRows(q0, rows),
                   in.values.middleRows(k0, cols).transpose());
    return true;
  };
  const auto v = in.v.transpose().array();  // (h)
  // Pass 1, over query tiles: dqp for the tile's rows, and the tile's partial of dv.
  Matrix<T> dw_v_partials = Matrix<T>::Zero(query_tiles, h);  // (query tiles, h)
  parallel_for_with_scratch(query_tiles, make_scratch(false), [&](Index tile, Scratch& scratch) {
    const Index q0 = tile * tiles.queries, rows = std::min(tiles.queries, lq - q0);
    const KeyRange keys = mask.keys(q0, q0 + rows);
    for (Index k0 = keys.begin - keys.begin % tiles.keys; k0 < keys.end; k0 += tiles.keys) {
      const Index cols = std::min(tiles.keys, lk - k0);
      if (!prepare(scratch, q0, rows, k0, cols)) continue;
      for (Index i = q0; i < q0 + rows; ++i)
        for (Index j = k0; j < k0 + cols; ++j) {
          const T bias = scratch.bias(i - q0, j - k0);
          if (bias == -std::numeric_limits<T>::infinity()) continue;
          T p, ds;
          in.pair(i, j, bias, scratch.dp(i - q0, j - k0), scratch.t, p, ds);
          if (p == T(0)) continue;
          dqp.row(i).array() += ds * v * (T(1) - scratch.t.square());
          dw_v_partials.row(tile).array() += ds * scratch.t;
        }
    }
  });
  dw_v = dw_v_partials.colwise().sum().transpose();
  // Pass 2, over key tiles: dkp and dV for the tile's keys, from every query tile that sees them.
  parallel_for_with_scratch(key_tiles, make_scratch(true), [&](Index tile, Scratch& scratch) {
    const Index k0 = tile * tiles.keys, cols = std::min(tiles.keys, lk - k0);
    for (Index q0 = 0; q0 < lq; q0 += tiles.queries) {
      const Index rows = std::min(tiles.queries, lq - q0);
      if (!prepare(scratch, q0, rows, k0, cols)) continue;
      auto p_tile = scratch.p.topLeftCorner(rows, cols);
      p_tile.setZero();
      for (Index j = k0; j < k0 + cols; ++j)
        for (Index i = q0; i < q0 + rows; ++i) {
          const T bias = scratch.bias(i - q0, j - k0);
          if (bias == -std::numeric_limits<T>::infinity()) continue;
          T ds;
          in.pair(i, j, bias, scratch.dp(i - q0, j - k0), scratch.t, p_tile(i - q0, j - k0), ds);
          if (p_tile(i - q0, j - k0) == T(0)) continue;
          dkp.row(j).array() += ds * v * (T(1) - scratch.t.square());
        }
      auto d_values = scratch.d_values.topRows(cols);
      serial_product(d_values, p_tile.transpose(), in.d_out.middleRows(q0, rows));  // (Bk, Dv) P^T dO
      dvalues.middleRows(k0, cols) += d_values;
    }
  });
}

/// The materialized backward: S, P and dS whole (Lq, Lk), then the sums over pairs.
template <class T, class BoundMask>
void additive_backward_materialized(const AdditiveBackwardInputs<T>& in, const BoundMask& mask, Matrix<T>& dqp,
                                    Matrix<T>& dkp, Matrix<T>& dvalues, Vector<T>& dw_v) {
  const Index lq = in.q_proj.rows(), lk = in.k_proj.rows();
  Matrix<T> bias(lq, lk);  // the mask's values
  mask_tile(mask, bias, 0, lq, 0, lk);
  Matrix<T> dp(lq, lk);  // dO V^T, then dS
  parallel_product(dp, in.d_out, in.values.transpose());
  Matrix<T> p = Matrix<T>::Zero(lq, lk);  // (Lq, Lk)
  Matrix<T>& ds = dp;
  Eigen::Array<T, 1, Eigen::Dynamic> t(in.v.size());  // (h)
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      if (bias(i, j) != -std::numeric_limits<T>::infinity()) in.pair(i, j, bias(i, j), dp(i, j), t, p(i, j), ds(i, j));
      if (p(i, j) == T(0)) ds(i, j) = 0;
    }
  parallel_product(dvalues, p.transpose(), in.d_out);  // dV = P^T dO
  dw_v.setZero();
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      if (ds(i, j) == T(0)) continue;
      t = (in.q_proj.row(i) + in.k_proj.row(j)).array().tanh();
      dw_v.transpose().array() += ds(i, j) * t;
      t = ds(i, j) * in.v.transpose().array() * (T(1) - t.square());  // g_ij
      dqp.row(i).array() += t;
      dkp.row(j).array() += t;
    }
}

}  // namespace detail

/// Gradients of a loss through `layer`'s attention of q (Lq, d_q) over k (Lk, d_k) and values
/// (Lk, Dv), given the forward's output `out` (Lq, Dv) and log-sum-exp `lse` (Lq) (from
/// `forward_with_lse` or `forward_into` with the same mask and options) and d_out = dLoss/dout.
/// `options.algorithm` picks the path as in the forward (Auto: blocked for large problems);
/// the tiles come from `options`.
/// \throws attend::invalid_argument naming the shapes when they do not fit.
template <class T, class DQ, class DK, class DV, class DO, class Mask = NoMask>
AdditiveGradients<T> additive_attention_backward(const AdditiveAttention<T>& layer, const Eigen::MatrixBase<DQ>& q,
                                                 const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& values,
                                                 const detail::Same<ConstMatrixRef<T>>& out,
                                                 const detail::Same<Eigen::Ref<const Vector<T>>>& lse,
                                                 const Eigen::MatrixBase<DO>& d_out,
                                                 const MaskBase<Mask>& mask = NoMask{},
                                                 const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DQ, DK, DV, DO>);
  layer.check_inputs(q, k, values, options);
  const Index lq = q.rows(), lk = k.rows(), h = layer.hidden_dim();
  detail::check_shape(out, lq, values.cols(), "output");
  detail::check_shape(d_out, lq, values.cols(), "d_out");
  ATTEND_CHECK(lse.size() == lq, "log-sum-exp of size " + std::to_string(lse.size()) + " must have Lq = " +
                                     std::to_string(lq) + " entries");
  const detail::ThreadScope threads(options.num_threads);
  const detail::TileShape tiles = detail::resolve_tiles(options, lq, lk);
  const auto bound = detail::bind_mask(mask.derived(), HeadIndex{}, lq, lk);

  AdditiveGradients<T> g{Matrix<T>::Zero(lq, layer.query_dim()), Matrix<T>::Zero(lk, layer.key_dim()),
                         Matrix<T>::Zero(lk, values.cols()),     Matrix<T>::Zero(h, layer.query_dim()),
                         Matrix<T>::Zero(h, layer.key_dim()),    Vector<T>::Zero(h),
                         Vector<T>::Zero(layer.bias().size())};
  if (lq == 0 || lk == 0) return g;  // nothing is seen: every gradient is zero

  const Matrix<T> q_proj = layer.project_queries(q), k_proj = layer.project_keys(k);  // (Lq, h), (Lk, h)
  const ConstMatrixRef<T> values_ref(values), d_out_ref(d_out);
  const Vector<T> delta = (d_out_ref.array() * out.array()).rowwise().sum();  // (Lq)
  const detail::AdditiveBackwardInputs<T> in{q_proj, k_proj, layer.v(), values_ref, lse, delta, d_out_ref};
  Matrix<T> dqp = Matrix<T>::Zero(lq, h), dkp = Matrix<T>::Zero(lk, h);
  if (detail::use_blocked(options, lq, lk))
    detail::additive_backward_blocked<T>(in, bound, tiles, dqp, dkp, g.dv, g.dw_v);
  else
    detail::additive_backward_materialized<T>(in, bound, dqp, dkp, g.dv, g.dw_v);

  const ConstMatrixRef<T> q_ref(q), k_ref(k);
  detail::parallel_product(g.dq, dqp, layer.w_query());             // (Lq, d_q)
  detail::parallel_product(g.dk, dkp, layer.w_key());               // (Lk, d_k)
  detail::parallel_product(g.dw_query, dqp.transpose(), q_ref);     // (h, d_q)
  detail::parallel_product(g.dw_key, dkp.transpose(), k_ref);       // (h, d_k)
  if (g.dbias.size() != 0) g.dbias = dqp.colwise().sum().transpose();
  return g;
}

/// The same from the forward's result (its output and lse): see the overload above.
template <class T, class DQ, class DK, class DV, class DO, class Mask = NoMask>
AdditiveGradients<T> additive_attention_backward(const AdditiveAttention<T>& layer, const Eigen::MatrixBase<DQ>& q,
                                                 const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& values,
                                                 const AttentionResult<T>& forward, const Eigen::MatrixBase<DO>& d_out,
                                                 const MaskBase<Mask>& mask = NoMask{},
                                                 const AttentionOptions& options = {}) {
  static_assert(detail::full_precision_scalars<T, DQ, DK, DV, DO>);
  return additive_attention_backward(layer, q, k, values, ConstMatrixRef<T>(forward.output),
                                     Eigen::Ref<const Vector<T>>(forward.lse), d_out, mask, options);
}

}  // namespace attend
