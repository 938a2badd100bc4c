// SPDX-License-Identifier: MIT
// Nadaraya-Watson kernel regression as attention pooling (the seed article, after d2l.ai §10.2):
// data y = 2 sin(x) + x^0.8 + noise; average pooling, nonparametric Gaussian-kernel pooling,
// and parametric pooling whose kernel width w is learned by gradient descent.
//
// Gaussian-kernel pooling is softmax attention with the score -(w (x_q - x_k))^2 / 2. Expanding
// the square, -w^2/2 x_q^2 is the same for every key of a query and cancels in the softmax, so
// the score equals w^2 (x_q x_k - x_k^2 / 2): a scaled dot product of Q = [x_q, 1] and
// K = [x_k, -x_k^2 / 2] with scale w^2. So attend's scaled dot-product attention computes it,
// and attend's backward gives the gradient that trains w: with the queries w^2 Q (scale 1),
// the backward returns dL/d(w^2 Q), and the chain rule gives dL/dw = 2 w <dL/d(w^2 Q), Q>.
//
// Prints the falling training loss and the test error of each pooling; writes
// nadaraya_watson.svg.
#include <attend/attend.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <string>
#include <random>
#include <vector>

using attend::Index;
using Mat = attend::Matrix<double>;

namespace {

double truth(double x) { return 2 * std::sin(x) + std::pow(x, 0.8); }

// One curve of the plot (markers when `points`).
struct Series {
  std::string name;
  std::vector<double> x, y;
  std::string color;
  bool points = false;
};

// Writes the series as an SVG line plot whose axes span all of them.
void write_plot(const std::string& path, const std::vector<Series>& series) {
  const double size = 400, margin = 40;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const Series& s : series) {
    x0 = std::min(x0, *std::min_element(s.x.begin(), s.x.end()));
    x1 = std::max(x1, *std::max_element(s.x.begin(), s.x.end()));
    y0 = std::min(y0, *std::min_element(s.y.begin(), s.y.end()));
    y1 = std::max(y1, *std::max_element(s.y.begin(), s.y.end()));
  }
  const auto px = [&](double x) { return margin + (x - x0) / (x1 - x0) * (1.5 * size - 2 * margin); };
  const auto py = [&](double y) { return size - margin - (y - y0) / (y1 - y0) * (size - 2 * margin); };
  std::ofstream out(path);
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << 1.5 * size << "' height='" << size
      << "' font-family='sans-serif' font-size='12'><rect width='100%' height='100%' fill='white'/>\n";
  for (std::size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    if (!s.points) out << "<polyline fill='none' stroke-width='2' stroke='" << s.color << "' points='";
    for (std::size_t i = 0; i < s.x.size(); ++i)
      if (s.points)
        out << "<circle cx='" << px(s.x[i]) << "' cy='" << py(s.y[i]) << "' r='2.5' fill='" << s.color << "'/>";
      else
        out << px(s.x[i]) << "," << py(s.y[i]) << " ";
    if (!s.points) out << "'/>";
    out << "<text x='" << margin + 10 << "' y='" << margin + 16 * double(k) << "' fill='" << s.color << "'>" << s.name
        << "</text>\n";
  }
  out << "</svg>\n";
}

Mat as_queries(const std::vector<double>& x) {  // (n, 2) rows [x, 1]
  Mat q(Index(x.size()), 2);
  for (Index i = 0; i < q.rows(); ++i) q.row(i) << x[i], 1.0;
  return q;
}

Mat as_keys(const std::vector<double>& x) {  // (n, 2) rows [x, -x^2 / 2]
  Mat k(Index(x.size()), 2);
  for (Index i = 0; i < k.rows(); ++i) k.row(i) << x[i], -x[i] * x[i] / 2;
  return k;
}

