// SPDX-License-Identifier: MIT
// A small batched generation loop over a paged KV cache (continuous batching, as vLLM serves):
// one attention layer with rotary positions and grouped-query heads (8 query heads on 2 kv heads,
// d = 16) serves several prompts of different lengths from one pool of 4-token blocks.
//  - Prompts are prefilled in chunks of at most 6 tokens, in the same calls in which the other
//    sequences generate: every call is one attend::paged_decode_step over all live sequences,
//    each with its own number of new tokens (a chunk, or the one generated token).
//  - A generated token is the toy model's own output, RMS-normalized (as examples/causal_decoding).
//  - Sequence "short" finishes early: its blocks return to the pool and a late prompt that
//    arrives afterwards reuses them.
//  - Sequence "long" is forked after its prompt (parallel sampling): the fork shares the prompt's
//    blocks (copy on write) and continues from a different first token.
// At the end every sequence's outputs, prompt and generated tokens alike, are checked against a
// full recomputation: the layer over the whole sequence with a causal mask.
#include <attend/attend.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <utility>
#include <vector>

using attend::Index;
using attend::Matrix;

namespace {

constexpr Index kWidth = 32, kHeads = 8, kKvHeads = 2, kHeadDim = 16;
constexpr Index kBlock = 4, kBlocks = 40, kChunk = 6;

Matrix<double> random_matrix(Index rows, Index cols, double amplitude, std::mt19937& gen) {
  std::uniform_real_distribution<double> uniform(-amplitude, amplitude);
  Matrix<double> m(rows, cols);
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) m(i, j) = uniform(gen);
  return m;
}

/// A request: its tokens so far (prompt, then generated), and the layer's output for each.
struct Request {
  std::string name;
  Matrix<double> tokens;   // (prompt + generated, E)
  Index prompt = 0;        // prompt tokens
  Index to_generate = 0;   // tokens to generate
  Index fed = 0;           // tokens already in the cache
  Matrix<double> outputs;  // (fed, E)
  Index id = -1;           // sequence of the cache
  bool finished() const { return fed == prompt + to_generate; }
};

Request make_request(std::string name, Index prompt, Index to_generate, std::mt19937& gen) {
  Request r{std::move(name), random_matrix(prompt, kWidth, 1.0, gen), prompt, to_generate, 0, Matrix<double>(0, kWidth)};
  return r;
}

/// Appends row y, RMS-normalized, as the request's next token.
void append_token(Request& r, const Matrix<double>& y) {
  r.tokens.conservativeResize(r.tokens.rows() + 1, Eigen::NoChange);
  r.tokens.bottomRows(1) = y / std::sqrt(y.squaredNorm() / double(kWidth));
}

}  // namespace

