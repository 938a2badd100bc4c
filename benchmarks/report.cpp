// SPDX-License-Identifier: MIT
// The benchmark comparison report that `make bench` runs: every attention variant and execution
// path at a few sequence lengths, fp32, on all available threads, printed as one table
// (variant, path, L, d, ms, GFLOP/s, % of the FMA peak, scratch memory) headed by the SIMD
// level, the thread count and the FMA peak measured once at the start, with the FLOP and
// scratch definitions under it. A progress line per case goes to stderr.
//
//   attend_report [--variants=NAME[/PATH],...] [--sizes=L,...] [--min-time=SECONDS]
//                 [--threads=N] [--json=FILE] [--dat=FILE] [--list] [--benchmark_...]
//
// --variants keeps the variants whose name starts with one of the given names (or exactly the
// variant/path given), --sizes sets the lengths L (default 256,1024,4096), --json writes Google
// Benchmark's JSON (its own --benchmark_out), --dat writes time against L, one gnuplot data
// block per variant and path, --list prints the variants. Other --benchmark_* flags go to
// Google Benchmark.
#include "support/counters.hpp"

#include <attend/attend.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using attend::Algorithm;
using attend::Index;
using T = float;
using Matrix = attend::Matrix<T>;

constexpr Index kDim = 64;                                // d of every one-head variant
constexpr Index kWindow = 256, kTopK = 16, kHidden = 64;  // local window, top-k, additive h
constexpr Index kWidth = 512, kHeads = 8;                 // multi-head and batched
constexpr Index kDecodeHeads = 32, kDecodeKvHeads = 8, kDecodeDim = 128;

// ---------------------------------------------------------------------------------------------
// FLOP and scratch definitions. Every case counts 4 d FLOPs per visible (query, key) pair of a
// head: the two GEMMs Q K^T and P V at 2 FLOPs per multiply-add. The texts are printed under
// the table, grouped by the variants that use them.

const char* const kFlopsDense = "4 Lq Lk d per head (Q K^T and P V, 2 per multiply-add); score transforms not counted";
const char* const kFlopsCausal = "4 d per visible (query, key) pair: 4 d L (L + 1) / 2, about half of dense";
const char* const kFlopsWindow = "4 d per visible pair: 4 d sum_i min(i + 1, w), about 4 L w d";
const char* const kFlopsTopK =
    "counted as dense attention of the same shape, 4 L^2 d (the selection pass scores every key)";
const char* const kFlopsAdditive =
    "(3h + 2d) per (query, key) pair (add, tanh as 1, multiply-add by v; P V); "
    "the (L, h) projections not counted";
const char* const kFlopsMultiHead = "4 projections 4 (2 L E^2) + H (4 L^2 d), E = 512, H = 8, d = 64";
const char* const kFlopsDecode = "H (4 Lk d) for one query per head; the note gives GB/s of K and V read once";

const char* const kScratchBlocked = "per thread detail::BlockedScratch<T>::bytes(tiles, Dk, Dv), x threads";
const char* const kScratchMaterialized =
    "the (Lq, Lk) score matrix, Lq Lk sizeof(T) per head in flight (Eigen's GEMM packing blocks not counted)";
const char* const kScratchCopies = "blocked scratch + the transformed inputs it makes (bilinear Q W; cosine unit Q, K)";
const char* const kScratchBias = "blocked scratch + the bias looked up once per relative position, Lq + Lk - 1 values";
const char* const kScratchTopK =
    "kept keys (Lq, k) indices + max(per-thread selection scratch, blocked scratch) x threads";
const char* const kScratchAdditive = "projections (Lq + Lk, h) + the path's scratch over h-wide scores";
const char* const kScratchMultiHead =
    "projected Q, K, V and concatenated heads 4 (L, E) + per head in flight: blocked or (L, L) scores";
const char* const kScratchBatched = "blocked scratch x threads (heads are views of the inputs)";
const char* const kScratchDecode = "per thread (H, block_k) scores + partials (splits H, d + 1) + the scaled query";

