// SPDX-License-Identifier: MIT
// Reference and baseline attention from precomputed score matrices, for score functions other
// than the scaled dot product: a test computes its scores in long double (reference) and in T
// with plain loops (baseline), and these finish the attention the same way reference.hpp and
// baseline.hpp do. check_scores then runs a kernel over every mask kind and both paths.
#pragma once

#include "attention_case.hpp"
#include "baseline.hpp"
#include "masks.hpp"
#include "reference.hpp"
#include "tolerance.hpp"

#include <attend/options.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace attend::test {

/// Softmax of `scores` (+ bias) over the visible entries of each row, in the scores' precision;
/// a row that sees nothing (or only -inf) gets zero weights and lse -inf; NaN propagates.
template <class S>
void masked_softmax_rows(Matrix<S>& scores, Vector<S>& lse, const BoolMatrix& visible,
                         const std::optional<RealMatrix>& bias) {
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  lse = Vector<S>::Constant(scores.rows(), kNegInf);
  for (Index i = 0; i < scores.rows(); ++i) {
    S m = kNegInf;
    for (Index j = 0; j < scores.cols(); ++j) {
      if (!visible(i, j)) continue;
      if (bias) scores(i, j) += static_cast<S>((*bias)(i, j));
      m = std::isnan(scores(i, j)) || std::isnan(m) ? std::numeric_limits<S>::quiet_NaN() : std::max(m, scores(i, j));
    }
    S sum = 0;
    for (Index j = 0; j < scores.cols(); ++j) {
      scores(i, j) = visible(i, j) && m != kNegInf ? std::exp(scores(i, j) - m) : S(0);
      sum += scores(i, j);
    }
    if (!(sum > 0) && !std::isnan(sum)) continue;  // sees nothing: zeros, lse -inf
    scores.row(i) /= sum;
    lse(i) = m + std::log(sum);
  }
}

/// The long-double reference of attention whose (Lq, Lk) scores are given.
template <class V>
Reference reference_from_scores(RealMatrix scores, const V& v, const BoolMatrix& visible,
                                const std::optional<RealMatrix>& bias = std::nullopt) {
  Reference ref;
  masked_softmax_rows(scores, ref.lse, visible, bias);
  ref.output = RealMatrix::Zero(scores.rows(), v.cols());
  for (Index i = 0; i < scores.rows(); ++i)
    for (Index j = 0; j < scores.cols(); ++j)
      if (scores(i, j) != 0 || std::isnan(scores(i, j)))
        for (Index c = 0; c < v.cols(); ++c) ref.output(i, c) += scores(i, j) * Real(v(j, c));
  ref.weights = std::move(scores);
  return ref;
}

/// The same-precision baseline of attention whose scores (computed plainly in T) are given.
template <class T, class V>
Baseline<T> baseline_from_scores(Matrix<T> scores, const V& v, const BoolMatrix& visible,
                                 const std::optional<RealMatrix>& bias = std::nullopt) {
  Baseline<T> base;
  masked_softmax_rows(scores, base.lse, visible, bias);
  base.output = scores * v.template cast<T>();
  base.weights = std::move(scores);
  return base;
}

/// Runs `run(mask, options) -> AttentionResult<T>` (output and lse) for every mask kind of
/// masks.hpp and through `paths`, each against the reference built from `ref_scores` (long
/// double) and the baseline built from `base_scores` (T), both (Lq, Lk). A non-empty
/// `restrict_to` (Lq, Lk) further hides the keys that `run` hides on its own (e.g. a window).
template <class T, class V, class Run>
void check_scores(const RealMatrix& ref_scores, const Matrix<T>& base_scores, const V& v,
                  const std::vector<AttentionOptions>& paths, Rng& rng, Run&& run,
                  const BoolMatrix& restrict_to = BoolMatrix()) {
  const Index lq = ref_scores.rows(), lk = ref_scores.cols();
  for (const MaskSpec& spec : all_mask_specs())
    with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
      SCOPED_TRACE("Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " mask " + c.description);
      ASSERT_TRUE(mostly_visible(c));
      const BoolMatrix visible = restrict_to.size() == 0 ? c.visible : BoolMatrix(c.visible.array() && restrict_to.array());
      const Reference ref = reference_from_scores(ref_scores, v, visible, c.bias);
      const Baseline<T> base = baseline_from_scores<T>(base_scores, v, visible, c.bias);
      for (const AttentionOptions& options : paths) {
        SCOPED_TRACE(describe(options));
        const AttentionResult<T> r = run(mask, options);
        expect_matches_reference<T>(r.output, r.lse, ref, base, !c.bias.has_value());
      }
    });
}

}  // namespace attend::test
