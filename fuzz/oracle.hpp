// SPDX-License-Identifier: MIT
// The fuzzer's oracle: an attention problem in exact (long double) arithmetic, with an a-priori
// bound on how far a correct float/double computation may land from it.
//
// A computed score is s_ij = t_ij + e_ij with |e_ij| <= E_ij (the builders below derive E from
// the dot products and transforms). Row i's softmax argument t_ij - m_i then carries an error
// eps_j <= E_j + E_m + 4 eps (|a_j| + spread), where the last term covers the subtraction and the
// blocked path's rescaling by exp(m_old - m_new). With p_j the exact weights and
// dD = sum_j p_j (exp(eps_j) - 1), each computed weight satisfies |p^_j / p_j - 1| <= r_j =
// exp(eps_j) / (1 - dD) - 1, and since the weights sum to 1,
//   |o^_ic - o_ic| <= sum_j p_j r_j |v_jc - o_ic| + (8n + 64) eps sum_j p_j |v_jc| + 8 (n + 8) tiny max_j |v_jc|
// (the second term: exp, sums and the P V products; the third: exp flushing to zero). The check
// uses twice that bound, so it is far from any rounding noise yet catches every real defect (a
// wrong key, a lost tile, a bad rescale), which moves the output by O(|v|).
#pragma once

#include <attend/types.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace attend::fuzz {

using Real = long double;
using RealMatrix = Matrix<Real>;
inline constexpr Real kNegInf = -std::numeric_limits<Real>::infinity();

