// SPDX-License-Identifier: MIT
// Seeded random inputs for tests. Every stream is seeded from GoogleTest's random seed mixed with
// the current test's name, so tests draw independent data and a failure replays exactly with
// --gtest_random_seed=N (the seed is printed by ATTEND_SEEDED_RNG through SCOPED_TRACE).
#pragma once

#include <attend/types.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace attend::test {

/// GoogleTest's random seed (--gtest_random_seed) mixed with the full name of the running test.
inline std::uint64_t test_seed() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : std::string();
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (const char c : name) {
    h ^= static_cast<unsigned char>(c);
    h *= 1099511628211ull;
  }
  const auto seed = static_cast<std::uint64_t>(::testing::UnitTest::GetInstance()->random_seed());
  return h ^ (seed * 0x9E3779B97F4A7C15ull);
}

/// A seeded generator of test data.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : engine_(seed) {}

  /// (rows, cols) matrix of N(0, amplitude^2) entries.
  template <class T>
  Matrix<T> normal(Index rows, Index cols, double amplitude = 1) {
    std::normal_distribution<double> dist(0.0, amplitude);
    Matrix<T> m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = static_cast<T>(dist(engine_));
    return m;
  }

  /// Uniform integer in [lo, hi] (both included).
  Index uniform(Index lo, Index hi) { return std::uniform_int_distribution<Index>(lo, hi)(engine_); }

  /// True with probability p.
  bool bernoulli(double p) { return std::bernoulli_distribution(p)(engine_); }

  /// (rows, cols) booleans, each true with probability p.
  BoolMatrix bernoulli(Index rows, Index cols, double p) {
    BoolMatrix m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = bernoulli(p);
    return m;
  }

  /// A uniformly chosen element of a non-empty list.
  template <class C>
  const typename C::value_type& pick(const C& values) {
    return values[static_cast<std::size_t>(uniform(0, static_cast<Index>(values.size()) - 1))];
  }

  /// A uniformly random permutation of 0..n-1.
  std::vector<Index> permutation(Index n) {
    std::vector<Index> p(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) p[static_cast<std::size_t>(i)] = i;
    std::shuffle(p.begin(), p.end(), engine_);
    return p;
  }

  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
};

/// Element i of `values`, wrapping around: a deterministic way to pair every entry of one grid axis
/// with a rotating entry of another without the Cartesian product.
template <class C>
const typename C::value_type& cycle(const C& values, std::size_t i) {
  return values[i % values.size()];
}

}  // namespace attend::test

/// Declares `Rng var` seeded for the current test and traces the seed and how to replay it.
#define ATTEND_SEEDED_RNG(var)                                                                          \
  const std::uint64_t var##_seed = ::attend::test::test_seed();                                         \
  SCOPED_TRACE("seed " + std::to_string(var##_seed) + "; replay with --gtest_random_seed=" +            \
               std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + " --gtest_filter=" + \
               ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name() + "." +       \
               ::testing::UnitTest::GetInstance()->current_test_info()->name());                         \
  ::attend::test::Rng var(var##_seed)
