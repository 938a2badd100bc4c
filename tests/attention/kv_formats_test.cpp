// SPDX-License-Identifier: MIT
// KV caches stored in bf16, half and q8_0 (issue #12): the contiguous and the paged cache decode
// (one token, chunks, GQA, windows, learned sinks, StreamingLLM, forks, truncation, block sizes
// that do and do not divide the lengths) against the long-double reference on the values the
// cache stores, with FlashAttention's rule for bf16 and half (support/decode_precision.hpp) and
// the float rule for q8_0 on its dequantized values; the q8_0 cache against its a priori
// bound; queries rounded to 8 bits for a q8_0 cache (quantize_queries) against the reference on
// the rounded query and the a priori bound of both steps; long rows that break 16-bit
// accumulators; bitwise thread invariance in every format.
#include <attend/attention/kv_cache.hpp>
#include <attend/attention/paged_kv_cache.hpp>

#include "support/decode_precision.hpp"
#include "support/masks.hpp"
#include "support/multi_head_reference.hpp"
#include "support/random.hpp"
#include "support/reference.hpp"
#include "support/tolerance.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace attend::test {
namespace {

template <class S>
class KVFormatTest : public ::testing::Test {};
using Formats = ::testing::Types<float, Eigen::bfloat16, Eigen::half, Q8_0>;
TYPED_TEST_SUITE(KVFormatTest, Formats);

template <class S>
constexpr bool kReduced = detail::is_reduced_precision<S>;

/// The attention of query rows q (n, H d) at absolute positions [p0, p0 + n) over the stored
/// rows k, v (P, H_kv d) of positions [0, P), key j visible to query i iff visible(i, j),
/// checked head by head against the reference on the stored values: FlashAttention's rule for
/// bf16 and half, the float rule (and its hard cap) for float and q8_0. With sinks, each head's
/// reference is merged with its sink logit. lse (n, H) is checked when not empty.
template <class S>
void expect_rows_match(const Matrix<float>& q, const Matrix<float>& k_in, const Matrix<float>& v_in, Index heads,
                       const BoolMatrix& visible, const Matrix<float>& out, const Vector<float>& sinks = {},
                       const Matrix<float>& lse = {}) {
  const Index d = q.cols() / heads, kv_heads = k_in.cols() / d, dv = v_in.cols() / kv_heads;
  const Matrix<float> k = stored<S>(k_in, kv_heads), v = stored<S>(v_in, kv_heads);
  const Real scale = 1 / std::sqrt(Real(d));
  for (Index h = 0; h < heads; ++h) {
    SCOPED_TRACE("head " + std::to_string(h));
    const Index g = h / (heads / kv_heads);
    const Matrix<float> qh = q.middleCols(h * d, d), kh = k.middleCols(g * d, d), vh = v.middleCols(g * dv, dv);
    Reference ref = reference_attention(qh, kh, vh, scale, visible);
    Matrix<float> naive_out;
    if constexpr (kReduced<S>) {
      const NaiveResult naive = naive_attention<S>(qh, k_in.middleCols(g * d, d), v_in.middleCols(g * dv, dv),
                                                   float(scale), visible);
      naive_out = naive.output;
    } else {
      naive_out = baseline_attention<float>(qh, kh, vh, float(scale), visible).output;
    }
    if (sinks.size() != 0)
      for (Index i = 0; i < q.rows(); ++i) {  // merge with the partial (0, sink)
        const Real s = Real(sinks(h)), l = ref.lse(i);
        const Real m = std::max(l, s), lse_new = m + std::log(std::exp(l - m) + std::exp(s - m));
        const Real factor = std::isinf(l) ? Real(0) : std::exp(l - lse_new);
        ref.output.row(i) *= factor;
        naive_out.row(i) *= float(factor);
        ref.lse(i) = lse_new;
      }
    const Matrix<float> head_out = out.middleCols(h * dv, dv);
    if constexpr (kReduced<S>)
      EXPECT_TRUE(within_rule(head_out, ref.output, naive_out));
    else
      EXPECT_TRUE(within_tolerance<float>(head_out, ref.output, naive_out));
    if (lse.size() != 0) {
      EXPECT_TRUE(lse_within(Vector<float>(lse.col(h)), ref.lse));
    }
  }
}

/// Visibility of queries at positions [p0, p0 + n) over keys [0, P): causal, within a window of
/// w keys (w < 0: unbounded), plus the first `sinks` keys (StreamingLLM).
BoolMatrix visibility(Index p0, Index n, Index total, Index window, Index sink_tokens = 0) {
  BoolMatrix v(n, total);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < total; ++j)
      v(i, j) = j <= p0 + i && (window < 0 || j > p0 + i - window || j < sink_tokens);
  return v;
}