/// Stops the run with a message; libFuzzer reports the abort and saves the input.
[[noreturn]] inline void fail(const std::string& message) {
  std::fprintf(stderr, "\nattention_fuzzer: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

/// How many rows each kind of check has seen; printed at exit when ATTEND_FUZZ_STATS is set,
/// to show that the oracle is not vacuous.
struct CheckCounts {
  long exact = 0, bounded = 0, zero = 0, nan = 0;
  long layer = 0;      // rows of layers, encodings and merges compared within their bound
  long invariant = 0;  // results compared bitwise across thread settings
  ~CheckCounts() {
    if (std::getenv("ATTEND_FUZZ_STATS")) {
      std::fprintf(stderr, "attention_fuzzer: rows checked: %ld exact (%ld within the a-priori bound), %ld zero, %ld NaN\n",
                   exact, bounded, zero, nan);
      std::fprintf(
          stderr,
          "attention_fuzzer: %ld layer/encoding rows within their bound, %ld results bitwise thread-invariant\n", layer,
          invariant);
    }
  }
};
inline CheckCounts check_counts;

/// A number with all its digits, for failure messages.
inline std::string num(Real x) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.10Lg", x);
  return buffer;
}

template <class T>
Real eps() {
  return Real(std::numeric_limits<T>::epsilon());
}

/// Scores of one problem before masking, exact, with the error bound of the computed ones.
struct Scores {
  RealMatrix value;  // (Lq, Lk)
  RealMatrix error;  // (Lq, Lk)
  bool finite = true;  // every input finite and no intermediate value near overflow
};

/// What one (Lq, Lk) problem promises, row by row.
struct Problem {
  RealMatrix score;             // (Lq, Lk) exact masked scores, -inf where hidden
  RealMatrix error;             // (Lq, Lk) bound on the error of each computed visible score
  std::vector<char> exact;      // rows checked against the exact result
  std::vector<char> zero;       // rows that must be exactly 0 (no visible key, finite V)
  std::vector<char> nan;        // rows that must be entirely NaN (NaN in a visible score, finite V)
};

template <class M>
bool all_finite(const M& m) {
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      if (!std::isfinite(m(i, j))) return false;
  return true;
}

template <class M>
bool row_has_nan(const M& m, Index i) {
  for (Index c = 0; c < m.cols(); ++c)
    if (std::isnan(m(i, c))) return true;
  return false;
}

/// s_ij = scale <q_i, k_j> in exact arithmetic, and the error of computing it in T either as
/// scale * (q k^T) or as (scale q) k^T, with any summation order.
template <class T, class Q, class K>
Scores dot_scores(const Q& q, const K& k, T scale) {
  const Index lq = q.rows(), lk = k.rows(), d = q.cols();
  Scores s{RealMatrix::Zero(lq, lk), RealMatrix::Zero(lq, lk), std::isfinite(scale) && all_finite(q) && all_finite(k)};
  const Real max = Real(std::numeric_limits<T>::max()), tiny = Real(std::numeric_limits<T>::denorm_min());
  const Real sc = Real(scale), abs_sc = std::fabs(sc);
  for (Index i = 0; i < lq; ++i) {
    Real q_max = 0;
    for (Index c = 0; c < d; ++c) q_max = std::max(q_max, std::fabs(Real(q(i, c))));
    if (abs_sc * q_max > max / 4) s.finite = false;
    for (Index j = 0; j < lk; ++j) {
      Real dot = 0, abs_dot = 0, k_max = 0;
      for (Index c = 0; c < d; ++c) {
        dot += Real(q(i, c)) * Real(k(j, c));
        abs_dot += std::fabs(Real(q(i, c)) * Real(k(j, c)));
        k_max = std::max(k_max, std::fabs(Real(k(j, c))));
      }
      if (abs_dot * std::max(Real(1), abs_sc) > max / 4) s.finite = false;
      s.value(i, j) = sc * dot;
      // Products and partial sums round relatively; products that underflow lose up to a denormal.
      s.error(i, j) = eps<T>() * Real(d + 4) * abs_sc * abs_dot +
                      Real(d + 4) * tiny * (1 + abs_sc) * (1 + q_max + k_max);
    }
  }
  return s;
}

/// s_ij = cap tanh(x_ij / cap) of scores x: the derivative is at most 1, so x's error passes
/// through; the division, tanh (Eigen's rational approximation) and product add a few ulps of cap.
template <class T>
Scores soft_cap_scores(Scores x, T cap) {
  x.finite = x.finite && std::isfinite(cap) && cap > 0;
  const Real c = Real(cap);
  for (Index i = 0; i < x.value.rows(); ++i)
    for (Index j = 0; j < x.value.cols(); ++j) {
      const Real t = c * std::tanh(x.value(i, j) / c);
      x.error(i, j) += eps<T>() * (64 * c + 2 * std::fabs(t));
      x.value(i, j) = t;
    }
  return x;
}

/// Rows divided by max(norm, 1e-12) as torch.nn.functional.normalize, in exact arithmetic;
/// `finite` turns false when the squared norm would overflow T (Eigen's norm() is not scaled).
template <class T, class M>
RealMatrix unit_rows(const M& m, bool& finite) {
  RealMatrix out(m.rows(), m.cols());
  for (Index i = 0; i < m.rows(); ++i) {
    Real sq = 0;
    for (Index c = 0; c < m.cols(); ++c) sq += Real(m(i, c)) * Real(m(i, c));
    if (sq > Real(std::numeric_limits<T>::max()) / 4) finite = false;
    const Real norm = std::max(std::sqrt(sq), Real(T(1e-12)));
    for (Index c = 0; c < m.cols(); ++c) out(i, c) = Real(m(i, c)) / norm;
  }
  return out;
}

/// s_ij = scale cos(q_i, k_j): normalizing each row costs about d/2 + 4 ulps per element.
template <class T, class Q, class K>
Scores cosine_scores(const Q& q, const K& k, T scale) {
  bool finite = all_finite(q) && all_finite(k);
  const RealMatrix qn = unit_rows<T>(q, finite), kn = unit_rows<T>(k, finite);
  Scores s = dot_scores<T>(qn, kn, scale);
  s.finite = s.finite && finite;
  for (Index i = 0; i < s.value.rows(); ++i)
    for (Index j = 0; j < s.value.cols(); ++j) {
      Real abs_dot = 0;
      for (Index c = 0; c < q.cols(); ++c) abs_dot += std::fabs(qn(i, c) * kn(j, c));
      s.error(i, j) += eps<T>() * Real(q.cols() + 8) * std::fabs(Real(scale)) * abs_dot;
    }
  return s;
}

/// s_ij = scale <q_i W, k_j> with q W formed in T first (d_q more roundings per element).
template <class T, class Q, class W, class K>
Scores bilinear_scores(const Q& q, const W& w, const K& k, T scale) {
  const RealMatrix qw = q.template cast<Real>() * w.template cast<Real>();
  const RealMatrix qw_abs = q.template cast<Real>().cwiseAbs() * w.template cast<Real>().cwiseAbs();
  Scores s = dot_scores<T>(qw, k, scale);
  s.finite = s.finite && all_finite(q) && all_finite(w) &&
             (qw_abs.size() == 0 || qw_abs.maxCoeff() <= Real(std::numeric_limits<T>::max()) / 4);
  const RealMatrix err = qw_abs * k.template cast<Real>().cwiseAbs().transpose();  // (Lq, Lk)
  s.error += (eps<T>() * Real(q.cols() + 4) * std::fabs(Real(scale))) * err;
  return s;
}

/// Additive (Bahdanau) scores s_ij = sum_c v_c tanh(qp_ic + kp_jc), qp = q W_q^T + b, kp = k W_k^T,
/// with the projections' errors, tanh's (64 ulps) and the sum's.
template <class T, class Q, class K>
Scores additive_scores(const Q& q, const K& k, const Matrix<T>& w_q, const Matrix<T>& w_k, const Vector<T>& v,
                       const Vector<T>& b) {
  const Index lq = q.rows(), lk = k.rows(), h = v.size();
  RealMatrix qp = q.template cast<Real>() * w_q.template cast<Real>().transpose();
  RealMatrix qp_err = q.template cast<Real>().cwiseAbs() * w_q.template cast<Real>().cwiseAbs().transpose();
  if (b.size() != 0) {
    qp.rowwise() += b.template cast<Real>().transpose();
    qp_err.rowwise() += b.template cast<Real>().cwiseAbs().transpose();
  }
  const RealMatrix kp = k.template cast<Real>() * w_k.template cast<Real>().transpose();
  const RealMatrix kp_err = k.template cast<Real>().cwiseAbs() * w_k.template cast<Real>().cwiseAbs().transpose();
  const Real max = Real(std::numeric_limits<T>::max());
  Scores s{RealMatrix::Zero(lq, lk), RealMatrix::Zero(lq, lk),
           all_finite(q) && all_finite(k) && all_finite(w_q) && all_finite(w_k) && all_finite(v) && all_finite(b) &&
               (lq == 0 || h == 0 || qp_err.maxCoeff() <= max / 4) && (lk == 0 || h == 0 || kp_err.maxCoeff() <= max / 4)};
  const Real e = eps<T>();
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) {
      Real sum = 0, err = 0;
      for (Index c = 0; c < h; ++c) {
        const Real vc = Real(v(c)), x = qp(i, c) + kp(j, c);
        sum += vc * std::tanh(x);
        err += std::fabs(vc) * (e * Real(q.cols() + 3) * qp_err(i, c) + e * Real(k.cols() + 3) * kp_err(j, c) +
                                e * std::fabs(x) + 64 * e + e * Real(h + 2));
      }
      s.value(i, j) = sum;
      s.error(i, j) = err;
    }
  return s;
}

