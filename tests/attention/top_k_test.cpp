// SPDX-License-Identifier: MIT
// Top-k and hard attention. Integer-valued Q and K with scale 1 make every score exact in float
// and double, so ties are real and the selection (highest scores, ties to the lower key index) is
// computed independently here; the softmax over the selected keys is checked against the
// long-double reference through both paths, every mask and tiles that split ties.
#include "support/overflow_case.hpp"
#include "support/scalars.hpp"
#include "support/score_reference.hpp"

#include <attend/attention/top_k.hpp>
#include <attend/scores/soft_cap.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class TopKTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(TopKTest, Scalars);

/// (rows, cols) integers uniform in [-2, 2]: dot products of a few columns are exact and tie often.
template <class T>
Matrix<T> small_integers(Index rows, Index cols, Rng& rng) {
  Matrix<T> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = T(rng.uniform(-2, 2));
  return m;
}

/// Which keys each query keeps: the `top_k` visible keys with the highest `scores`, ties to the
/// lower index, by a full stable sort of each row.
template <class S>
BoolMatrix top_k_visibility(const Matrix<S>& scores, const BoolMatrix& visible, Index top_k) {
  BoolMatrix kept = BoolMatrix::Constant(scores.rows(), scores.cols(), false);
  for (Index i = 0; i < scores.rows(); ++i) {
    std::vector<Index> keys;
    for (Index j = 0; j < scores.cols(); ++j)
      if (visible(i, j) && scores(i, j) != -std::numeric_limits<S>::infinity()) keys.push_back(j);
    std::stable_sort(keys.begin(), keys.end(), [&](Index a, Index b) { return scores(i, a) > scores(i, b); });
    for (std::size_t n = 0; n < keys.size() && Index(n) < top_k; ++n) kept(i, keys[n]) = true;
  }
  return kept;
}

const std::vector<AttentionOptions> kPaths{materialized_path(), blocked_path(), blocked_path(5, 3),
                                           blocked_path(1, 1), blocked_path(16, 7)};

// Every mask kind, k from 1 to more than Lk, tiles that split runs of tied keys.
TYPED_TEST(TopKTest, EveryMaskAndKMatchesReference) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 23, lk = 41, d = 3, dv = 4;
  const Matrix<T> q = small_integers<T>(lq, d, rng), k = small_integers<T>(lk, d, rng), v = rng.normal<T>(lk, dv);
  const Matrix<T> dots = q * k.transpose();  // exact
  for (const Index top_k : {Index(1), Index(2), Index(5), Index(40), Index(60)})
    for (const MaskSpec& spec : all_mask_specs())
      with_mask<T>(spec, lq, lk, rng, [&](const auto& mask, const MaskCase& c) {
        SCOPED_TRACE("k=" + std::to_string(top_k) + " mask " + c.description);
        // The scores the kernel ranks: dot (exact) + bias, rounded once in T as the kernel does.
        Matrix<T> ranked = dots;
        if (c.bias) ranked += c.bias->template cast<T>();
        const BoolMatrix kept = top_k_visibility(ranked, c.visible, top_k);
        const Reference ref = reference_from_scores(dots.template cast<Real>(), v, kept, c.bias);
        const Baseline<T> base = baseline_from_scores<T>(dots, v, kept, c.bias);
        for (AttentionOptions options : kPaths) {
          SCOPED_TRACE(describe(options));
          options.scale = 1.0;
          AttentionResult<T> r{Matrix<T>(lq, dv), Vector<T>(lq), {}};
          top_k_attention_into(q, k, v, top_k, r.output, mask, options, r.lse);
          expect_matches_reference<T>(r.output, r.lse, ref, base, false);
        }
      });
}

// Hard attention returns exactly the value row of the best key, the lowest index among ties.
TYPED_TEST(TopKTest, HardAttentionPicksTheFirstBestKeyExactly) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 30, lk = 50, d = 2, dv = 3;
  const Matrix<T> q = small_integers<T>(lq, d, rng), k = small_integers<T>(lk, d, rng), v = rng.normal<T>(lk, dv);
  const Matrix<T> dots = q * k.transpose();
  const BoolMatrix visible = causal_visibility(lq, lk, Alignment::BottomRight);
  Index ties = 0;
  for (const AttentionOptions& options : kPaths) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> out = hard_attention(q, k, v, Causal(Alignment::BottomRight), options);
    for (Index i = 0; i < lq; ++i) {
      Index best = -1;
      for (Index j = 0; j < lk; ++j)
        if (visible(i, j) && (best < 0 || dots(i, j) > dots(i, best))) best = j;
      for (Index j = best + 1; j < lk; ++j) ties += visible(i, j) && dots(i, j) == dots(i, best);
      EXPECT_EQ(out.row(i), v.row(best)) << "row " << i << " best key " << best;
    }
  }
  EXPECT_GT(ties, 0) << "the data must contain ties for this test to check tie-breaking";
}

// With V = I the output is the weight matrix: exactly k keys per row carry weight, equal scores
// carry equal weight, and the weights of a row sum to 1.
TYPED_TEST(TopKTest, WeightsCoverExactlyKKeys) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 12, lk = 20, d = 2, top_k = 4;
  const Matrix<T> q = small_integers<T>(lq, d, rng), k = small_integers<T>(lk, d, rng);
  const Matrix<T> identity = Matrix<T>::Identity(lk, lk);
  const BoolMatrix kept = top_k_visibility<T>(q * k.transpose(), all_visible(lq, lk), top_k);
  for (const AttentionOptions& options : kPaths) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> weights = top_k_attention(q, k, identity, top_k, NoMask{}, options);
    for (Index i = 0; i < lq; ++i) {
      for (Index j = 0; j < lk; ++j) EXPECT_EQ(weights(i, j) > 0, kept(i, j)) << "(" << i << ", " << j << ")";
      EXPECT_NEAR(weights.row(i).sum(), 1, 8 * std::numeric_limits<T>::epsilon());
    }
  }
}