// The contiguous cache: steps of one token and chunks (the chunks of a reduced or 8-bit cache
// go through the decode kernel), several splits (block_k = 16) of lengths around them, MHA, GQA
// and MQA, head widths of whole and partial q8_0 blocks, windows, learned sinks.
TYPED_TEST(KVFormatTest, ContiguousCacheDecodesInEveryFormat) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, len = 40;
  AttentionOptions options;
  options.block_k = 16;
  for (const Index d : {32, 40})
    for (const Index kv_heads : {4, 2, 1})
      for (const Index window : {-1, 7})
        for (const bool with_sinks : {false, true}) {
          SCOPED_TRACE("d=" + std::to_string(d) + " H_kv=" + std::to_string(kv_heads) + " window=" +
                       std::to_string(window) + (with_sinks ? " sinks" : ""));
          const Matrix<float> q = rng.normal<float>(len, heads * d), k = rng.normal<float>(len, kv_heads * d),
                              v = rng.normal<float>(len, kv_heads * d);
          const Vector<float> sinks = with_sinks ? Vector<float>(rng.normal<float>(heads, 1)) : Vector<float>();
          KVCache<S> cache(window < 0 ? len : window + 16, kv_heads, d, {window});
          Matrix<float> out(len, heads * d);
          const std::vector<Index> steps{1, 5, 1, 17, 1, 1, 9, 5};
          for (Index t = 0, i = 0; t < len; ++i) {
            const Index n = std::min(steps[std::size_t(i) % steps.size()], len - t);
            decode_step_into(cache, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), heads,
                             out.middleRows(t, n), NoMask{}, options, sinks);
            t += n;
          }
          expect_rows_match<S>(q, k, v, heads, visibility(0, len, len, window), out, sinks);
        }
}