/// The exact problem of scores `s` under structural visibility `visible` (band and boolean
/// masks) and an optional additive bias (Lq, Lk). Rows whose inputs are not all finite are not
/// compared; a row that sees no key must be 0 when V is finite; a row that sees a key whose
/// score has a NaN input (a NaN in q_i or k_j) must be NaN when V is finite and the bias has no
/// NaN or +inf (a bias of -inf hides its key, NaN score included).
template <class T, class Q, class K>
Problem make_problem(const Scores& s, const BoolMatrix& visible, const Matrix<T>* bias, bool v_finite, const Q& q,
                     const K& k) {
  const Index lq = s.value.rows(), lk = s.value.cols();
  Problem p{RealMatrix::Constant(lq, lk, kNegInf), RealMatrix::Zero(lq, lk), std::vector<char>(lq, s.finite),
            std::vector<char>(lq, 0), std::vector<char>(lq, 0)};
  const Real max = Real(std::numeric_limits<T>::max());
  const Real ulp_max = max - Real(std::nextafter(std::numeric_limits<T>::max(), T(0)));
  bool bias_ok = true;
  if (bias)
    for (Index i = 0; i < lq; ++i)
      for (Index j = 0; j < lk; ++j) {
        const T b = (*bias)(i, j);
        if (std::isnan(b) || b == std::numeric_limits<T>::infinity()) bias_ok = false;
      }
  std::vector<char> k_nan(std::size_t(lk), 0);
  for (Index j = 0; j < lk; ++j) k_nan[std::size_t(j)] = row_has_nan(k, j);
  for (Index i = 0; i < lq; ++i) {
    bool any_structural = false, nan_score = false;
    const bool q_nan = row_has_nan(q, i);
    for (Index j = 0; j < lk; ++j) {
      if (!visible(i, j)) continue;
      any_structural = true;
      const Real b = bias ? Real((*bias)(i, j)) : Real(0);
      if (b == kNegInf) continue;  // hidden, whatever its score
      nan_score = nan_score || q_nan || k_nan[std::size_t(j)];
      const Real t = s.value(i, j) + b;
      // The computed score must not overflow where the exact one does not (lowest() + a small
      // score rounds back to lowest(), so the margin is a quarter ulp of max()).
      if (!std::isfinite(t) || std::fabs(s.value(i, j)) + s.error(i, j) > max / 4 ||
          std::fabs(t) + 2 * s.error(i, j) > max + ulp_max / 4)
        p.exact[i] = 0;
      p.score(i, j) = t;
      p.error(i, j) = s.error(i, j) + 2 * eps<T>() * std::fabs(t);
    }
    if (!bias_ok || !v_finite) p.exact[i] = 0;
    p.zero[i] = v_finite && bias_ok && !any_structural;
    p.nan[i] = v_finite && bias_ok && nan_score;
  }
  return p;
}