double dense_pairs(Index length) { return double(length) * double(length); }
double causal_pairs(Index length) { return double(length) * double(length + 1) / 2; }
double window_pairs(Index length) {  // sum over queries i of min(i + 1, w)
  const Index full = std::max<Index>(0, length - kWindow), ramp = length - full;
  return double(ramp) * double(ramp + 1) / 2 + double(full) * double(kWindow);
}

Index blocked_bytes(Index key_dim, Index value_dim) {
  return attend::detail::BlockedScratch<T>::bytes(attend::detail::kDefaultTiles, key_dim, value_dim);
}

/// Scratch of one head's call through `path`: the tiles of every thread, or one score matrix.
double one_head_scratch(Algorithm path, Index length, int threads, Index key_dim = kDim) {
  return path == Algorithm::Blocked ? double(threads) * double(blocked_bytes(key_dim, kDim))
                                    : double(sizeof(T)) * dense_pairs(length);
}

// ---------------------------------------------------------------------------------------------
// The variants.

/// One variant on one path: its timing loop at length L and what the table says about it.
struct Variant {
  std::string name, path;
  Index dim = 0;
  const char* flops_rule = "";
  const char* scratch_rule = "";
  std::function<void(benchmark::State&, Index)> run;  // the timing loop at L
  std::function<double(Index)> flops;                 // FLOPs of one call at L
  std::function<double(Index, int)> scratch;          // bytes beyond inputs and outputs at (L, threads)
  std::function<double(Index)> bytes_read = {};       // bytes read once per call, for GB/s
  std::function<std::string(Index)> note = {};

  std::string label() const { return name + "/" + path; }
};

/// A variant with its names and rules; the caller sets its functions.
Variant describe(std::string name, std::string path, Index dim, const char* flops_rule, const char* scratch_rule) {
  Variant v;
  v.name = std::move(name);
  v.path = std::move(path);
  v.dim = dim;
  v.flops_rule = flops_rule;
  v.scratch_rule = scratch_rule;
  return v;
}

const char* path_name(Algorithm path) { return path == Algorithm::Blocked ? "blocked" : "materialized"; }

attend::AttentionOptions on_path(Algorithm path) {
  attend::AttentionOptions options;
  options.algorithm = path;
  return options;
}

