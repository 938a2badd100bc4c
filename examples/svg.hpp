// SPDX-License-Identifier: MIT
// Tiny SVG writers shared by the examples: a labelled heatmap and a line plot. Plain text, no
// dependencies, so the examples stay copyable.
#pragma once

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

namespace svg {

/// Writes `values` (rows x cols, row-major accessor v(i, j) in [0, 1]) as a heatmap with row and
/// column labels; darker = larger.
template <class M>
void heatmap(const std::string& path, const M& values, const std::vector<std::string>& row_labels,
             const std::vector<std::string>& col_labels, const std::string& title) {
  const int cell = 48, left = 90, top = 110;
  const int width = left + cell * int(values.cols()) + 20, height = top + cell * int(values.rows()) + 20;
  std::ofstream out(path);
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
      << "' font-family='sans-serif' font-size='13'>\n<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << left << "' y='22' font-size='15'>" << title << "</text>\n";
  for (int j = 0; j < int(values.cols()); ++j)
    out << "<text transform='translate(" << left + j * cell + cell / 2 << "," << top - 8
        << ") rotate(-60)'>" << col_labels[j] << "</text>\n";
  for (int i = 0; i < int(values.rows()); ++i) {
    out << "<text x='" << left - 8 << "' y='" << top + i * cell + cell / 2 + 5 << "' text-anchor='end'>"
        << row_labels[i] << "</text>\n";
    for (int j = 0; j < int(values.cols()); ++j) {
      const double w = std::clamp(double(values(i, j)), 0.0, 1.0);
      const int shade = int(std::lround(255 * (1 - w)));
      out << "<rect x='" << left + j * cell << "' y='" << top + i * cell << "' width='" << cell << "' height='"
          << cell << "' fill='rgb(" << shade << "," << shade << ",255)' stroke='#ccc'/>"
          << "<text x='" << left + j * cell + cell / 2 << "' y='" << top + i * cell + cell / 2 + 4
          << "' text-anchor='middle' font-size='10' fill='" << (w > 0.5 ? "white" : "black") << "'>"
          << std::lround(100 * w) << "</text>\n";
    }
  }
  out << "</svg>\n";
}

/// One named series of a line plot; `points` draws markers instead of a line.
struct Series {
  std::string name;
  std::vector<double> x, y;
  std::string color;
  bool points = false;
};

/// Writes the series as a line plot with axes spanning all of them.
inline void line_plot(const std::string& path, const std::vector<Series>& series, const std::string& title) {
  const double width = 640, height = 400, margin = 50;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  const auto px = [&](double x) { return margin + (x - x0) / (x1 - x0) * (width - 2 * margin); };
  const auto py = [&](double y) { return height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin); };
  std::ofstream out(path);
  out << "<svg xmlns='http://www.w3.org/2000/svg' width='" << width << "' height='" << height
      << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << margin << "' y='25' font-size='15'>" << title << "</text>\n"
      << "<rect x='" << margin << "' y='" << margin << "' width='" << width - 2 * margin << "' height='"
      << height - 2 * margin << "' fill='none' stroke='black'/>\n"
      << "<text x='" << margin << "' y='" << height - margin + 16 << "'>" << x0 << "</text>"
      << "<text x='" << width - margin << "' y='" << height - margin + 16 << "' text-anchor='end'>" << x1
      << "</text><text x='" << margin - 4 << "' y='" << height - margin << "' text-anchor='end'>" << y0
      << "</text><text x='" << margin - 4 << "' y='" << margin + 10 << "' text-anchor='end'>" << y1 << "</text>\n";
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    if (s.points) {
      for (size_t i = 0; i < s.x.size(); ++i)
        out << "<circle cx='" << px(s.x[i]) << "' cy='" << py(s.y[i]) << "' r='2.5' fill='" << s.color << "'/>";
    } else {
      out << "<polyline fill='none' stroke-width='2' stroke='" << s.color << "' points='";
      for (size_t i = 0; i < s.x.size(); ++i) out << px(s.x[i]) << "," << py(s.y[i]) << " ";
      out << "'/>";
    }
    out << "<text x='" << width - margin - 150 << "' y='" << margin + 18 + 16 * k << "' fill='" << s.color << "'>"
        << s.name << "</text>\n";
  }
  out << "</svg>\n";
}

}  // namespace svg