/// Keeps each row's top_k visible keys (ties to the lower index). A row where rounding could
/// change the selection (a kept and a dropped key closer than twice their error bounds) is not
/// compared numerically.
inline void keep_top_k(Problem& p, Index top_k) {
  const Index lk = p.score.cols();
  for (Index i = 0; i < p.score.rows(); ++i) {
    std::vector<Index> keys;
    for (Index j = 0; j < lk; ++j)
      if (p.score(i, j) != kNegInf) keys.push_back(j);
    if (Index(keys.size()) <= top_k) continue;
    std::stable_sort(keys.begin(), keys.end(), [&](Index a, Index b) { return p.score(i, a) > p.score(i, b); });
    Real kept_low = std::numeric_limits<Real>::infinity(), dropped_high = kNegInf;
    for (std::size_t n = 0; n < keys.size(); ++n) {
      const Index j = keys[n];
      if (Index(n) < top_k)
        kept_low = std::min(kept_low, p.score(i, j) - 2 * p.error(i, j));
      else
        dropped_high = std::max(dropped_high, p.score(i, j) + 2 * p.error(i, j));
    }
    if (!(kept_low > dropped_high)) p.exact[i] = 0;
    for (std::size_t n = std::size_t(top_k); n < keys.size(); ++n) p.score(i, keys[n]) = kNegInf;
  }
}

/// Bound data of one exact row: the weights p_j and the bounds p_j r_j on their errors.
struct RowModel {
  bool any = false;     // some key visible
  bool bounded = true;  // the a-priori bound is meaningful (dD < 1/4)
  Real lse = kNegInf;
  Real m = kNegInf;
  Real d_d = 0;
  std::vector<Real> p;       // (Lk) exact weights
  std::vector<Real> p_err;   // (Lk) p_j r_j: bound on |p^_j - p_j| from the score errors
  Index n = 0;
};

template <class T>
RowModel row_model(const Problem& pr, Index i) {
  const Index lk = pr.score.cols();
  RowModel rm;
  rm.p.assign(lk, 0);
  rm.p_err.assign(lk, 0);
  Real lo = std::numeric_limits<Real>::infinity();
  for (Index j = 0; j < lk; ++j) {
    const Real t = pr.score(i, j);
    if (t == kNegInf) continue;
    rm.any = true;
    ++rm.n;
    rm.m = std::max(rm.m, t);
    lo = std::min(lo, t);
  }
  if (!rm.any) return rm;
  Real e_max = 0;  // bound on |m^ - m|
  for (Index j = 0; j < lk; ++j) {
    const Real t = pr.score(i, j);
    if (t == kNegInf) continue;
    e_max = std::max(e_max, t - rm.m + pr.error(i, j));
  }
  const Real spread = std::min(rm.m - lo, Real(1000) * Real(rm.n));
  Real z = 0;
  for (Index j = 0; j < lk; ++j)
    if (pr.score(i, j) != kNegInf) z += std::exp(pr.score(i, j) - rm.m);
  rm.lse = rm.m + std::log(z);
  for (Index j = 0; j < lk; ++j) {
    const Real t = pr.score(i, j);
    if (t == kNegInf) continue;
    const Real a = t - rm.m;
    const Real e = pr.error(i, j) + e_max + 4 * eps<T>() * (std::fabs(a) + spread + 64);
    rm.p[j] = std::exp(a) / z;
    rm.d_d += (std::exp(a + e) - std::exp(a)) / z;
    rm.p_err[j] = e;  // turned into p_j r_j below
  }
  rm.bounded = std::isfinite(rm.d_d) && rm.d_d < Real(0.25);
  // p_j r_j = p_j (exp(e_j) / (1 - dD) - 1), formed without 0 * inf for keys of negligible weight.
  for (Index j = 0; j < lk; ++j)
    if (pr.score(i, j) != kNegInf) {
      const Real a = pr.score(i, j) - rm.m;
      rm.p_err[j] = rm.bounded ? (std::exp(a + rm.p_err[j]) / (1 - rm.d_d) - std::exp(a)) / z : 0;
    }
  return rm;
}