double mse(const Mat& prediction, const std::vector<double>& target) {
  double sum = 0;
  for (Index i = 0; i < prediction.rows(); ++i) sum += std::pow(prediction(i, 0) - target[i], 2);
  return sum / double(target.size());
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> uniform(0.0, 5.0);
  std::normal_distribution<double> noise(0.0, 0.5);

  const int n_train = 50;
  std::vector<double> x_train(n_train), y_train(n_train), x_test, y_test;
  for (double& x : x_train) x = uniform(rng);
  std::sort(x_train.begin(), x_train.end());
  for (int i = 0; i < n_train; ++i) y_train[i] = truth(x_train[i]) + noise(rng);
  for (double x = 0; x < 5; x += 0.1) x_test.push_back(x), y_test.push_back(truth(x));

  const Mat keys = as_keys(x_train);                                              // (n, 2)
  const Mat values = Eigen::Map<const Eigen::VectorXd>(y_train.data(), n_train);  // (n, 1)
  const Mat test_queries = as_queries(x_test);                                    // (m, 2)

  // 1. Average pooling: every query gets the mean of the training targets.
  const Mat average = Mat::Constant(Index(x_test.size()), 1, values.mean());

  // 2. Nonparametric pooling: Gaussian kernel of width 1 (w = 1).
  attend::AttentionOptions width_one;
  width_one.scale = 1.0;
  const Mat nonparametric =
      attend::scaled_dot_product_attention(test_queries, keys, values, attend::NoMask{}, width_one);

  // 3. Parametric pooling: learn w by gradient descent on the training loss, each training
  //    point attending to the others (the diagonal is masked so it cannot copy its own target).
  const attend::BoolMatrix others = (1 - Eigen::MatrixXi::Identity(n_train, n_train).array()).cast<bool>();
  const Mat train_queries = as_queries(x_train);
  attend::AttentionOptions unit_scale;
  unit_scale.scale = 1.0;  // the width is in the queries: w^2 Q
  const attend::BooleanMask mask(others);
  double w = 0.5;
  const double learning_rate = 0.1;
  std::vector<double> losses;
  for (int epoch = 0; epoch < 30; ++epoch) {
    const Mat scaled_queries = w * w * train_queries;  // (n, 2)
    const auto fit = attend::scaled_dot_product_attention_with_lse(scaled_queries, keys, values, mask, unit_scale);
    const Mat d_out = 2 * (fit.output - values) / double(n_train);  // d MSE / d out: targets are the values
    const auto grad =
        attend::scaled_dot_product_attention_backward(scaled_queries, keys, values, fit, d_out, mask, unit_scale);
    const double gradient = 2 * w * (grad.dq.array() * train_queries.array()).sum();  // chain rule through w^2 Q
    losses.push_back(mse(fit.output, y_train));
    if (epoch % 5 == 0 || epoch == 29)
      std::cout << "epoch " << epoch << "  w " << w << "  training loss " << losses.back() << "\n";
    w -= learning_rate * gradient;
  }
  attend::AttentionOptions learned;
  learned.scale = w * w;
  const Mat parametric = attend::scaled_dot_product_attention(test_queries, keys, values, attend::NoMask{}, learned);

  const double e_average = mse(average, y_test), e_nonparametric = mse(nonparametric, y_test),
               e_parametric = mse(parametric, y_test);
  std::cout << "test MSE against the noiseless curve: average " << e_average << ", nonparametric (w = 1) "
            << e_nonparametric << ", parametric (w = " << w << ") " << e_parametric << "\n";

  auto column = [](const Mat& m) { return std::vector<double>(m.data(), m.data() + m.rows()); };
  write_plot("nadaraya_watson.svg", {{"training data", x_train, y_train, "#999", true},
                                     {"truth", x_test, y_test, "black"},
                                     {"average pooling", x_test, column(average), "#d62728"},
                                     {"nonparametric", x_test, column(nonparametric), "#1f77b4"},
                                     {"parametric", x_test, column(parametric), "#2ca02c"}});
  std::cout << "wrote nadaraya_watson.svg\n";

  // Checks a reader can rely on: training lowered the loss, and both kernels beat the average.
  const bool ok = losses.back() < losses.front() && e_nonparametric < e_average && e_parametric < e_average;
  return ok ? 0 : 1;
}
