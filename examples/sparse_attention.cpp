// SPDX-License-Identifier: MIT
// Sparse attention of the BigBird kind (Zaheer et al. 2020; the source articles' "sparse
// attention"): every query sees a few global tokens, a sliding window around itself, and a few
// random blocks of keys, and the global tokens see everything. Written as a mask_mod with an
// exact classification of 64 x 64 tiles, so that the blocked kernel computes only the tiles
// the pattern touches: cost O(L (g + w + r b)) instead of O(L^2). Checked against the same
// pattern as a dense boolean matrix; prints the share of tiles computed.
#include <attend/attend.hpp>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <random>
#include <vector>

int main() {
  using attend::Index;
  using attend::TileKind;
  const Index len = 4096, dim = 64, block = 64, globals = 64, window = 128, random_blocks = 2;
  const Index num_blocks = len / block;

  // random[b]: the key blocks query block b sees at random (fixed seed).
  std::mt19937 engine(7);
  std::uniform_int_distribution<Index> pick(0, num_blocks - 1);
  std::vector<std::vector<Index>> random(static_cast<std::size_t>(num_blocks));
  for (auto& r : random)
    for (Index n = 0; n < random_blocks; ++n) r.push_back(pick(engine));

  const auto visible = [&](Index /*head*/, Index i, Index j) {
    if (i < globals || j < globals) return true;                 // global tokens
    if (std::abs(i - j) <= window) return true;                  // sliding window
    const auto& r = random[std::size_t(i / block)];              // random key blocks
    return std::find(r.begin(), r.end(), j / block) != r.end();
  };
  // Exact for any tile: Full when the tile lies in the global rows or columns or inside the
  // window band; Partial when it touches them or a random block of one of its query blocks.
  std::atomic<long> computed{0}, tiles{0};
  const auto classify = [&](Index /*head*/, Index q0, Index q1, Index k0, Index k1) {
    tiles.fetch_add(1, std::memory_order_relaxed);
    const auto kind = [&] {
      if (q1 <= globals || k1 <= globals) return TileKind::Full;
      if (k0 >= q1 - 1 - window && k1 - 1 <= q0 + window) return TileKind::Full;
      if (q0 < globals || k0 < globals) return TileKind::Partial;
      if (k0 <= q1 - 1 + window && k1 - 1 >= q0 - window) return TileKind::Partial;
      for (Index b = q0 / block; b <= (q1 - 1) / block; ++b)
        for (const Index r : random[std::size_t(b)])
          if (r * block < k1 && (r + 1) * block > k0) return TileKind::Partial;
      return TileKind::Empty;
    }();
    if (kind != TileKind::Empty) computed.fetch_add(1, std::memory_order_relaxed);
    return kind;
  };

  const attend::Matrix<float> q = attend::Matrix<float>::Random(len, dim);  // (L, d)
  const attend::Matrix<float> k = attend::Matrix<float>::Random(len, dim);  // (L, d)
  const attend::Matrix<float> v = attend::Matrix<float>::Random(len, dim);  // (L, d)
  attend::AttentionOptions blocked;
  blocked.algorithm = attend::Algorithm::Blocked;
  blocked.block_q = block;
  blocked.block_k = block;
  const attend::Matrix<float> out = attend::scaled_dot_product_attention(q, k, v, attend::MaskMod(visible, classify), blocked);

  attend::BoolMatrix dense(len, len);
  for (Index i = 0; i < len; ++i)
    for (Index j = 0; j < len; ++j) dense(i, j) = visible(0, i, j);
  attend::AttentionOptions materialized;
  materialized.algorithm = attend::Algorithm::Materialized;
  const attend::Matrix<float> expected =
      attend::scaled_dot_product_attention(q, k, v, attend::BooleanMask(dense), materialized);

  const float error = (out - expected).cwiseAbs().maxCoeff();
  const double share = double(computed.load()) / double(tiles.load());
  std::cout << "BigBird-style pattern over " << len << " tokens: " << globals << " global tokens, window +-" << window
            << ", " << random_blocks << " random blocks of " << block << " keys per query block\n"
            << "visible scores: " << 100.0 * double(dense.count()) / double(len * len) << "% of the (L x L) matrix\n"
            << "tiles computed: " << computed.load() << " of " << tiles.load() << " (" << 100 * share << "%)\n"
            << "max |blocked - dense reference| = " << error << "\n";
  return error < 1e-5f && share < 0.25 ? 0 : 1;
}