// The paged cache: three sequences decoded together in steps that mix chunks and single tokens,
// blocks that do (16) and do not (3, 5) divide the lengths, windows, StreamingLLM sink tokens; the
// batched step's rows are bitwise those of each sequence alone, and its log-sum-exps within 1e-5.
TYPED_TEST(KVFormatTest, PagedCacheDecodesBatchesInEveryFormat) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 32, len = 37;
  for (const Index block : {3, 5, 16})
    for (const auto& [window, sink_tokens] : std::vector<std::pair<Index, Index>>{{-1, 0}, {9, 0}, {9, 2}}) {
      SCOPED_TRACE("block " + std::to_string(block) + " window " + std::to_string(window) + " sink tokens " +
                   std::to_string(sink_tokens));
      PagedKVCache<S> pool(64, kv_heads, d, {block, window, 0, sink_tokens});
      PagedKVCache<S> alone = pool;
      std::vector<Matrix<float>> q, k, v, out;
      std::vector<Index> ids;
      for (Index b = 0; b < 3; ++b) {
        q.push_back(rng.normal<float>(len, heads * d));
        k.push_back(rng.normal<float>(len, kv_heads * d));
        v.push_back(rng.normal<float>(len, kv_heads * d));
        out.push_back(Matrix<float>(len, heads * d));
        ids.push_back(pool.add_sequence());
        alone.add_sequence();
      }
      Matrix<float> lse_all(len, 3 * heads);
      const std::vector<std::vector<Index>> steps{{4, 1, 1, 7}, {1}, {13, 1}};
      std::vector<Index> done(3, 0), turn(3, 0);
      AttentionOptions options;
      options.block_k = 8;
      while (done[0] < len || done[1] < len || done[2] < len) {
        std::vector<Index> seqs, offsets{0};
        for (Index b = 0; b < 3; ++b) {
          const Index n = std::min(steps[std::size_t(b)][std::size_t(turn[std::size_t(b)]++) % steps[std::size_t(b)].size()],
                                   len - done[std::size_t(b)]);
          if (n == 0) continue;
          seqs.push_back(b);
          offsets.push_back(offsets.back() + n);
        }
        const SequenceRows rows = SequenceRows::packed(offsets);
        Matrix<float> qs(offsets.back(), heads * d), ks(offsets.back(), kv_heads * d), vs(offsets.back(), kv_heads * d);
        for (std::size_t i = 0; i < seqs.size(); ++i) {
          const Index b = seqs[i], n = rows.length(Index(i)), t = done[std::size_t(b)];
          qs.middleRows(rows.begin(Index(i)), n) = q[std::size_t(b)].middleRows(t, n);
          ks.middleRows(rows.begin(Index(i)), n) = k[std::size_t(b)].middleRows(t, n);
          vs.middleRows(rows.begin(Index(i)), n) = v[std::size_t(b)].middleRows(t, n);
        }
        Matrix<float> batch_out(offsets.back(), heads * d), batch_lse(offsets.back(), heads);
        paged_decode_step_into(pool, seqs, rows, qs, ks, vs, heads, batch_out, NoMask{}, options);
        for (std::size_t i = 0; i < seqs.size(); ++i) {
          const Index b = seqs[i], n = rows.length(Index(i)), t = done[std::size_t(b)];
          out[std::size_t(b)].middleRows(t, n) = batch_out.middleRows(rows.begin(Index(i)), n);
          Matrix<float> one(n, heads * d);
          paged_decode_step_into(alone, {b}, SequenceRows::uniform(1, n), qs.middleRows(rows.begin(Index(i)), n),
                                 ks.middleRows(rows.begin(Index(i)), n), vs.middleRows(rows.begin(Index(i)), n), heads,
                                 one, NoMask{}, options);
          EXPECT_TRUE(identical(one, batch_out.middleRows(rows.begin(Index(i)), n))) << "sequence " << b;
          // The log-sum-exps of the rows just decoded, from the pool as it is now.
          Matrix<float> again(n, heads * d), lse(n, heads);
          paged_attention_into(pool, {b}, SequenceRows::uniform(1, n), qs.middleRows(rows.begin(Index(i)), n), heads,
                               again, NoMask{}, options, Vector<float>(), lse);
          lse_all.block(t, b * heads, n, heads) = lse;
          done[std::size_t(b)] += n;
        }
      }
      for (Index b = 0; b < 3; ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        expect_rows_match<S>(q[std::size_t(b)], k[std::size_t(b)], v[std::size_t(b)], heads,
                             visibility(0, len, len, window, sink_tokens), out[std::size_t(b)], {},
                             lse_all.middleCols(b * heads, heads));
      }
    }
}

