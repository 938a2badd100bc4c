// SPDX-License-Identifier: MIT
// A small Transformer trained from scratch in C++ with attend's gradients: it learns to reverse
// sequences of 8 digits. With x a sequence of token ids, one token per row:
//   H0 = E[x] + PE                    token embedding (learned) + sinusoidal positions
//   H1 = H0 + MHA(H0)                 multi-head self attention (attend::MultiHeadAttention)
//   H2 = H1 + W_2 ReLU(W_1 H1 + b_1) + b_2   feed-forward
//   logits = H2 W_h^T + b_h           a linear head over the 10 digits
// and the loss is the mean cross-entropy of the reversed sequence. Reversal needs attention: the
// answer at position i is the token at position L-1-i, found through the positions alone. The
// attention's backward is attend's (multi_head_layer_forward saves the context,
// multi_head_layer_backward returns the gradients of the input and of every projection);
// everything else is written out below, with Adam as the optimizer.
//
// Prints the falling loss and the token and sequence accuracy on held-out sequences; fails
// (exit 1) unless the loss falls below kTargetLoss.
#include <attend/attend.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using attend::Index;
using Mat = attend::Matrix<float>;
using Vec = attend::Vector<float>;

namespace {

constexpr Index kVocab = 10, kLength = 8;                 // digits, sequence length
constexpr Index kWidth = 32, kHeads = 4, kHidden = 64;    // E, H, F
constexpr int kSteps = 800, kBatch = 32;
constexpr float kLearningRate = 3e-3f;
constexpr double kTargetLoss = 0.01;

// One thread per call: a sequence of 8 tokens is far too little work to share (a trainer of
// longer sequences would leave num_threads at 0, the default, or thread over the batch).
attend::AttentionOptions single_thread() {
  attend::AttentionOptions options;
  options.num_threads = 1;
  return options;
}

// Every learnable tensor of the model. The same struct holds gradients and Adam's moments.
struct Model {
  Mat embedding;                             // (V, E)
  attend::MultiHeadWeights<float> attention;  // W_q, W_k, W_v (E, E), W_o (E, E) and biases (E)
  Mat w1, w2, head;                          // (F, E), (E, F), (V, E)
  Vec b1, b2, head_bias;                     // (F), (E), (V)
};

// Calls f on the matching tensors of several attention layers' weights.
template <class F, class... W>
void for_each_attention_tensor(F&& f, W&... w) {
  f(w.q_proj_weight...), f(w.k_proj_weight...), f(w.v_proj_weight...), f(w.out_proj_weight...);
  f(w.q_proj_bias...), f(w.k_proj_bias...), f(w.v_proj_bias...), f(w.out_proj_bias...);
}

// Calls f on the matching tensors of several models.
template <class F, class... M>
void for_each_tensor(F&& f, M&... m) {
  f(m.embedding...);
  for_each_attention_tensor(f, m.attention...);
  f(m.w1...), f(m.w2...), f(m.head...), f(m.b1...), f(m.b2...), f(m.head_bias...);
}

Model zeros_like(const Model& m) {
  Model z = m;
  for_each_tensor([](auto& t) { t.setZero(); }, z);
  return z;
}

Model initial_model(std::mt19937& gen) {
  const auto uniform = [&](Index rows, Index cols, Index fan_in) {  // nn.Linear's initialization
    std::uniform_real_distribution<float> u(-1 / std::sqrt(float(fan_in)), 1 / std::sqrt(float(fan_in)));
    Mat w(rows, cols);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = u(gen);
    return w;
  };
  std::normal_distribution<float> normal(0, 1);
  Mat embedding(kVocab, kWidth);
  for (Index i = 0; i < embedding.size(); ++i) embedding.data()[i] = normal(gen);
  const Vec zero_e = Vec::Zero(kWidth);
  return {embedding,
          {uniform(kWidth, kWidth, kWidth), uniform(kWidth, kWidth, kWidth), uniform(kWidth, kWidth, kWidth),
           uniform(kWidth, kWidth, kWidth), zero_e, zero_e, zero_e, zero_e},
          uniform(kHidden, kWidth, kWidth),
          uniform(kWidth, kHidden, kHidden),
          uniform(kVocab, kWidth, kWidth),
          Vec::Zero(kHidden),
          zero_e,
          Vec::Zero(kVocab)};
}

// y = x W^T + b.
Mat linear(const Mat& x, const Mat& w, const Vec& b) {
  Mat y = x * w.transpose();
  y.rowwise() += b.transpose();
  return y;
}

// Adds the gradients of y = x W^T + b at dy to dW and db; returns dx = dy W.
Mat linear_backward(const Mat& x, const Mat& w, const Mat& dy, Mat& dw, Vec& db) {
  dw += dy.transpose() * x;
  db += dy.colwise().sum().transpose();
  return dy * w;
}

// What the forward keeps for the backward, for one sequence.
struct Activations {
  std::vector<int> tokens;
  Mat h0, h1, hidden, h2, probabilities;            // (L, E), (L, E), (L, F), (L, E), (L, V)
  attend::MultiHeadContext<float> attention;         // saved by multi_head_layer_forward
};

Activations forward(const Model& m, const attend::MultiHeadAttention<float>& attention,
                    const std::vector<int>& tokens) {
  Activations a;
  a.tokens = tokens;
  a.h0.resize(kLength, kWidth);
  for (Index i = 0; i < kLength; ++i) a.h0.row(i) = m.embedding.row(tokens[std::size_t(i)]);
  attend::add_sinusoidal_encoding(a.h0);
  attend::MultiHeadTrainingForward<float> f = attend::multi_head_layer_forward(attention, a.h0, attend::NoMask{}, single_thread());
  a.attention = std::move(f.context);
  a.h1 = a.h0 + f.output;
  a.hidden = linear(a.h1, m.w1, m.b1).cwiseMax(0.0f);
  a.h2 = a.h1 + linear(a.hidden, m.w2, m.b2);
  const Mat logits = linear(a.h2, m.head, m.head_bias);
  a.probabilities = (logits.colwise() - logits.rowwise().maxCoeff()).array().exp();
  a.probabilities.array().colwise() /= a.probabilities.rowwise().sum().array();
  return a;
}

// The target of position i is the token at position L-1-i.
int target(const Activations& a, Index i) { return a.tokens[std::size_t(kLength - 1 - i)]; }

// Adds the gradients of (cross-entropy of this sequence) * weight to g; returns the loss.
double backward(const Model& m, const attend::MultiHeadAttention<float>& attention, const Activations& a,
                float weight, Model& g) {
  double loss = 0;
  Mat d_logits = a.probabilities;  // softmax - one-hot
  for (Index i = 0; i < kLength; ++i) {
    loss -= std::log(double(a.probabilities(i, target(a, i))));
    d_logits(i, target(a, i)) -= 1;
  }
  d_logits *= weight;
  Mat d_h2 = linear_backward(a.h2, m.head, d_logits, g.head, g.head_bias);
  Mat d_hidden = linear_backward(a.hidden, m.w2, d_h2, g.w2, g.b2);
  d_hidden.array() *= (a.hidden.array() > 0).cast<float>();  // ReLU
  const Mat d_h1 = d_h2 + linear_backward(a.h1, m.w1, d_hidden, g.w1, g.b1);
  const attend::MultiHeadLayerGradients<float> d_attention =
      attend::multi_head_layer_backward(attention, a.attention, d_h1, attend::NoMask{}, single_thread());
  const Mat d_h0 = d_h1 + d_attention.d_input();  // the residual, plus self attention's query, key and value
  for_each_attention_tensor([](auto& total, const auto& part) { total += part; }, g.attention, d_attention.weights);
  for (Index i = 0; i < kLength; ++i) g.embedding.row(a.tokens[std::size_t(i)]) += d_h0.row(i);
  return loss / double(kLength);
}

// Adam (Kingma & Ba) with bias correction, on every tensor.
struct Adam {
  Model m1, m2;
  int t = 0;
  explicit Adam(const Model& model) : m1(zeros_like(model)), m2(zeros_like(model)) {}
  void step(Model& model, const Model& g) {
    ++t;
    const float beta1 = 0.9f, beta2 = 0.98f, eps = 1e-9f;
    const float c1 = 1 - std::pow(beta1, float(t)), c2 = 1 - std::pow(beta2, float(t));
    for_each_tensor(
        [&](auto& w, const auto& dw, auto& m, auto& v) {
          m = beta1 * m + (1 - beta1) * dw;
          v = beta2 * v + (1 - beta2) * dw.cwiseProduct(dw);
          w.array() -= kLearningRate * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
        },
        model, g, m1, m2);
  }
};

std::vector<int> random_sequence(std::mt19937& gen) {
  std::uniform_int_distribution<int> digit(0, int(kVocab) - 1);
  std::vector<int> s(std::size_t(kLength), 0);
  for (int& t : s) t = digit(gen);
  return s;
}

}  // namespace

