// SPDX-License-Identifier: MIT
// The varlen multi-head backward (attention/backward.hpp): multi_head_attention_with_lse and
// multi_head_attention_backward(_into) over SequenceRows, a padded and a packed batch read in
// place, give each sequence bitwise what a call on it alone gives (its rows of the output,
// log-sum-exp and gradients), and zeros (-inf log-sum-exp) in rows of no sequence; the
// gradients match the long-double reference per (sequence, head); T5 table gradients sum the
// sequences' in order; and bad layouts throw naming their sizes.
#include "support/attention_case.hpp"
#include "support/expect.hpp"
#include "support/gradient_reference.hpp"
#include "support/masks.hpp"
#include "support/random.hpp"
#include "support/scalars.hpp"
#include "support/tolerance.hpp"

#include <attend/attention/backward.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class BackwardVarlenTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(BackwardVarlenTest, Scalars);

/// Query and key lengths of a batch: sequence 1 has no queries, sequence 2 no keys, sequence 0
/// is long enough (300 x 290 scores) for Algorithm::Auto to take the blocked path while it
/// takes the materialized one for the others, in the same call.
const std::vector<Index> kQueryLengths{300, 0, 45, 23}, kKeyLengths{290, 50, 0, 80};
const std::vector<Index> kValid{250, 50, 0, 77};  // KeyPadding per sequence

/// Sequences of `lengths` padded to `padded` rows each, or packed one after the other.
SequenceRows layout_of(const std::vector<Index>& lengths, Index padded, bool packed) {
  if (!packed) return SequenceRows::padded(padded, lengths);
  std::vector<Index> offsets{0};
  for (const Index n : lengths) offsets.push_back(offsets.back() + n);
  return SequenceRows::packed(offsets);
}

/// Whether row r of a matrix of `rows` rows belongs to no sequence of `layout`.
std::vector<bool> rows_of_no_sequence(const SequenceRows& layout, Index rows) {
  std::vector<bool> none(std::size_t(rows), true);
  for (Index b = 0; b < layout.size(); ++b)
    for (Index r = layout.begin(b); r < layout.begin(b) + layout.length(b); ++r) none[std::size_t(r)] = false;
  return none;
}