/// Times `call` (which writes `out`) in the benchmark loop.
template <class Call>
void time_loop(benchmark::State& state, Matrix& out, Call&& call) {
  for (auto _ : state) {
    call();
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
}

/// Random one-head inputs (L, d) and the output.
struct OneHead {
  explicit OneHead(Index length)
      : q(Matrix::Random(length, kDim) / 4),
        k(Matrix::Random(length, kDim)),
        v(Matrix::Random(length, kDim)),
        out(length, kDim) {}
  Matrix q, k, v, out;
};

/// A one-head variant at d = 64: `call(x, options)` computes x.out from x.q, x.k, x.v.
template <class Call>
Variant one_head(std::string name, Algorithm path, const char* flops_rule, double (*pairs)(Index),
                 const char* scratch_rule, Call call) {
  Variant v = describe(std::move(name), path_name(path), kDim, flops_rule, scratch_rule);
  v.run = [path, call](benchmark::State& state, Index length) {
    OneHead x(length);
    const attend::AttentionOptions options = on_path(path);
    time_loop(state, x.out, [&] { call(x, options); });
  };
  v.flops = [pairs](Index length) { return 4.0 * double(kDim) * pairs(length); };
  v.scratch = [path](Index length, int threads) { return one_head_scratch(path, length, threads); };
  return v;
}

/// Scaled dot-product attention on the blocked path with Q, K, V and the output stored as S
/// (bf16, half): one row and plot series per precision, next to the fp32 "scaled-dot" and
/// "causal" rows of the same shapes.
template <class S>
Variant reduced_precision(const std::string& precision, bool causal) {
  Variant v = describe((causal ? "causal-" : "scaled-dot-") + precision, "blocked", kDim,
                       causal ? kFlopsCausal : kFlopsDense, kScratchBlocked);
  v.run = [causal](benchmark::State& state, Index length) {
    const OneHead x(length);
    const attend::Matrix<S> q = x.q.cast<S>(), k = x.k.cast<S>(), value = x.v.cast<S>();
    attend::Matrix<S> out(length, kDim);
    const attend::AttentionOptions options = on_path(Algorithm::Blocked);
    for (auto _ : state) {
      if (causal)
        attend::scaled_dot_product_attention_into(q, k, value, out, attend::Causal{}, options);
      else
        attend::scaled_dot_product_attention_into(q, k, value, out, attend::NoMask{}, options);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
  };
  v.flops = [causal](Index length) { return 4.0 * double(kDim) * (causal ? causal_pairs : dense_pairs)(length); };
  v.scratch = [](Index length, int threads) { return one_head_scratch(Algorithm::Blocked, length, threads); };
  v.note = [precision](Index) { return "Q, K, V, out in " + precision + "; float accumulation"; };
  return v;
}

Variant additive(Algorithm path) {
  Variant v = describe("additive-h64", path_name(path), kDim, kFlopsAdditive, kScratchAdditive);
  v.run = [path](benchmark::State& state, Index length) {
    const attend::AdditiveAttention<T> layer(Matrix::Random(kHidden, kDim) / 8, Matrix::Random(kHidden, kDim) / 8,
                                             attend::Vector<T>::Random(kHidden), attend::Vector<T>::Random(kHidden));
    OneHead x(length);
    const attend::AttentionOptions options = on_path(path);
    time_loop(state, x.out, [&] { layer.forward_into(x.q, x.k, x.v, x.out, attend::NoMask{}, options); });
  };
  v.flops = [](Index length) { return dense_pairs(length) * double(3 * kHidden + 2 * kDim); };
  v.scratch = [path](Index length, int threads) {
    return double(sizeof(T)) * double(2 * length * kHidden) + one_head_scratch(path, length, threads, kHidden);
  };
  return v;
}

Variant multi_head() {
  Variant v = describe("multi-head-E512", "auto", kWidth / kHeads, kFlopsMultiHead, kScratchMultiHead);
  v.run = [](benchmark::State& state, Index length) {
    const T s = T(1) / T(22.6);  // about 1/sqrt(E): unit-variance projections
    const attend::MultiHeadAttention<T> mha(
        kHeads,
        {Matrix::Random(kWidth, kWidth) * s, Matrix::Random(kWidth, kWidth) * s, Matrix::Random(kWidth, kWidth) * s,
         Matrix::Random(kWidth, kWidth) * s, attend::Vector<T>::Random(kWidth), attend::Vector<T>::Random(kWidth),
         attend::Vector<T>::Random(kWidth), attend::Vector<T>::Random(kWidth)});
    const Matrix x = Matrix::Random(length, kWidth);
    for (auto _ : state) {
      attend::MultiHeadResult<T> r = mha.forward(x);
      benchmark::DoNotOptimize(r.output.data());
      benchmark::ClobberMemory();
    }
  };
  const auto blocked = [](Index length) { return attend::detail::use_blocked({}, length, length); };
  v.flops = [](Index length) {
    return 4 * 2.0 * double(length) * kWidth * kWidth +
           double(kHeads) * 4.0 * double(kWidth / kHeads) * dense_pairs(length);
  };
  v.scratch = [blocked](Index length, int threads) {
    const double heads = double(std::min<Index>(threads, kHeads));
    return 4.0 * sizeof(T) * double(length) * kWidth +
           heads * (blocked(length) ? double(blocked_bytes(kWidth / kHeads, kWidth / kHeads))
                                    : double(sizeof(T)) * dense_pairs(length));
  };
  v.note = [blocked](Index length) {
    return std::string("H=8, heads ") + (blocked(length) ? "blocked" : "materialized");
  };
  return v;
}

Variant batched() {
  Variant v = describe("batched-H8", "blocked", kDim, kFlopsDense, kScratchBatched);
  v.run = [](benchmark::State& state, Index length) {
    const Matrix q = Matrix::Random(length, kHeads * kDim) / 4, k = Matrix::Random(length, kHeads * kDim),
                 value = Matrix::Random(length, kHeads * kDim);
    Matrix out(length, kHeads * kDim);
    const attend::AttentionOptions options = on_path(Algorithm::Blocked);
    time_loop(state, out, [&] {
      attend::batched_attention_into(q, k, value, out, {kHeads, 1}, attend::NoMask{}, options);
    });
  };
  v.flops = [](Index length) { return double(kHeads) * 4.0 * double(kDim) * dense_pairs(length); };
  v.scratch = [](Index, int threads) { return one_head_scratch(Algorithm::Blocked, 0, threads); };
  v.note = [](Index) { return std::string("8 heads of (L, 64)"); };
  return v;
}

Variant decode() {
  Variant v = describe("decode-gqa", "split-kv", kDecodeDim, kFlopsDecode, kScratchDecode);
  v.run = [](benchmark::State& state, Index length) {
    const Matrix k = Matrix::Random(length, kDecodeKvHeads * kDecodeDim);
    const Matrix value = Matrix::Random(length, kDecodeKvHeads * kDecodeDim);
    const Matrix q = Matrix::Random(1, kDecodeHeads * kDecodeDim);
    Matrix out(1, kDecodeHeads * kDecodeDim);
    time_loop(state, out, [&] { attend::decode_attention_into(q, k, value, kDecodeHeads, out); });
  };
  v.flops = [](Index length) { return double(kDecodeHeads) * 4.0 * double(kDecodeDim) * double(length); };
  v.scratch = [](Index length, int threads) {
    const Index split = attend::detail::kDecodeSplitKeys, splits = (length + split - 1) / split;
    return double(sizeof(T)) * double(threads * kDecodeHeads * split + splits * kDecodeHeads * (kDecodeDim + 1) +
                                      kDecodeHeads * kDecodeDim);
  };
  v.bytes_read = [](Index length) { return 2.0 * sizeof(T) * double(length) * kDecodeKvHeads * kDecodeDim; };
  v.note = [](Index) { return std::string("Lq=1, 32 q / 8 kv heads"); };
  return v;
}

std::vector<Variant> all_variants() {
  using attend::Causal;
  using attend::NoMask;
  using Options = attend::AttentionOptions;
  std::vector<Variant> variants;
  for (Algorithm path : {Algorithm::Materialized, Algorithm::Blocked})
    variants.push_back(one_head("scaled-dot", path, kFlopsDense, dense_pairs,
                                path == Algorithm::Blocked ? kScratchBlocked : kScratchMaterialized,
                                [](OneHead& x, const Options& o) {
                                  attend::scaled_dot_product_attention_into(x.q, x.k, x.v, x.out, NoMask{}, o);
                                }));
  for (Algorithm path : {Algorithm::Materialized, Algorithm::Blocked})
    variants.push_back(one_head("causal", path, kFlopsCausal, causal_pairs,
                                path == Algorithm::Blocked ? kScratchBlocked : kScratchMaterialized,
                                [](OneHead& x, const Options& o) {
                                  attend::scaled_dot_product_attention_into(x.q, x.k, x.v, x.out, Causal{}, o);
                                }));
  for (bool causal : {false, true}) {
    variants.push_back(reduced_precision<Eigen::bfloat16>("bf16", causal));
    variants.push_back(reduced_precision<Eigen::half>("f16", causal));
  }
  const Algorithm blocked = Algorithm::Blocked;
  variants.push_back(one_head(
      "dot", blocked, kFlopsDense, dense_pairs, kScratchBlocked,
      [](OneHead& x, const Options& o) { attend::dot_product_attention_into(x.q, x.k, x.v, x.out, NoMask{}, o); }));
  const auto w = std::make_shared<const Matrix>(Matrix::Random(kDim, kDim) / 8);
  variants.push_back(one_head(
      "bilinear", blocked, kFlopsDense, dense_pairs, kScratchCopies,
      [w](OneHead& x, const Options& o) { attend::bilinear_attention_into(x.q, x.k, x.v, *w, x.out, NoMask{}, o); }));
  variants.back().scratch = [](Index length, int threads) {
    return double(sizeof(T)) * double(length * kDim) + one_head_scratch(Algorithm::Blocked, length, threads);
  };
  variants.push_back(one_head(
      "cosine", blocked, kFlopsDense, dense_pairs, kScratchCopies,
      [](OneHead& x, const Options& o) { attend::cosine_attention_into(x.q, x.k, x.v, 0.1, x.out, NoMask{}, o); }));
  variants.back().scratch = [](Index length, int threads) {
    return double(sizeof(T)) * double(2 * length * kDim) + one_head_scratch(Algorithm::Blocked, length, threads);
  };
  variants.push_back(
      one_head("soft-cap", blocked, kFlopsDense, dense_pairs, kScratchBlocked, [](OneHead& x, const Options& o) {
        attend::soft_capped_attention_into(x.q, x.k, x.v, 30.0, x.out, NoMask{}, o);
      }));
  variants.push_back(
      one_head("alibi-causal", blocked, kFlopsCausal, causal_pairs, kScratchBlocked, [](OneHead& x, const Options& o) {
        attend::scaled_dot_product_attention_into(x.q, x.k, x.v, x.out, Causal{} & attend::Alibi(0.0625), o);
      }));
  const auto table = std::make_shared<const attend::Vector<T>>(attend::Vector<T>::Random(32));
  variants.push_back(one_head("t5-bias-causal", blocked, kFlopsCausal, causal_pairs, kScratchBias,
                              [table](OneHead& x, const Options& o) {
                                attend::scaled_dot_product_attention_into(
                                    x.q, x.k, x.v, x.out, Causal{} & attend::RelativePositionBias(*table, false), o);
                              }));
  variants.back().scratch = [](Index length, int threads) {
    return double(sizeof(T)) * double(2 * length - 1) + one_head_scratch(Algorithm::Blocked, length, threads);
  };
  variants.push_back(
      one_head("window-256", blocked, kFlopsWindow, window_pairs, kScratchBlocked, [](OneHead& x, const Options& o) {
        attend::local_window_attention_into(x.q, x.k, x.v, attend::sliding_window(kWindow), x.out, NoMask{}, o);
      }));
  variants.back().note = [](Index) { return std::string("causal sliding window"); };
  variants.push_back(one_head(
      "top-k-16", blocked, kFlopsTopK, dense_pairs, kScratchTopK,
      [](OneHead& x, const Options& o) { attend::top_k_attention_into(x.q, x.k, x.v, kTopK, x.out, NoMask{}, o); }));
  variants.back().scratch = [](Index length, int threads) {
    const auto tiles = attend::detail::kDefaultTiles;
    const Index keep = std::min(kTopK, length);
    const double selection =
        double(sizeof(T)) * double(tiles.queries * tiles.keys) +
        double(sizeof(attend::detail::ScoredKey<T>)) * double(tiles.queries * keep + keep + tiles.keys) +
        double(sizeof(Index)) * double(tiles.queries);
    return double(sizeof(Index)) * double(length * (keep + 1)) +
           double(threads) * std::max(selection, double(blocked_bytes(kDim, kDim)));
  };
  for (Algorithm path : {Algorithm::Materialized, Algorithm::Blocked}) variants.push_back(additive(path));
  variants.push_back(multi_head());
  variants.push_back(batched());
  variants.push_back(decode());
  return variants;
}

// ---------------------------------------------------------------------------------------------
// Command line.

struct Settings {
  std::vector<std::string> variants;  // empty: all
  std::vector<Index> sizes{256, 1024, 4096};
  double min_time = 0.15;
  int threads = 0;  // 0: all available
  std::string json, dat;
  bool list = false;
};

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::string::size_type begin = 0;
  while (begin <= text.size()) {
    const auto end = std::min(text.find(',', begin), text.size());
    if (end > begin) parts.push_back(text.substr(begin, end - begin));
    begin = end + 1;
  }
  return parts;
}

const char* const kUsage =
    "usage: attend_report [--variants=NAME[/PATH],...] [--sizes=L,...] [--min-time=SECONDS] [--threads=N]\n"
    "                     [--json=FILE] [--dat=FILE] [--list] [--benchmark_...]\n"
    "  --variants   variants whose name starts with one of NAMEs, or exactly NAME/PATH (default: all; --list)\n"
    "  --sizes      sequence lengths L (default 256,1024,4096; keys for decode)\n"
    "  --min-time   seconds each case runs at least (default 0.15)\n"
    "  --threads    OpenMP threads (default: all available)\n"
    "  --json       Google Benchmark's JSON of every case to FILE\n"
    "  --dat        time (ms) against L to FILE, one gnuplot block per variant/path\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "attend_report: " << message << "\n" << kUsage;
  std::exit(2);
}

