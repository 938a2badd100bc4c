// SPDX-License-Identifier: MIT
// Packed documents: several documents of different lengths concatenated into one training
// sequence, each token seeing only the earlier tokens of its own document (causal within a
// document). Written as a FlexAttention-style mask_mod, with an exact block classification so
// that the blocked kernel skips the tiles between documents; checked against the same mask as a
// dense boolean matrix, and printing how much of the score matrix the kernel actually visited.
#include <attend/attend.hpp>

#include <atomic>
#include <iostream>
#include <vector>

int main() {
  using attend::Index;
  using attend::TileKind;
  const std::vector<Index> lengths{700, 150, 1200, 33, 965};  // documents packed one after the other
  std::vector<Index> start;  // start[i]: the first token of token i's document
  for (const Index n : lengths)
    for (Index i = 0, first = Index(start.size()); i < n; ++i) start.push_back(first);
  const Index len = Index(start.size()), heads = 4, dim = 32;

  const attend::Matrix<float> q = attend::Matrix<float>::Random(len, heads * dim);  // (L, H d)
  const attend::Matrix<float> k = attend::Matrix<float>::Random(len, heads * dim);  // (L, H d)
  const attend::Matrix<float> v = attend::Matrix<float>::Random(len, heads * dim);  // (L, H d)

  // Key j is visible to query i iff it is in i's document and not after i: start[i] <= j <= i.
  std::atomic<long> evaluated{0}, computed{0}, tiles{0};
  const auto visible = [&](Index /*head*/, Index i, Index j) {
    evaluated.fetch_add(1, std::memory_order_relaxed);
    return start[std::size_t(i)] <= j && j <= i;
  };
  // Queries [q0, q1) see keys in [start[q0], q1 - 1] at most and [start[q1 - 1], q0] at least
  // (start is non-decreasing), so a tile outside the first range is Empty, inside the second Full.
  const auto classify = [&](Index /*head*/, Index q0, Index q1, Index k0, Index k1) {
    tiles.fetch_add(1, std::memory_order_relaxed);
    if (k1 <= start[std::size_t(q0)] || k0 > q1 - 1) return TileKind::Empty;
    computed.fetch_add(1, std::memory_order_relaxed);
    if (start[std::size_t(q1 - 1)] <= k0 && k1 - 1 <= q0) return TileKind::Full;
    return TileKind::Partial;
  };

  attend::AttentionOptions blocked;
  blocked.algorithm = attend::Algorithm::Blocked;
  const attend::Matrix<float> out =
      attend::multi_head_attention(q, k, v, heads, attend::MaskMod(visible, classify), blocked);

  // The reference: the same visibility as a dense (L, L) boolean mask, materialized path.
  attend::BoolMatrix dense(len, len);
  for (Index i = 0; i < len; ++i)
    for (Index j = 0; j < len; ++j) dense(i, j) = start[std::size_t(i)] <= j && j <= i;
  attend::AttentionOptions materialized;
  materialized.algorithm = attend::Algorithm::Materialized;
  const attend::Matrix<float> expected =
      attend::multi_head_attention(q, k, v, heads, attend::BooleanMask(dense), materialized);

  const float error = (out - expected).cwiseAbs().maxCoeff();
  const double visible_fraction = double(dense.count()) / double(len * len);
  const double visited = double(evaluated.load()) / double(heads * len * len);
  const double share = double(computed.load()) / double(tiles.load());
  std::cout << lengths.size() << " documents packed into " << len << " tokens, " << heads << " heads\n"
            << "visible scores: " << 100 * visible_fraction << "% of the (L x L) matrix\n"
            << "tiles computed: " << computed.load() << " of " << tiles.load() << " (" << 100 * share
            << "%); the predicate ran on " << 100 * visited << "% of the scores (in partial tiles only)\n"
            << "max |blocked - dense reference| = " << error << "\n";
  return error < 1e-5f && share < 0.5 ? 0 : 1;
}