// Forks share blocks in the cache's format and diverge (copy on write copies stored rows, no
// second rounding); truncation rolls back and appends continue; a learned sink enters the merge.
TYPED_TEST(KVFormatTest, PagedForksAndTruncationInEveryFormat) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, kv_heads = 1, d = 32, len = 20;
  PagedKVCache<S> pool(32, kv_heads, d, {5});
  const Matrix<float> k = rng.normal<float>(len, d), v = rng.normal<float>(len, d), q = rng.normal<float>(1, heads * d);
  const Matrix<float> k2 = rng.normal<float>(4, d), v2 = rng.normal<float>(4, d);
  const Vector<float> sinks = rng.normal<float>(heads, 1);
  const Index a = pool.add_sequence();
  pool.append(a, k.topRows(12), v.topRows(12));
  const Index b = pool.fork(a);
  pool.append(b, k2, v2);                    // b: k[0, 12) + k2
  pool.append(a, k.middleRows(12, 8), v.middleRows(12, 8));  // a: k[0, 20)
  pool.truncate(a, 14);                      // a: k[0, 14)
  pool.append(a, k2.topRows(2), v2.topRows(2));  // a: k[0, 14) + k2[0, 2)
  EXPECT_EQ(pool.gather_keys(b).topRows(12), pool.gather_keys(a).topRows(12));
  Matrix<float> ka(16, d), va(16, d), kb(16, d), vb(16, d);
  ka << k.topRows(14), k2.topRows(2);
  va << v.topRows(14), v2.topRows(2);
  kb << k.topRows(12), k2;
  vb << v.topRows(12), v2;
  Matrix<float> out(2, heads * d);
  paged_attention_into(pool, {a, b}, SequenceRows::uniform(2, 1), Matrix<float>(q.replicate(2, 1)), heads, out, NoMask{},
                       {}, sinks);
  expect_rows_match<S>(q, ka, va, heads, visibility(15, 1, 16, -1), out.topRows(1), sinks);
  expect_rows_match<S>(q, kb, vb, heads, visibility(15, 1, 16, -1), out.bottomRows(1), sinks);
}

// Uniform attention over 65536 keys of V = 1 returns 1 (a 16-bit P V accumulator stops growing
// at 2048 and returns 0.5 at 4096 keys).
TYPED_TEST(KVFormatTest, UniformAttentionOverLongRowsReturnsOne) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index keys = 65536, d = 32;
  KVCache<S> cache(keys, 1, d);
  const Matrix<float> k = rng.normal<float>(keys - 1, d), v = Matrix<float>::Ones(keys, d);
  cache.append(k, v.topRows(keys - 1));
  const Matrix<float> q = Matrix<float>::Zero(1, d);  // every score 0: uniform weights
  const Matrix<float> out = decode_step(cache, q, k.topRows(1), v.topRows(1), 1);
  EXPECT_LE((out.array() - 1).abs().maxCoeff(), 1e-3f) << out;
}

// V ~ U(0, 1) over 32768 keys against the reference within the rule (bf16, half: 2x the naive
// error; float, q8_0: the float rule on the stored values).
TYPED_TEST(KVFormatTest, UniformValuesOverLongRowsWithinTheRule) {
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index keys = 32768, d = 32;
  const Matrix<float> k = rng.normal<float>(keys, d), q = rng.normal<float>(1, d);
  const Matrix<float> v = (Matrix<float>::Random(keys, d).array() + 1) / 2;
  KVCache<S> cache(keys, 1, d);
  cache.append(k.topRows(keys - 1), v.topRows(keys - 1));
  const Matrix<float> out = decode_step(cache, q, k.bottomRows(1), v.bottomRows(1), 1);
  expect_rows_match<S>(q, k, v, 1, BoolMatrix::Constant(1, keys, true), out);
}