int main() {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 gen(11);
  Model model = initial_model(gen);
  Adam adam(model);
  double loss = 0;
  for (int step = 1; step <= kSteps; ++step) {
    // A new layer object per step, built from the current weights (a copy of a few KiB).
    const attend::MultiHeadAttention<float> attention(kHeads, model.attention);
    Model g = zeros_like(model);
    loss = 0;
    for (int b = 0; b < kBatch; ++b) {
      const Activations a = forward(model, attention, random_sequence(gen));
      loss += backward(model, attention, a, 1.0f / float(kBatch * kLength), g) / kBatch;
    }
    adam.step(model, g);
    if (step % 100 == 0 || step == 1) std::printf("step %3d  loss %.5f\n", step, loss);
  }

  // Held-out sequences: how many tokens, and whole sequences, come out reversed.
  const attend::MultiHeadAttention<float> attention(kHeads, model.attention);
  const int tests = 200;
  int tokens_right = 0, sequences_right = 0;
  double test_loss = 0;
  for (int n = 0; n < tests; ++n) {
    const Activations a = forward(model, attention, random_sequence(gen));
    int right = 0;
    for (Index i = 0; i < kLength; ++i) {
      Index best = 0;
      a.probabilities.row(i).maxCoeff(&best);
      right += best == target(a, i) ? 1 : 0;
      test_loss -= std::log(double(a.probabilities(i, target(a, i)))) / double(kLength * tests);
    }
    tokens_right += right;
    sequences_right += right == kLength ? 1 : 0;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("held-out: loss %.5f, token accuracy %.1f%%, sequence accuracy %.1f%% (%d sequences), %.1f s\n",
              test_loss, 100.0 * tokens_right / (tests * kLength), 100.0 * sequences_right / tests, tests, seconds);
  const bool ok = test_loss < kTargetLoss;
  std::printf("%s: held-out loss %s %.2f\n", ok ? "learned" : "FAILED", ok ? "below" : "not below", kTargetLoss);
  return ok ? 0 : 1;
}