/// Takes attend_report's own options out of argv; the rest stays for Google Benchmark.
Settings parse_settings(int& argc, char** argv) {
  Settings s;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const std::string& flag) { return arg.substr(flag.size()); };
    const auto number = [&](const std::string& text) {
      char* end = nullptr;
      const double x = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || !(x > 0)) usage_error("'" + arg + "' needs a positive number");
      return x;
    };
    if (arg.rfind("--variants=", 0) == 0) {
      s.variants = split_commas(value("--variants="));
    } else if (arg.rfind("--sizes=", 0) == 0) {
      s.sizes.clear();
      for (const std::string& size : split_commas(value("--sizes="))) {
        const double length = number(size);
        if (length != double(Index(length))) usage_error("'" + arg + "' needs whole lengths");
        s.sizes.push_back(Index(length));
      }
      if (s.sizes.empty()) usage_error("--sizes needs at least one length");
    } else if (arg.rfind("--min-time=", 0) == 0) {
      s.min_time = number(value("--min-time="));
    } else if (arg.rfind("--threads=", 0) == 0) {
      s.threads = int(number(value("--threads=")));
    } else if (arg.rfind("--json=", 0) == 0) {
      s.json = value("--json=");
    } else if (arg.rfind("--dat=", 0) == 0) {
      s.dat = value("--dat=");
    } else if (arg == "--list") {
      s.list = true;
    } else if (arg == "--help" || arg == "-h") {
      std::cout << "attend_report: the comparison report of attend's attention variants\n" << kUsage;
      std::exit(0);
    } else if (arg.rfind("--benchmark_", 0) == 0 || arg.rfind("--v=", 0) == 0) {
      argv[kept++] = argv[i];
    } else {
      usage_error("unknown option '" + arg + "'");
    }
  }
  argc = kept;
  return s;
}