// Default scale on real-valued data: k >= Lk is ordinary attention.
TYPED_TEST(TopKTest, KAtLeastLkIsOrdinaryAttention) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 19, lk = 33, d = 8, dv = 5;
  const Matrix<T> q = rng.normal<T>(lq, d), k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  const Real scale = 1 / std::sqrt(Real(d));
  check_scores<T>(scale * (q.template cast<Real>() * k.template cast<Real>().transpose()),
                  Matrix<T>(T(scale) * (q * k.transpose())), v, kPaths, rng,
                  [&](const auto& mask, const AttentionOptions& options) {
                    AttentionResult<T> r{Matrix<T>(lq, dv), Vector<T>(lq), {}};
                    top_k_attention_into(q, k, v, lk, r.output, mask, options, r.lse);
                    return r;
                  });
}

// The selection works for any score policy: top-k of soft-capped scores (a cap is monotone, so it
// keeps the same keys and softmaxes the capped scores).
TYPED_TEST(TopKTest, AnyScorePolicy) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 21, lk = 37, d = 3, dv = 4, top_k = 6;
  const T cap = 3;
  const Matrix<T> q = small_integers<T>(lq, d, rng), k = small_integers<T>(lk, d, rng), v = rng.normal<T>(lk, dv);
  const Matrix<T> dots = q * k.transpose();
  const BoolMatrix kept = top_k_visibility(dots, causal_visibility(lq, lk, Alignment::TopLeft), top_k);
  const RealMatrix capped = (dots.template cast<Real>() / Real(cap)).array().tanh() * Real(cap);
  Matrix<T> capped_t = dots;
  for (Index i = 0; i < lq; ++i)
    for (Index j = 0; j < lk; ++j) capped_t(i, j) = cap * std::tanh(dots(i, j) / cap);
  const Reference ref = reference_from_scores(capped, v, kept);
  const Baseline<T> base = baseline_from_scores<T>(capped_t, v, kept);
  const detail::SoftCapped<detail::ScaledDot<T>, T> score{{T(1)}, cap};
  for (const AttentionOptions& options : kPaths) {
    SCOPED_TRACE(describe(options));
    AttentionResult<T> r{Matrix<T>(lq, dv), Vector<T>(lq), {}};
    detail::top_k_attention_into<T>(q, k, v, score, Causal(), top_k, options, r.output, r.lse);
    expect_matches_reference<T>(r.output, r.lse, ref, base);
  }
}

// The selection and the attention over the selected keys both scale the queries before the dot
// products: scores that <q, k> alone would overflow to inf are exact on both paths. Query 0 keeps
// keys 0 and 1 (scores 4, 2), query 1 keys 1 and 2 (scores -2, 1).
TYPED_TEST(TopKTest, ScaleAppliesToQueriesBeforeTheProduct) {
  using T = TypeParam;
  const OverflowCase<T> c = overflow_case<T>();
  BoolMatrix kept(2, 3);
  kept << true, true, false, false, true, true;
  const Reference ref = reference_from_scores(c.scores, c.v, kept);
  const Baseline<T> base = baseline_from_scores<T>(c.scores.template cast<T>(), c.v, kept);
  for (AttentionOptions options : kPaths) {
    options.scale = c.scale;
    SCOPED_TRACE(describe(options));
    AttentionResult<T> r{Matrix<T>(2, 2), Vector<T>(2), {}};
    top_k_attention_into(c.q, c.k, c.v, 2, r.output, NoMask{}, options, r.lse);
    expect_matches_reference<T>(r.output, r.lse, ref, base);
  }
}

// A NaN score ranks first and propagates to its row only; an empty key set gives zeros.
TYPED_TEST(TopKTest, NaNPropagatesAndEmptyInputsAreDefined) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index lq = 6, lk = 9, d = 4, dv = 2;
  Matrix<T> q = rng.normal<T>(lq, d);
  q(2, 1) = std::numeric_limits<T>::quiet_NaN();
  const Matrix<T> k = rng.normal<T>(lk, d), v = rng.normal<T>(lk, dv);
  for (const AttentionOptions& options : kPaths) {
    SCOPED_TRACE(describe(options));
    const Matrix<T> out = top_k_attention(q, k, v, 3, NoMask{}, options);
    for (Index i = 0; i < lq; ++i) EXPECT_EQ(i == 2, out.row(i).hasNaN()) << "row " << i;
    EXPECT_EQ(top_k_attention(q, Matrix<T>(0, d), Matrix<T>(0, dv), 2, NoMask{}, options), Matrix<T>::Zero(lq, dv));
    EXPECT_EQ(top_k_attention(Matrix<T>(0, d), k, v, 2, NoMask{}, options).rows(), 0);
  }
}

TYPED_TEST(TopKTest, BadArgumentsThrow) {
  using T = TypeParam;
  const Matrix<T> q = Matrix<T>::Ones(3, 4), k = Matrix<T>::Ones(5, 4), v = Matrix<T>::Ones(5, 2);
  for (const Index top_k : {Index(0), Index(-2)}) {
    try {
      top_k_attention(q, k, v, top_k);
      ADD_FAILURE() << "k=" << top_k << " must throw";
    } catch (const attend::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("k=" + std::to_string(top_k)), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(top_k_attention(q, Matrix<T>::Ones(5, 3), v, 2), attend::invalid_argument);
  EXPECT_THROW(hard_attention(q, k, Matrix<T>::Ones(4, 2)), attend::invalid_argument);
}

}  // namespace