// The q8_0 cache against the exact attention of the rows before quantization: within the a priori
// bound of its quantization steps (support/decode_precision.hpp), output and log-sum-exp.
TEST(KVFormatQ8, ErrorWithinTheBoundOfItsQuantizationStep) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 64, len = 300;
  const Matrix<float> k = rng.normal<float>(len, kv_heads * d), v = rng.normal<float>(len, kv_heads * d);
  const Matrix<float> q = rng.normal<float>(1, heads * d);
  PagedKVCache<Q8_0> pool(32, kv_heads, d, {16});
  const Index seq = pool.add_sequence();
  pool.append(seq, k, v);
  Matrix<float> out(1, heads * d), lse(1, heads);
  paged_attention_into(pool, {seq}, SequenceRows::uniform(1, 1), q, heads, out, NoMask{}, {}, Vector<float>(), lse);
  const Matrix<Real> k_steps = q8_0_steps(k, kv_heads), v_steps = q8_0_steps(v, kv_heads);
  const Real scale = 1 / std::sqrt(Real(d));
  for (Index h = 0; h < heads; ++h) {
    const Index g = h / (heads / kv_heads);
    const Matrix<float> kh = k.middleCols(g * d, d), vh = v.middleCols(g * d, d);
    const Reference ref = reference_attention(q.middleCols(h * d, d), kh, vh, scale, BoolMatrix::Constant(1, len, true));
    const Q8Bound bound = q8_0_bound(q.middleCols(h * d, d), kh, vh, k_steps.middleCols(g * d, d),
                                     v_steps.middleCols(g * d, d), scale, ref.output.row(0).transpose());
    Real worst = 0;
    for (Index c = 0; c < d; ++c) {
      const Real err = std::fabs(Real(out(0, h * d + c)) - ref.output(0, c));
      EXPECT_LE(err, bound.output(c)) << "head " << h << " column " << c;
      worst = std::max(worst, err / bound.output(c));
    }
    EXPECT_LE(std::fabs(Real(lse(0, h)) - ref.lse(0)), bound.lse + 1e-5 * std::fabs(ref.lse(0))) << "head " << h;
    EXPECT_GT(worst, 0) << "the quantization changed nothing: the test would not see an error";
  }
}

// AttentionOptions::quantize_queries: each head's scaled query q' rounded to 8 bits, s_q
// round(q' / s_q) with s_q = max |q'| / 127 (half away from zero), then scored against the q8_0
// blocks. The query the test rounds itself, unscaled back to q^ = s_q u / scale.
Matrix<float> rounded_queries(const Matrix<float>& q, Index heads) {
  const Index d = q.cols() / heads;
  const float scale = 1 / std::sqrt(float(d));
  Matrix<float> out(q.rows(), q.cols());
  for (Index r = 0; r < q.rows(); ++r)
    for (Index h = 0; h < heads; ++h) {
      float amax = 0;
      for (Index c = 0; c < d; ++c) amax = std::max(amax, std::fabs(scale * q(r, h * d + c)));
      const float s = amax / 127;
      for (Index c = 0; c < d; ++c)
        out(r, h * d + c) = s == 0 ? 0.0f : s * std::round(scale * q(r, h * d + c) / s) / scale;
    }
  return out;
}