/// Whether the command line selected `v`: by a name prefix, or exactly by variant/path.
bool selected(const Variant& v, const std::vector<std::string>& wanted) {
  if (wanted.empty()) return true;
  return std::any_of(wanted.begin(), wanted.end(), [&](const std::string& w) {
    return w.find('/') != std::string::npos ? w == v.label() : v.name.rfind(w, 0) == 0;
  });
}

// ---------------------------------------------------------------------------------------------
// Output.

std::string format(const char* spec, double x) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, spec, x);
  return buffer;
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (bytes >= 1024 && u < 3) bytes /= 1024, ++u;
  return format(u == 0 ? "%.0f " : "%.1f ", bytes) + units[u];
}

std::string pad(std::string text, std::size_t width, bool right) {
  if (text.size() >= width) return text;
  const std::string fill(width - text.size(), ' ');
  return right ? fill + text : text + fill;
}

/// One finished case, as the table shows it.
struct Row {
  const Variant* variant;
  Index length;
  bool failed;
  std::string error;
  double ms, gflops, pct_peak, scratch, gbps;
};

/// Prints a progress line per case to stderr as it finishes, then the table (and the gnuplot
/// data) at the end. Google Benchmark's own JSON reporter runs beside it.
class TableReporter : public benchmark::BenchmarkReporter {
 public:
  TableReporter(std::map<std::string, std::pair<const Variant*, Index>> cases, std::string header, std::string dat_file)
      : cases_(std::move(cases)),
        header_(std::move(header)),
        dat_file_(std::move(dat_file)),
        start_(std::chrono::steady_clock::now()) {}