TYPED_TEST(BackwardVarlenTest, EachSequenceIsBitwiseItsOwnCall) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 4, kv_heads = 2, d = 16, dv = 8;
  for (const bool packed : {false, true}) {
    const SequenceRows q_rows = layout_of(kQueryLengths, 300, packed), k_rows = layout_of(kKeyLengths, 290, packed);
    const Index rows = packed ? q_rows.rows_used() + 3 : q_rows.rows_used();  // (packed: 3 rows of no sequence)
    const Index k_count = k_rows.rows_used();
    const Matrix<T> q = rng.normal<T>(rows, heads * d), k = rng.normal<T>(k_count, kv_heads * d),
                    v = rng.normal<T>(k_count, kv_heads * dv), d_out = rng.normal<T>(rows, heads * dv);
    const auto mask = Causal(Alignment::BottomRight) & KeyPadding(kValid);
    for (const AttentionOptions& options : {blocked_path(32, 48), materialized_path(), AttentionOptions{}}) {
      SCOPED_TRACE(std::string(packed ? "packed " : "padded ") + describe(options));
      const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, heads, q_rows, k_rows, mask, options);
      const AttentionGradients<T> g =
          multi_head_attention_backward(q, k, v, heads, q_rows, k_rows, f, d_out, mask, options);
      for (Index b = 0; b < q_rows.size(); ++b) {
        SCOPED_TRACE("sequence " + std::to_string(b));
        const Index q0 = q_rows.begin(b), lq = q_rows.length(b), k0 = k_rows.begin(b), lk = k_rows.length(b);
        const Matrix<T> qb = q.middleRows(q0, lq), kb = k.middleRows(k0, lk), vb = v.middleRows(k0, lk),
                        db = d_out.middleRows(q0, lq);
        const auto mask_b = Causal(Alignment::BottomRight) & KeyPadding(kValid[std::size_t(b)]);
        const MultiHeadLseResult<T> fb = multi_head_attention_with_lse(qb, kb, vb, heads, mask_b, options);
        const AttentionGradients<T> gb = multi_head_attention_backward(qb, kb, vb, heads, fb, db, mask_b, options);
        EXPECT_TRUE(identical(Matrix<T>(f.output.middleRows(q0, lq)), fb.output)) << "output";
        EXPECT_TRUE(identical(Matrix<T>(f.lse.middleRows(q0, lq)), fb.lse)) << "log-sum-exp";
        EXPECT_TRUE(identical(Matrix<T>(g.dq.middleRows(q0, lq)), gb.dq)) << "dq";
        EXPECT_TRUE(identical(Matrix<T>(g.dk.middleRows(k0, lk)), gb.dk)) << "dk";
        EXPECT_TRUE(identical(Matrix<T>(g.dv.middleRows(k0, lk)), gb.dv)) << "dv";
        if (lq == 0 || lk == 0) {  // nothing seen: zero gradients of its rows
          EXPECT_TRUE(g.dq.middleRows(q0, lq).isZero(0) && g.dk.middleRows(k0, lk).isZero(0) &&
                      g.dv.middleRows(k0, lk).isZero(0));
          EXPECT_TRUE((f.lse.middleRows(q0, lq).array() == -std::numeric_limits<T>::infinity()).all());
        }
      }
      const std::vector<bool> no_query = rows_of_no_sequence(q_rows, rows), no_key = rows_of_no_sequence(k_rows, k_count);
      for (Index r = 0; r < rows; ++r) {
        if (!no_query[std::size_t(r)]) continue;
        EXPECT_TRUE(f.output.row(r).isZero(0) && g.dq.row(r).isZero(0)) << "query row " << r << " in no sequence";
        EXPECT_TRUE((f.lse.row(r).array() == -std::numeric_limits<T>::infinity()).all()) << "row " << r;
      }
      for (Index r = 0; r < k_count; ++r) {
        if (no_key[std::size_t(r)]) {
          EXPECT_TRUE(g.dk.row(r).isZero(0) && g.dv.row(r).isZero(0)) << "key row " << r << " in no sequence";
        }
      }
    }
  }
}

TYPED_TEST(BackwardVarlenTest, GradientsMatchTheReferencePerSequenceAndHead) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 2, d = 8, dv = 5;
  // Lengths around the 32 x 48 tiles, Lq != Lk, an empty sequence of each kind.
  const std::vector<Index> q_lengths{70, 0, 33, 5, 17}, k_lengths{61, 9, 49, 0, 97};
  const std::vector<Index> valid{50, 9, 49, 0, 96};
  for (const bool packed : {false, true}) {
    const SequenceRows q_rows = layout_of(q_lengths, 70, packed), k_rows = layout_of(k_lengths, 97, packed);
    const Matrix<T> q = rng.normal<T>(q_rows.rows_used(), heads * d),
                    k = rng.normal<T>(k_rows.rows_used(), heads * d), v = rng.normal<T>(k_rows.rows_used(), heads * dv),
                    d_out = rng.normal<T>(q_rows.rows_used(), heads * dv);
    const auto mask = Causal() & KeyPadding(valid);
    for (const AttentionOptions& options : {blocked_path(32, 48), materialized_path()}) {
      SCOPED_TRACE(std::string(packed ? "packed " : "padded ") + describe(options));
      const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, heads, q_rows, k_rows, mask, options);
      const AttentionGradients<T> g =
          multi_head_attention_backward(q, k, v, heads, q_rows, k_rows, f, d_out, mask, options);
      for (Index b = 0; b < q_rows.size(); ++b) {
        const Index q0 = q_rows.begin(b), lq = q_rows.length(b), k0 = k_rows.begin(b), lk = k_rows.length(b);
        if (lq == 0 || lk == 0) continue;  // (zero gradients: EachSequenceIsBitwiseItsOwnCall)
        const BoolMatrix visible = (causal_visibility(lq, lk, Alignment::TopLeft).array() &&
                                    padding_visibility(lq, lk, valid[std::size_t(b)]).array())
                                       .matrix();
        for (Index h = 0; h < heads; ++h) {
          SCOPED_TRACE("sequence " + std::to_string(b) + " head " + std::to_string(h));
          const Matrix<T> qh = q.block(q0, h * d, lq, d), kh = k.block(k0, h * d, lk, d),
                          vh = v.block(k0, h * dv, lk, dv), dh = d_out.block(q0, h * dv, lq, dv);
          GradientCase gc;
          gc.scale = 1 / std::sqrt(Real(d));
          const RealGradients ref = reference_gradients(qh, kh, vh, dh, visible, gc);
          const Gradients<T> base = baseline_gradients<T>(qh, kh, vh, dh, visible, gc);
          const AttentionGradients<T> gh{g.dq.block(q0, h * d, lq, d), g.dk.block(k0, h * d, lk, d),
                                         g.dv.block(k0, h * dv, lk, dv)};
          expect_gradients_match<T>(gh, ref, base);
        }
      }
    }
  }
}