// With the option, the contiguous cache (single tokens and chunks) and the paged cache (a batch)
// over head widths of two, three (odd: the last pair of blocks is half empty) and a partial
// block: (a) the reference on the rounded query and the stored rows, within the float rule (the
// scores are those of q^); (b) the exact attention of the unrounded rows, within the a priori
// bound of both steps; (c) not the bits of the call without the option.
TEST(KVFormatQ8Queries, RoundedQueryWithinTheRuleAndTheBoundOfBothSteps) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 8, kv_heads = 2, len = 300;
  AttentionOptions options;
  options.quantize_queries = true;
  options.block_k = 64;
  for (const Index d : {64, 96, 40}) {
    SCOPED_TRACE("d=" + std::to_string(d));
    const Matrix<float> q = rng.normal<float>(len, heads * d), k = rng.normal<float>(len, kv_heads * d),
                        v = rng.normal<float>(len, kv_heads * d);
    KVCache<Q8_0> cache(len, kv_heads, d), plain(len, kv_heads, d);
    Matrix<float> out(len, heads * d), plain_out(len, heads * d);
    for (Index t = 0; t < len;) {
      const Index n = t < 200 ? 100 : 1;  // two chunks, then single tokens
      decode_step_into(cache, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), heads, out.middleRows(t, n),
                       NoMask{}, options);
      decode_step_into(plain, q.middleRows(t, n), k.middleRows(t, n), v.middleRows(t, n), heads,
                       plain_out.middleRows(t, n), NoMask{}, AttentionOptions{});
      t += n;
    }
    const Matrix<float> q_hat = rounded_queries(q, heads);
    expect_rows_match<Q8_0>(q_hat, k, v, heads, visibility(0, len, len, -1), out);
    EXPECT_FALSE(identical(out, plain_out)) << "the option changed nothing";

    PagedKVCache<Q8_0> pool(64, kv_heads, d, {16});
    const Index a = pool.add_sequence(), b = pool.add_sequence();
    pool.append(a, k, v);
    pool.append(b, k.topRows(37), v.topRows(37));
    Matrix<float> batch_out(2, heads * d), lse(2, heads);
    const Matrix<float> batch_q = q.topRows(2);
    paged_attention_into(pool, {a, b}, SequenceRows::uniform(2, 1), batch_q, heads, batch_out, NoMask{}, options,
                         Vector<float>(), lse);
    expect_rows_match<Q8_0>(q_hat.topRows(1), k, v, heads, BoolMatrix::Constant(1, len, true), batch_out.topRows(1));
    expect_rows_match<Q8_0>(q_hat.middleRows(1, 1), k.topRows(37), v.topRows(37), heads,
                            BoolMatrix::Constant(1, 37, true), batch_out.bottomRows(1));

    const Matrix<Real> k_steps = q8_0_steps(k, kv_heads), v_steps = q8_0_steps(v, kv_heads);
    const Real scale = 1 / std::sqrt(Real(d));
    for (Index h = 0; h < heads; ++h) {
      const Index g = h / (heads / kv_heads);
      const Matrix<float> qh = q.block(0, h * d, 1, d), kh = k.middleCols(g * d, d), vh = v.middleCols(g * d, d);
      const Reference ref = reference_attention(qh, kh, vh, scale, BoolMatrix::Constant(1, len, true));
      // |q'_c - q^'_c| <= s_q / 2 = scale max |q| / 254, with room for the float roundings
      const Real query_step = Real(qh.cwiseAbs().maxCoeff()) / 254 * (1 + std::ldexp(Real(1), -10));
      const Q8Bound bound = q8_0_bound(qh, kh, vh, k_steps.middleCols(g * d, d), v_steps.middleCols(g * d, d), scale,
                                       ref.output.row(0).transpose(), query_step);
      for (Index c = 0; c < d; ++c)
        EXPECT_LE(std::fabs(Real(batch_out(0, h * d + c)) - ref.output(0, c)), bound.output(c)) << "head " << h;
      EXPECT_LE(std::fabs(Real(lse(0, h)) - ref.lse(0)), bound.lse + 1e-5 * std::fabs(ref.lse(0))) << "head " << h;
    }
  }
}

// With the option: a zero query row scores every key 0 (uniform weights: the mean of V), a
// query row holding a NaN or an infinity makes its head NaN and leaves the other heads as they
// are; a float cache ignores the option (the same bits).
TEST(KVFormatQ8Queries, DegenerateAndNonFiniteQueries) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 64, len = 50;
  AttentionOptions options;
  options.quantize_queries = true;
  const Matrix<float> k = rng.normal<float>(len, kv_heads * d), v = rng.normal<float>(len, kv_heads * d);
  Matrix<float> q = rng.normal<float>(1, heads * d);
  q.block(0, 0, 1, d).setZero();
  q(0, d + 5) = std::numeric_limits<float>::quiet_NaN();
  q(0, 2 * d + 7) = std::numeric_limits<float>::infinity();
  KVCache<Q8_0> cache(len, kv_heads, d);
  cache.append(k.topRows(len - 1), v.topRows(len - 1));
  const Matrix<float> out = decode_step(cache, q, k.bottomRows(1), v.bottomRows(1), heads, NoMask{}, options);
  const Matrix<float> v_stored = stored<Q8_0>(v, kv_heads);
  const RealVector mean = v_stored.leftCols(d).cast<Real>().colwise().mean().transpose();
  for (Index c = 0; c < d; ++c) EXPECT_NEAR(Real(out(0, c)), mean(c), 1e-5) << "column " << c;
  EXPECT_TRUE(out.block(0, d, 1, d).array().isNaN().all());
  EXPECT_TRUE(out.block(0, 2 * d, 1, d).array().isNaN().all());
  EXPECT_TRUE(out.block(0, 3 * d, 1, d).array().isFinite().all());

  KVCache<float> with(len, kv_heads, d), without(len, kv_heads, d);
  with.append(k.topRows(len - 1), v.topRows(len - 1));
  without.append(k.topRows(len - 1), v.topRows(len - 1));
  const Matrix<float> q2 = rng.normal<float>(1, heads * d);
  EXPECT_TRUE(identical(decode_step(with, q2, k.bottomRows(1), v.bottomRows(1), heads, NoMask{}, options),
                        decode_step(without, q2, k.bottomRows(1), v.bottomRows(1), heads)));
}