  bool ReportContext(const Context&) override { return true; }

  void ReportRuns(const std::vector<Run>& runs) override {
    // With --benchmark_repetitions the median stands for the case; otherwise its one run.
    const Run* run = &runs.front();
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Aggregate && r.aggregate_name == "median") run = &r;
    const auto found = cases_.find(run->run_name.function_name);
    if (found == cases_.end()) return;
    const auto counter = [&](const char* name) {
      const auto c = run->counters.find(name);
      return c == run->counters.end() ? 0.0 : c->second.value;
    };
    Row row{found->second.first,
            found->second.second,
            run->error_occurred,
            run->error_message,
            run->GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(run->time_unit) * 1e3,
            counter("GFLOPS"),
            counter("pct_peak"),
            counter("scratch_bytes"),
            counter("GBps")};
    rows_.push_back(row);
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    std::string line = "[" + pad(std::to_string(rows_.size()), std::to_string(cases_.size()).size(), true) + "/" +
                       std::to_string(cases_.size()) + "] " + pad(format("%.1f s", elapsed), 7, true) + "  " +
                       row.variant->label() + " L=" + std::to_string(row.length) + ": ";
    line += row.failed ? "error: " + row.error : format("%.4g ms", row.ms) + ", " + format("%.1f GFLOP/s", row.gflops);
    GetErrorStream() << line << std::endl;
  }

  void Finalize() override {
    print_table(GetOutputStream());
    if (!dat_file_.empty()) write_dat();
  }

 private:
  static std::string ms_text(double ms) { return format("%.4g", ms); }

  void print_table(std::ostream& out) const {
    const std::vector<std::string> head{"variant", "path", "L", "d", "ms", "GFLOP/s", "% peak", "scratch", "note"};
    const std::vector<bool> right{false, false, true, true, true, true, true, true, false};
    std::vector<std::vector<std::string>> cells;
    for (const Row& r : rows_) {
      std::string note = r.variant->note ? r.variant->note(r.length) : "";
      if (r.gbps > 0) note += (note.empty() ? "" : ", ") + format("%.1f GB/s of K, V", r.gbps);
      if (r.failed) {
        cells.push_back({r.variant->name, r.variant->path, std::to_string(r.length), std::to_string(r.variant->dim),
                         "-", "-", "-", "-", "error: " + r.error});
      } else {
        cells.push_back({r.variant->name, r.variant->path, std::to_string(r.length), std::to_string(r.variant->dim),
                         ms_text(r.ms), format("%.1f", r.gflops), format("%.1f", r.pct_peak), human_bytes(r.scratch),
                         note});
      }
    }
    std::vector<std::size_t> width(head.size());
    for (std::size_t c = 0; c < head.size(); ++c) {
      width[c] = head[c].size();
      for (const auto& row : cells) width[c] = std::max(width[c], row[c].size());
    }
    const auto print_row = [&](const std::vector<std::string>& row) {
      std::string line;
      for (std::size_t c = 0; c < row.size(); ++c)
        line += (c == 0 ? "" : " | ") + (c + 1 == row.size() ? row[c] : pad(row[c], width[c], right[c]));
      out << line.substr(0, line.find_last_not_of(' ') + 1) << "\n";
    };
    out << header_ << "\n\n";
    print_row(head);
    std::string rule;
    for (std::size_t c = 0; c < head.size(); ++c)
      rule += (c == 0 ? "" : "-+-") + std::string(c + 1 == head.size() ? 4 : width[c], '-');
    out << rule << "\n";
    for (const auto& row : cells) print_row(row);
    print_definitions(out, "FLOPs (GFLOP/s = FLOPs / time; % peak = GFLOP/s / FMA peak):", [](const Variant& v) {
      return v.flops_rule;
    });
    print_definitions(out, "Scratch (memory the kernel holds beyond inputs and outputs):", [](const Variant& v) {
      return v.scratch_rule;
    });
    out.flush();
  }

  /// The definitions of the variants in the table, each once with the variants that use it.
  template <class Rule>
  void print_definitions(std::ostream& out, const char* title, Rule rule) const {
    std::vector<std::pair<std::string, std::vector<std::string>>> groups;
    for (const Row& r : rows_) {
      const std::string text = rule(*r.variant);
      auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& group) { return group.first == text; });
      if (g == groups.end()) g = groups.insert(groups.end(), {text, {}});
      const std::string label = r.variant->label();
      if (std::find(g->second.begin(), g->second.end(), label) == g->second.end()) g->second.push_back(label);
    }
    out << "\n" << title << "\n";
    for (const auto& [text, labels] : groups) {
      std::string names;
      for (const std::string& label : labels) names += (names.empty() ? "" : ", ") + label;
      out << "  " << names << ":\n      " << text << "\n";
    }
  }

  /// Time (ms) against L, one block per variant/path (gnuplot `index`), titled by a comment.
  void write_dat() const {
    std::ofstream file(dat_file_);
    if (!file) {
      std::cerr << "attend_report: cannot write " << dat_file_ << "\n";
      return;
    }
    file << "# attend benchmark report: time (ms) against L; one block per variant/path\n";
    std::vector<std::string> order;
    for (const Row& r : rows_)
      if (std::find(order.begin(), order.end(), r.variant->label()) == order.end()) order.push_back(r.variant->label());
    for (std::size_t b = 0; b < order.size(); ++b) {
      file << (b == 0 ? "" : "\n\n") << "# series " << order[b] << "\n# L ms\n";
      for (const Row& r : rows_)
        if (r.variant->label() == order[b] && !r.failed) file << r.length << " " << ms_text(r.ms) << "\n";
    }
  }

  std::map<std::string, std::pair<const Variant*, Index>> cases_;
  std::string header_;
  std::string dat_file_;
  std::chrono::steady_clock::time_point start_;
  std::vector<Row> rows_;
};