TYPED_TEST(BackwardVarlenTest, TableGradientsSumTheSequencesInOrder) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const Index heads = 3, d = 8;
  const std::vector<Index> lengths{40, 0, 75, 9};
  const SequenceRows rows = layout_of(lengths, 75, true);
  const Matrix<T> q = rng.normal<T>(rows.rows_used(), heads * d), k = rng.normal<T>(rows.rows_used(), heads * d),
                  v = rng.normal<T>(rows.rows_used(), heads * d), d_out = rng.normal<T>(rows.rows_used(), heads * d);
  const Matrix<T> per_head = rng.normal<T>(16, heads);
  const Vector<T> shared = rng.normal<T>(16, 1);
  const auto mask = Causal() & RelativePositionBias(per_head, true, 32) & RelativePositionBias(shared, true, 32);
  const RelativePositionBuckets buckets{16, true, 32, Alignment::TopLeft};
  for (const AttentionOptions& options : {blocked_path(16, 32), materialized_path()}) {
    SCOPED_TRACE(describe(options));
    Matrix<T> d_table_per_head;
    Vector<T> d_table;
    BiasGradients<T> request;
    request.d_table = &d_table;
    request.d_table_per_head = &d_table_per_head;
    request.table_buckets = buckets;
    const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, heads, rows, rows, mask, options);
    const AttentionGradients<T> g =
        multi_head_attention_backward(q, k, v, heads, rows, rows, f, d_out, mask, options, request);
    Matrix<T> sum_per_head = Matrix<T>::Zero(16, heads);
    Vector<T> sum = Vector<T>::Zero(16);
    for (Index b = 0; b < rows.size(); ++b) {
      const Index r0 = rows.begin(b), n = rows.length(b);
      const Matrix<T> qb = q.middleRows(r0, n), kb = k.middleRows(r0, n), vb = v.middleRows(r0, n),
                      db = d_out.middleRows(r0, n);
      Matrix<T> tb;
      Vector<T> sb;
      BiasGradients<T> own = request;
      own.d_table = &sb;
      own.d_table_per_head = &tb;
      const MultiHeadLseResult<T> fb = multi_head_attention_with_lse(qb, kb, vb, heads, mask, options);
      const AttentionGradients<T> gb = multi_head_attention_backward(qb, kb, vb, heads, fb, db, mask, options, own);
      EXPECT_TRUE(identical(Matrix<T>(g.dq.middleRows(r0, n)), gb.dq)) << "sequence " << b;
      EXPECT_TRUE(identical(Matrix<T>(g.dk.middleRows(r0, n)), gb.dk)) << "sequence " << b;
      sum_per_head += tb;
      sum += sb;
    }
    EXPECT_TRUE(identical(d_table_per_head, sum_per_head)) << "d_table_per_head";
    EXPECT_TRUE(identical(d_table, sum)) << "d_table";
    EXPECT_FALSE(d_table.isZero(0));  // (the sums are not vacuous)
  }
  // No sequence: zero tables and gradients.
  const SequenceRows none = SequenceRows::packed(std::vector<Index>{0});
  const MultiHeadLseResult<T> f = multi_head_attention_with_lse(q, k, v, heads, none, none, mask);
  Vector<T> d_table = Vector<T>::Ones(3);
  BiasGradients<T> request;
  request.d_table = &d_table;
  request.table_buckets = buckets;
  const AttentionGradients<T> g = multi_head_attention_backward(q, k, v, heads, none, none, f, d_out, mask, {}, request);
  EXPECT_TRUE(d_table.size() == 16 && d_table.isZero(0));
  EXPECT_TRUE(f.output.isZero(0) && g.dq.isZero(0) && g.dk.isZero(0) && g.dv.isZero(0));
}