// bf16 queries with a bf16 cache, and a float layer over reduced and 8-bit caches.
TEST(KVFormatMixed, Bf16QueriesAndFloatLayers) {
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 32, len = 30;
  const Matrix<float> q = rng.normal<float>(len, heads * d), k = rng.normal<float>(len, kv_heads * d),
                      v = rng.normal<float>(len, kv_heads * d);
  KVCache<Eigen::bfloat16> cache(len, kv_heads, d);
  Matrix<float> out(len, heads * d);
  for (Index t = 0; t < len; t += 6) {
    const Matrix<Eigen::bfloat16> step =
        decode_step(cache, Matrix<Eigen::bfloat16>(q.middleRows(t, 6).cast<Eigen::bfloat16>()),
                    Matrix<Eigen::bfloat16>(k.middleRows(t, 6).cast<Eigen::bfloat16>()),
                    Matrix<Eigen::bfloat16>(v.middleRows(t, 6).cast<Eigen::bfloat16>()), heads);
    out.middleRows(t, 6) = step.cast<float>();
  }
  // The queries as stored in bf16; the output rounded once to bf16 (the naive one is too).
  expect_rows_match<Eigen::bfloat16>(q.cast<Eigen::bfloat16>().cast<float>(), k, v, heads,
                                     visibility(0, len, len, -1), out);
  // The same through a bf16 pool, the whole sequence as one chunk.
  PagedKVCache<Eigen::bfloat16> pool16(8, kv_heads, d, {8});
  Matrix<Eigen::bfloat16> out16(len, heads * d);
  paged_decode_step_into(pool16, {pool16.add_sequence()}, SequenceRows::uniform(1, len),
                         Matrix<Eigen::bfloat16>(q.cast<Eigen::bfloat16>()), Matrix<Eigen::bfloat16>(k.cast<Eigen::bfloat16>()),
                         Matrix<Eigen::bfloat16>(v.cast<Eigen::bfloat16>()), heads, out16);
  expect_rows_match<Eigen::bfloat16>(q.cast<Eigen::bfloat16>().cast<float>(), k, v, heads,
                                     visibility(0, len, len, -1), out16.cast<float>());

  const Shape s{4, 2, 32, 32, 48, 48, 48, 40, true};
  const MultiHeadAttention<float> layer(s.heads, random_weights<float>(s, rng), s.kv_heads);
  const Matrix<float> x = rng.normal<float>(len, s.eq);
  const Matrix<float> expected = layer.forward(x, Causal()).output;
  KVCache<Eigen::half> half_cache(layer, len);
  KVCache<Q8_0> q8_cache(layer, len);
  PagedKVCache<Q8_0> pool(layer, 8, {8});
  const Index seq = pool.add_sequence();
  Matrix<float> half_out(len, s.eout), q8_out(len, s.eout), paged_out(len, s.eout);
  for (Index t = 0; t < len; t += 5) {
    half_out.middleRows(t, 5) = decode_step(layer, half_cache, x.middleRows(t, 5));
    q8_out.middleRows(t, 5) = decode_step(layer, q8_cache, x.middleRows(t, 5));
    paged_out.middleRows(t, 5) = paged_decode_step(layer, pool, {seq}, SequenceRows::uniform(1, 5), x.middleRows(t, 5));
  }
  // Loose: the layer's output against the float layer's (the caches' rounding, not the rule).
  const float scale = expected.cwiseAbs().maxCoeff();
  EXPECT_LE((half_out - expected).cwiseAbs().maxCoeff(), 5e-3f * scale);
  EXPECT_LE((q8_out - expected).cwiseAbs().maxCoeff(), 5e-2f * scale);
  EXPECT_TRUE(identical(q8_out, paged_out) || (q8_out - paged_out).cwiseAbs().maxCoeff() <= 1e-5f * scale);
}