int main() {
  std::mt19937 gen(7);
  const double a = 1 / std::sqrt(double(kWidth));
  attend::MultiHeadWeights<double> weights;  // nn.Linear layout (out_features, in_features)
  weights.q_proj_weight = random_matrix(kHeads * kHeadDim, kWidth, a, gen);
  weights.k_proj_weight = random_matrix(kKvHeads * kHeadDim, kWidth, a, gen);
  weights.v_proj_weight = random_matrix(kKvHeads * kHeadDim, kWidth, a, gen);
  weights.out_proj_weight = random_matrix(kWidth, kHeads * kHeadDim, 1 / std::sqrt(double(kHeads * kHeadDim)), gen);
  attend::MultiHeadAttention<double> layer(kHeads, std::move(weights), kKvHeads);
  layer.set_rotary(attend::RotaryEmbedding<double>(kHeadDim));

  attend::PagedKVCache<double> cache(layer, kBlocks, {kBlock});
  std::vector<Request> requests;
  requests.push_back(make_request("long", 17, 6, gen));
  requests.push_back(make_request("short", 5, 3, gen));
  requests.push_back(make_request("medium", 11, 8, gen));
  for (Request& r : requests) r.id = cache.add_sequence();
  Request late = make_request("late", 9, 5, gen);
  bool forked = false, late_added = false;
  std::vector<Index> freed_blocks;

  std::printf("call  sequences (new tokens)                          free blocks\n");
  for (int call = 0; call < 100; ++call) {
    // Every live request gives its next tokens: a prompt chunk, or its last generated token.
    std::vector<Index> ids, offsets{0};
    std::vector<Request*> batch;
    std::string line;
    for (Request& r : requests) {
      if (r.finished() || r.id < 0) continue;
      const Index n = r.fed < r.prompt ? std::min(kChunk, r.prompt - r.fed) : 1;
      ids.push_back(r.id);
      offsets.push_back(offsets.back() + n);
      batch.push_back(&r);
      line += r.name + " (" + std::to_string(n) + ") ";
    }
    if (batch.empty()) break;
    Matrix<double> x(offsets.back(), kWidth);
    for (std::size_t b = 0; b < batch.size(); ++b)
      x.middleRows(offsets[b], offsets[b + 1] - offsets[b]) =
          batch[b]->tokens.middleRows(batch[b]->fed, offsets[b + 1] - offsets[b]);
    const Matrix<double> y = attend::paged_decode_step(layer, cache, ids, attend::SequenceRows::packed(offsets), x);
    std::printf("%4d  %-48s %5ld\n", call, line.c_str(), long(cache.free_blocks()));

    bool fork_now = false;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      Request& r = *batch[b];
      const Index n = offsets[b + 1] - offsets[b];
      r.outputs.conservativeResize(r.fed + n, Eigen::NoChange);
      r.outputs.bottomRows(n) = y.middleRows(offsets[b], n);
      r.fed += n;
      if (r.fed >= r.prompt && !r.finished()) append_token(r, y.row(offsets[b + 1] - 1));
      fork_now = fork_now || (r.name == "long" && r.fed == r.prompt && !forked);
    }
    if (fork_now) {  // parallel sampling: a second continuation of the prompt, from another first token
      Request fork = requests.front();
      fork.name = "fork";
      fork.id = cache.fork(fork.id);
      fork.tokens.bottomRows(1) *= -1;
      requests.push_back(std::move(fork));
      forked = true;
      std::printf("      long forked after its prompt: the fork shares its %zu blocks\n",
                  cache.block_table(requests.back().id).size());
    }
    for (Request& r : requests)
      if (r.finished() && r.id >= 0 && r.name == "short") {
        freed_blocks = cache.block_table(r.id);
        cache.free_sequence(r.id);
        std::printf("      short finished: its %zu blocks return to the pool\n", freed_blocks.size());
        r.id = -2;  // done, no longer in the cache
      }
    if (!late_added && !freed_blocks.empty()) {
      late.id = cache.add_sequence();
      requests.push_back(late);
      late_added = true;
    }
  }

  bool ok = true;
  for (const Request& r : requests) {
    if (r.id == -1) continue;
    const Matrix<double> full = layer.forward(r.tokens.topRows(r.fed), attend::Causal()).output;
    const double diff = (full - r.outputs).cwiseAbs().maxCoeff();
    ok = ok && r.finished() && diff <= 1e-12;  // false for NaN too
    std::printf("%-6s %2ld prompt + %ld generated tokens, |paged - full recomputation| = %.3e\n", r.name.c_str(),
                long(r.prompt), long(r.to_generate), diff);
  }
  const Request& last = requests.back();
  const std::vector<Index>& table = cache.block_table(last.id);
  const bool reused = std::any_of(table.begin(), table.end(), [&](Index p) {
    return std::find(freed_blocks.begin(), freed_blocks.end(), p) != freed_blocks.end();
  });
  std::printf("the late prompt reuses blocks of the finished one: %s\n", reused ? "yes" : "no");
  ok = ok && reused && last.name == "late";
  std::printf("every sequence within 1e-12 of its full recomputation: %s\n", ok ? "checks passed" : "CHECKS FAILED");
  return ok ? 0 : 1;
}