TEST(BackwardVarlenErrors, BadLayoutsAndBiasMatricesOfSeveralSequencesThrowNamingThem) {
  using M = Matrix<double>;
  const M q = M::Ones(10, 8), k = M::Ones(12, 8), v = M::Ones(12, 8), d_out = M::Ones(10, 8);
  const SequenceRows two = SequenceRows::packed(std::vector<int>{0, 4, 10}), keys = SequenceRows::uniform(2, 6);
  const MultiHeadLseResult<double> f = multi_head_attention_with_lse(q, k, v, 2, two, keys);
  M dq(10, 8), dk(12, 8), dv(12, 8);
  expect_invalid([&] { multi_head_attention_backward(q, k, v, 2, two, SequenceRows::uniform(3, 4), f, d_out); },
                 {"2 query sequences and 3 key sequences"});
  expect_invalid([&] { multi_head_attention_backward(q, k, v, 2, two, SequenceRows::uniform(2, 7), f, d_out); },
                 {"14 key rows", "(12 x 8)"});
  expect_invalid(
      [&] {
        multi_head_attention_backward_into(q, k, v, 2, two, keys, f.output, M::Zero(10, 3), d_out, dq, dk, dv);
      },
      {"(10 x 3) must be (10 x 2)"});
  expect_invalid([&] { multi_head_attention_with_lse(q, k, v, 2, two, SequenceRows::uniform(2, 7)); },
                 {"14 key rows"});
  M lse(10, 3), out(10, 8);
  expect_invalid([&] { multi_head_attention_into(q, k, v, 2, two, keys, out, NoMask{}, {}, lse); },
                 {"(10 x 3) must be (10 x 2)"});
  M d_bias;
  BiasGradients<double> request;
  request.d_bias = &d_bias;
  expect_invalid([&] { multi_head_attention_backward(q, k, v, 2, two, keys, f, d_out, NoMask{}, {}, request); },
                 {"batch of 2 sequences", "d_bias"});
  // One sequence: the bias matrix gradient of the single-sequence form.
  const SequenceRows one = SequenceRows::uniform(1, 10), one_k = SequenceRows::uniform(1, 12);
  const M bias = M::Zero(10, 12);
  const MultiHeadLseResult<double> f1 = multi_head_attention_with_lse(q, k, v, 2, one, one_k, AdditiveMask(bias));
  multi_head_attention_backward(q, k, v, 2, one, one_k, f1, d_out, AdditiveMask(bias), {}, request);
  EXPECT_EQ(d_bias.rows(), 10);
  EXPECT_EQ(d_bias.cols(), 12);
}

}  // namespace