/// Checks one computed problem against `pr`: output (Lq, Dv), optional lse (Lq) and weights
/// (Lq, Lk). `v` is the (Lk, Dv) value matrix as the call saw it.
template <class T, class V, class O>
void check_problem(const std::string& what, const Problem& pr, const V& v, const O& out, const T* lse = nullptr,
                   const Matrix<T>* weights = nullptr) {
  const Index lq = pr.score.rows(), lk = pr.score.cols(), dv = v.cols();
  if (out.rows() != lq || out.cols() != dv)
    fail(what + ": output is (" + std::to_string(out.rows()) + " x " + std::to_string(out.cols()) + "), expected (" +
         std::to_string(lq) + " x " + std::to_string(dv) + ")");
  if (weights && (weights->rows() != lq || weights->cols() != lk)) fail(what + ": weights have the wrong shape");
  const Real e = eps<T>(), tiny = Real(std::numeric_limits<T>::min());
  const auto where = [&](Index i, Index c) {
    return what + " row " + std::to_string(i) + " col " + std::to_string(c) + " (Lq=" + std::to_string(lq) +
           ", Lk=" + std::to_string(lk) + ", Dv=" + std::to_string(dv) + ")";
  };
  for (Index i = 0; i < lq; ++i) {
    if (pr.zero[i]) {
      ++check_counts.zero;
      for (Index c = 0; c < dv; ++c)
        if (out(i, c) != T(0))
          fail(where(i, c) + ": a row that sees no key must be exactly 0, got " + num(out(i, c)));
      if (lse && lse[i] != -std::numeric_limits<T>::infinity())
        fail(what + " row " + std::to_string(i) + ": lse of a row that sees no key must be -inf");
      if (weights)
        for (Index j = 0; j < lk; ++j)
          if ((*weights)(i, j) != T(0)) fail(what + ": weights of a row that sees no key must be 0");
    }
    if (pr.nan[i]) {
      ++check_counts.nan;
      for (Index c = 0; c < dv; ++c)
        if (!std::isnan(out(i, c)))
          fail(where(i, c) + ": NaN in a visible score must propagate to the whole row, got " +
               num(out(i, c)));
    }
    if (!pr.exact[i]) continue;
    const RowModel rm = row_model<T>(pr, i);
    ++check_counts.exact;
    if (rm.bounded) ++check_counts.bounded;
    if (!rm.any) {
      for (Index c = 0; c < dv; ++c)
        if (out(i, c) != T(0)) fail(where(i, c) + ": a fully masked row must be exactly 0");
      if (lse && lse[i] != -std::numeric_limits<T>::infinity()) fail(what + ": lse of a fully masked row must be -inf");
      continue;
    }
    const Real n = Real(rm.n);
    for (Index c = 0; c < dv; ++c) {
      const Real got = Real(out(i, c));
      if (!std::isfinite(got)) fail(where(i, c) + ": finite inputs gave " + num(got));
      Real o = 0, v_abs = 0, v_max = 0, v_lo = std::numeric_limits<Real>::infinity(), v_hi = -v_lo;
      for (Index j = 0; j < lk; ++j) {
        if (pr.score(i, j) == kNegInf) continue;
        const Real x = Real(v(j, c));
        o += rm.p[j] * x;
        v_abs += rm.p[j] * std::fabs(x);
        v_max = std::max(v_max, std::fabs(x));
        v_lo = std::min(v_lo, x);
        v_hi = std::max(v_hi, x);
      }
      // Results in the denormal range round to a grid of denorm_min whatever the values' size.
      const Real denormal = Real(std::numeric_limits<T>::denorm_min()) * (n + 8);
      const Real slack = 2 * ((8 * n + 64) * e * v_max + 8 * (n + 8) * tiny * v_max + denormal);
      if (got < v_lo - slack || got > v_hi + slack)
        fail(where(i, c) + ": " + num(got) + " lies outside the values' range [" +
             num(v_lo) + ", " + num(v_hi) + "]");
      if (!rm.bounded) continue;
      Real spread = 0;
      for (Index j = 0; j < lk; ++j)
        if (pr.score(i, j) != kNegInf) spread += rm.p_err[j] * std::fabs(Real(v(j, c)) - o);
      const Real bound = 2 * (spread + (8 * n + 64) * e * v_abs + 8 * (n + 8) * tiny * v_max + denormal);
      if (!(std::fabs(got - o) <= bound))
        fail(where(i, c) + ": got " + num(got) + ", exact " + num(o) +
             ", error " + num(std::fabs(got - o)) + " exceeds the bound " +
             num(bound));
    }
    if (lse && rm.bounded) {
      const Real got = Real(lse[i]);
      const Real bound = 2 * (-std::log1p(-rm.d_d) + (n + 16) * e + 2 * e * (std::fabs(rm.m) + std::fabs(rm.lse)));
      if (!(std::fabs(got - rm.lse) <= bound))
        fail(what + " row " + std::to_string(i) + ": lse " + num(got) + ", exact " +
             num(rm.lse) + " (bound " + num(bound) + ")");
    }
    if (weights && rm.bounded)
      for (Index j = 0; j < lk; ++j) {
        const Real got = Real((*weights)(i, j));
        const Real bound = 2 * (rm.p_err[j] + (n + 16) * e * rm.p[j] + 4 * tiny);
        if (!(std::fabs(got - rm.p[j]) <= bound))
          fail(what + " row " + std::to_string(i) + " key " + std::to_string(j) + ": weight " +
               num(got) + ", exact " + num(rm.p[j]) + " (bound " + num(bound) + ", score " + num(pr.score(i, j)) +
               ", row max " + num(rm.m) + ")");
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Layers: values with an error bound carried through projections, rotations and attention.

/// A matrix computed in T next to its exact value: |computed - value| <= error entrywise. An
/// infinite (or NaN) error means "not checked" (a row whose bound is not meaningful).
struct Approx {
  RealMatrix value;
  RealMatrix error;
  bool finite = true;  // every input finite and nothing near overflow
};

inline Real unchecked() { return std::numeric_limits<Real>::infinity(); }

/// Exact inputs of T: error 0.
template <class M>
Approx exact_of(const M& m) {
  return {m.template cast<Real>(), RealMatrix::Zero(m.rows(), m.cols()), all_finite(m)};
}

/// y = x W^T + b (nn.Linear) computed in T from x known within x.error: the input error passes
/// through |W|, the products and sums round relatively (E + 4 roundings), and underflowing
/// products lose at most a denormal each.
template <class T>
Approx linear_of(const Approx& x, const Matrix<T>& w, const Vector<T>& b) {
  const RealMatrix wr = w.template cast<Real>(), w_abs = wr.cwiseAbs();
  const Index e = x.value.cols();
  Approx y{x.value * wr.transpose(), x.error * w_abs.transpose(), x.finite && all_finite(w) && all_finite(b)};
  // Bound on |x^| |W|^T over the checked entries (an unchecked one makes its outputs unchecked).
  const RealMatrix x_err = x.error.unaryExpr([](Real err) { return err < unchecked() ? err : Real(0); });
  RealMatrix magnitude = (x.value.cwiseAbs() + x_err) * w_abs.transpose();
  if (b.size() != 0) {
    y.value.rowwise() += b.template cast<Real>().transpose();
    magnitude.rowwise() += b.template cast<Real>().cwiseAbs().transpose();
  }
  const Real max = Real(std::numeric_limits<T>::max()), tiny = Real(std::numeric_limits<T>::denorm_min());
  if (magnitude.size() != 0 && !(magnitude.maxCoeff() <= max / 4)) y.finite = false;
  y.error += (eps<T>() * Real(e + 4)) * magnitude;
  y.error.array() += Real(e + 4) * tiny;
  return y;
}

/// Scores scale <q_i, k_j> of rows known within their errors (projected, rotated): the input
/// errors pass through the other operand, the product rounds as in dot_scores.
template <class T>
Scores dot_scores_of(const Approx& q, const Approx& k, T scale) {
  Scores s = dot_scores<T>(q.value, k.value, scale);
  s.finite = s.finite && q.finite && k.finite;
  const Real sc = std::fabs(Real(scale));
  const RealMatrix q_abs = q.value.cwiseAbs(), k_abs = k.value.cwiseAbs();
  // |<q^, k^> - <q, k>| <= dq |k| + |q| dk + dq dk; the rounding of <q^, k^> on |q^| |k^|.
  s.error += sc * (q.error * k_abs.transpose() + q_abs * k.error.transpose() + q.error * k.error.transpose());
  s.error += (eps<T>() * Real(q.value.cols() + 4) * sc) *
             (q.error * k.error.transpose() + q.error * k_abs.transpose() + q_abs * k.error.transpose());
  s.error = s.error.unaryExpr([](Real err) { return std::isnan(err) ? unchecked() : err; });  // 0 * inf
  return s;
}

/// The exact attention output of problem `pr` over values `v` known within v.error, with the
/// a-priori bound of check_problem plus what V's error adds (sum_j p^_j dv_j). Rows the bound
/// does not cover (not exact, NaN, not bounded) get an infinite error.
template <class T>
Approx attention_of(const Problem& pr, const Approx& v) {
  const Index lq = pr.score.rows(), lk = pr.score.cols(), dv = v.value.cols();
  Approx o{RealMatrix::Zero(lq, dv), RealMatrix::Constant(lq, dv, unchecked()), v.finite};
  const Real e = eps<T>(), tiny = Real(std::numeric_limits<T>::min());
  for (Index i = 0; i < lq; ++i) {
    if (pr.zero[i] && !pr.nan[i]) {
      o.error.row(i).setZero();
      continue;
    }
    if (!pr.exact[i]) continue;
    const RowModel rm = row_model<T>(pr, i);
    if (!rm.any) {
      o.error.row(i).setZero();
      continue;
    }
    if (!rm.bounded) continue;
    const Real n = Real(rm.n);
    for (Index c = 0; c < dv; ++c) {
      Real value = 0, v_abs = 0, v_max = 0, v_err = 0;
      for (Index j = 0; j < lk; ++j) {
        if (pr.score(i, j) == kNegInf) continue;
        const Real x = v.value(j, c), dx = v.error(j, c);
        value += rm.p[j] * x;
        v_abs += rm.p[j] * (std::fabs(x) + dx);
        v_max = std::max(v_max, std::fabs(x) + dx);
        v_err += (rm.p[j] + rm.p_err[j]) * dx;
      }
      Real spread = 0;
      for (Index j = 0; j < lk; ++j)
        if (pr.score(i, j) != kNegInf) spread += rm.p_err[j] * std::fabs(v.value(j, c) - value);
      o.value(i, c) = value;
      o.error(i, c) = 2 * (spread + v_err + (8 * n + 64) * e * v_abs + 8 * (n + 8) * tiny * v_max +
                           (n + 8) * Real(std::numeric_limits<T>::denorm_min()));
    }
  }
  return o;
}

/// Checks a computed matrix against `expected` entry by entry (entries with an infinite error
/// are not compared; a checked entry must be finite).
template <class M>
void check_approx(const std::string& what, const Approx& expected, const M& got) {
  if (got.rows() != expected.value.rows() || got.cols() != expected.value.cols())
    fail(what + ": result is (" + std::to_string(got.rows()) + " x " + std::to_string(got.cols()) + "), expected (" +
         std::to_string(expected.value.rows()) + " x " + std::to_string(expected.value.cols()) + ")");
  if (!expected.finite) return;
  for (Index i = 0; i < got.rows(); ++i) {
    bool checked = false;
    for (Index c = 0; c < got.cols(); ++c) {
      const Real bound = expected.error(i, c);
      if (!(bound < unchecked())) continue;
      checked = true;
      const Real x = Real(got(i, c));
      if (!(std::fabs(x - expected.value(i, c)) <= bound))
        fail(what + " row " + std::to_string(i) + " col " + std::to_string(c) + ": got " + num(x) + ", exact " +
             num(expected.value(i, c)) + ", error " + num(std::fabs(x - expected.value(i, c))) + " exceeds the bound " +
             num(bound));
    }
    if (checked) ++check_counts.layer;
  }
}

// ---------------------------------------------------------------------------------------------
// Positional encodings, from their defining formulas (HF transformers' rope init functions, the
// Transformer paper), in long double.

/// The configuration of a rotary embedding, as the oracle needs it.
struct RopeSpec {
  Index head_dim = 0, rotary_dim = 0;
  bool interleaved = false;
  int scaling = 0;  // 0 none, 1 linear, 2 NTK-aware, 3 YaRN, 4 Llama 3
  Real base = 10000, factor = 1;
  Index original_max_position = 8192;
  double beta_fast = 32, beta_slow = 1;
  Real low_freq_factor = 1, high_freq_factor = 4;
  bool factor_in_rotation = false;  // YaRN's attention factor multiplies the rotated features
};

/// theta_i (i < r/2) after scaling, exact; `ambiguous` turns true when YaRN's floor or ceil
/// sits so close to an integer that double rounding may pick either side (then the rotation
/// is not compared).
inline std::vector<Real> rope_frequencies(const RopeSpec& r, bool& ambiguous) {
  const Index pairs = r.rotary_dim / 2;
  const Real rd = Real(r.rotary_dim);
  Real base = r.base;
  if (r.scaling == 2 && r.rotary_dim > 2) base *= std::pow(r.factor, rd / (rd - 2));
  std::vector<Real> theta(static_cast<std::size_t>(pairs));
  for (Index i = 0; i < pairs; ++i) theta[std::size_t(i)] = std::pow(base, -Real(2 * i) / rd);
  const Real two_pi = 6.283185307179586476925286766559L;
  if (r.scaling == 1)
    for (Real& t : theta) t /= r.factor;
  if (r.scaling == 3) {
    const auto correction = [&](double rotations) {  // r ln(N / (2 pi b)) / (2 ln base)
      return rd * std::log(Real(r.original_max_position) / (Real(rotations) * two_pi)) / (2 * std::log(r.base));
    };
    const Real c_fast = correction(r.beta_fast), c_slow = correction(r.beta_slow);
    const auto near_integer = [](Real x) { return std::fabs(x - std::round(x)) < Real(1e-9) * (1 + std::fabs(x)); };
    if (near_integer(c_fast) || near_integer(c_slow)) ambiguous = true;
    const Real lo = std::max(std::floor(c_fast), Real(0));
    Real hi = std::min(std::ceil(c_slow), rd - 1);
    if (lo == hi) hi += Real(0.001);
    for (Index i = 0; i < pairs; ++i) {
      const Real ramp = std::clamp((Real(i) - lo) / (hi - lo), Real(0), Real(1));
      Real& t = theta[std::size_t(i)];
      t = t / r.factor * ramp + t * (1 - ramp);
    }
  }
  if (r.scaling == 4) {
    const Real n = Real(r.original_max_position);
    for (Real& t : theta) {
      const Real wavelength = two_pi / t;
      if (wavelength > n / r.low_freq_factor) {
        t /= r.factor;
      } else if (wavelength >= n / r.high_freq_factor) {
        const Real g = (n / wavelength - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        t = (1 - g) * t / r.factor + g * t;
      }
    }
  }
  return theta;
}

/// YaRN's attention factor m = 0.1 ln(s) + 1.
inline Real rope_attention_factor(const RopeSpec& r) {
  return r.scaling == 3 && r.factor_in_rotation ? Real(0.1) * std::log(r.factor) + 1 : Real(1);
}

/// Rotates every head of x (L, H head_dim), row i at position positions[i], exactly; computed
/// in T, each rotated feature also carries the error of the angle (double, relative ~32 ulps
/// of the angle) and of cos and sin rounded to T.
template <class T>
Approx rotate_of(const Approx& x, const RopeSpec& r, const std::vector<Index>& positions) {
  Approx y = x;
  bool ambiguous = false;
  const std::vector<Real> theta = rope_frequencies(r, ambiguous);
  const Real m = rope_attention_factor(r);
  const Index pairs = r.rotary_dim / 2, heads = x.value.cols() / r.head_dim;
  const Real e = eps<T>(), e_d = Real(std::numeric_limits<double>::epsilon());
  const Real tiny = Real(std::numeric_limits<T>::denorm_min());
  for (Index row = 0; row < x.value.rows(); ++row)
    for (Index i = 0; i < pairs; ++i) {
      const Real angle = Real(positions[std::size_t(row)]) * theta[std::size_t(i)];
      const Real c = std::cos(angle), s = std::sin(angle);
      const Real delta = 64 * e_d * (1 + std::fabs(angle)) + e;  // |cos^ - cos|, |sin^ - sin|
      for (Index h = 0; h < heads; ++h) {
        const Index ja = h * r.head_dim + (r.interleaved ? 2 * i : i);
        const Index jb = h * r.head_dim + (r.interleaved ? 2 * i + 1 : i + pairs);
        const Real a = x.value(row, ja), b = x.value(row, jb), da = x.error(row, ja), db = x.error(row, jb);
        const Real magnitude = std::fabs(a) + std::fabs(b) + da + db;
        // A pair with a non-finite input, or near overflow, is not compared (nor what it feeds).
        const bool skip =
            ambiguous || !std::isfinite(magnitude) || magnitude * m > Real(std::numeric_limits<T>::max()) / 4;
        const Real err = m * (da + db + magnitude * (delta + 4 * e)) + 4 * tiny;
        y.value(row, ja) = skip ? 0 : m * (a * c - b * s);
        y.value(row, jb) = skip ? 0 : m * (b * c + a * s);
        y.error(row, ja) = skip ? unchecked() : err;
        y.error(row, jb) = skip ? unchecked() : err;
      }
    }
  return y;
}

/// x + PE(offset + r, j) of the sinusoidal encoding, exact, with the error of an angle formed
/// in double and of sin and cos rounded to T and added to x.
template <class T>
Approx sinusoidal_of(const Approx& x, Index offset, Real base) {
  Approx y = x;
  const Index width = x.value.cols();
  const Real e = eps<T>(), e_d = Real(std::numeric_limits<double>::epsilon());
  for (Index row = 0; row < x.value.rows(); ++row)
    for (Index j = 0; j < width; ++j) {
      const Real position = Real(offset) + Real(row);
      const Real angle = position / std::pow(base, Real(2 * (j / 2)) / Real(width));
      const Real pe = j % 2 == 0 ? std::sin(angle) : std::cos(angle);
      y.value(row, j) = x.value(row, j) + pe;
      y.error(row, j) =
          2 * (x.error(row, j) + 16 * e_d * (1 + std::fabs(angle)) + e + e * (std::fabs(x.value(row, j)) + 1));
    }
  return y;
}

}  // namespace attend::fuzz