int available_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  Settings settings = parse_settings(argc, argv);
  const std::vector<Variant> variants = all_variants();
  if (settings.list) {
    for (const Variant& v : variants) std::cout << v.label() << "\n";
    return 0;
  }
  std::vector<const Variant*> chosen;
  for (const Variant& v : variants)
    if (selected(v, settings.variants)) chosen.push_back(&v);
  if (chosen.empty()) usage_error("no variant matches --variants; --list shows them");

  // Inject the JSON output as Google Benchmark's own flags.
  std::vector<char*> args(argv, argv + argc);
  std::string out_flag = "--benchmark_out=" + settings.json, format_flag = "--benchmark_out_format=json";
  if (!settings.json.empty()) {
    args.push_back(out_flag.data());
    args.push_back(format_flag.data());
  }
  int args_count = int(args.size());
  args.push_back(nullptr);
  benchmark::Initialize(&args_count, args.data());
  if (benchmark::ReportUnrecognizedArguments(args_count, args.data())) return 2;

  const int threads = settings.threads > 0 ? settings.threads : available_threads();
  attend::bench::set_threads(threads);
  std::cerr << "attend_report: measuring the FMA peak on " << threads << " thread(s)..." << std::endl;
  const double peak = attend::bench::fma_peak_gflops<T>(threads);
  const std::string simd = Eigen::SimdInstructionSetsInUse();
  benchmark::AddCustomContext("attend_simd", simd);
  benchmark::AddCustomContext("attend_threads", std::to_string(threads));
  benchmark::AddCustomContext("attend_fma_peak_gflops", format("%.1f", peak));

  std::map<std::string, std::pair<const Variant*, Index>> cases;
  for (const Variant* v : chosen)
    for (Index length : settings.sizes) {
      const std::string name = v->label() + "/L:" + std::to_string(length);
      cases[name] = {v, length};
      benchmark::RegisterBenchmark(
          name.c_str(),
          [v, length, threads, peak](benchmark::State& state) {
            attend::bench::set_threads(threads);
            v->run(state, length);
            const double gflop = v->flops(length) * 1e-9;
            using Counter = benchmark::Counter;
            state.counters["GFLOPS"] = Counter(gflop, Counter::kIsIterationInvariantRate);
            state.counters["pct_peak"] = Counter(gflop / peak * 100.0, Counter::kIsIterationInvariantRate);
            state.counters["scratch_bytes"] = v->scratch(length, threads);
            if (v->bytes_read)
              state.counters["GBps"] = Counter(v->bytes_read(length) * 1e-9, Counter::kIsIterationInvariantRate);
            state.counters["L"] = double(length);
            state.counters["d"] = double(v->dim);
          })
          ->MinTime(settings.min_time)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond);
    }
  std::cerr << "attend_report: " << cases.size() << " cases (" << chosen.size() << " variant/paths x "
            << settings.sizes.size() << " lengths), at least " << settings.min_time << " s each" << std::endl;

  const std::string header = "attend benchmark report | SIMD: " + simd + " | threads: " + std::to_string(threads) +
                             " | FMA peak (float, " + std::to_string(threads) + " threads): " + format("%.1f", peak) +
                             " GFLOP/s";
  TableReporter reporter(std::move(cases), header, settings.dat);
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