// StreamingLLM through a rotary float layer over reduced and 8-bit pools: the re-rotated sink keys
// are read out of the pool, rotated and stored in its format again; the outputs stay close to a
// float pool's (the formats' rounding, loosely).
TEST(KVFormatMixed, StreamingLLMRotaryLayerOverReducedPools) {
  ATTEND_SEEDED_RNG(rng);
  const Shape s{4, 2, 32, 32, 48, 48, 48, 40, false};
  MultiHeadAttention<float> layer(s.heads, random_weights<float>(s, rng), s.kv_heads);
  layer.set_rotary(RotaryEmbedding<float>(s.d));
  const Index len = 24;
  const PagedKVCacheOptions options{4, 5, 0, 2};  // blocks of 4, window 5, 2 sink tokens
  PagedKVCache<float> reference(layer, 16, options);
  PagedKVCache<Eigen::bfloat16> bf16(layer, 16, options);
  PagedKVCache<Q8_0> q8(layer, 16, options);
  const Index a = reference.add_sequence();
  bf16.add_sequence();
  q8.add_sequence();
  const Matrix<float> x = rng.normal<float>(len, s.eq);
  const SequenceRows one = SequenceRows::uniform(1, 1);
  float worst_bf16 = 0, worst_q8 = 0, scale = 0;
  for (Index t = 0; t < len; ++t) {
    const Matrix<float> y = paged_decode_step(layer, reference, {a}, one, x.row(t));
    worst_bf16 = std::max(worst_bf16, (paged_decode_step(layer, bf16, {a}, one, x.row(t)) - y).cwiseAbs().maxCoeff());
    worst_q8 = std::max(worst_q8, (paged_decode_step(layer, q8, {a}, one, x.row(t)) - y).cwiseAbs().maxCoeff());
    scale = std::max(scale, y.cwiseAbs().maxCoeff());
  }
  EXPECT_LE(worst_bf16, 2e-2f * scale);
  EXPECT_LE(worst_q8, 5e-2f * scale);
  EXPECT_GT(worst_q8, 0) << "the 8-bit pool rounded nothing";
}

// Bitwise the same for 1, 2 and 3 threads, a single token and a chunk, in every format, with and
// without quantize_queries.
TYPED_TEST(KVFormatTest, BitwiseEqualForOneToThreeThreads) {
#ifndef _OPENMP
  GTEST_SKIP() << "built without OpenMP";
#else
  using S = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 8, kv_heads = 2, d = 64, len = 1500;
  const Matrix<float> q = rng.normal<float>(5, heads * d), k = rng.normal<float>(len, kv_heads * d),
                      v = rng.normal<float>(len, kv_heads * d);
  KVCache<S> base(len, kv_heads, d);
  base.append(k.topRows(len - 6), v.topRows(len - 6));
  const int saved = omp_get_max_threads();
  std::vector<Matrix<float>> outs;
  for (const int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    for (const bool quantize_queries : {false, true}) {
      AttentionOptions options;
      options.quantize_queries = quantize_queries;
      KVCache<S> cache = base;
      Matrix<float> out(6, heads * d);
      decode_step_into(cache, q.topRows(1), k.middleRows(len - 6, 1), v.middleRows(len - 6, 1), heads, out.topRows(1),
                       NoMask{}, options);
      decode_step_into(cache, q, k.bottomRows(5), v.bottomRows(5), heads, out.bottomRows(5), NoMask{}, options);
      outs.push_back(out);
    }
  }
  omp_set_num_threads(saved);
  for (std::size_t r = 2; r < outs.size(); ++r) EXPECT_TRUE(identical(outs[r], outs[r % 2]));  // 1 thread: outs[0], [1]
#endif
}

}  // namespace
}  // namespace attend::test
