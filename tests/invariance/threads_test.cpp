// SPDX-License-Identifier: MIT
// Every public entry point gives bitwise the same results under every threading setting a user
// or the environment may impose: OpenMP teams of 1, 2 and 3 threads, Eigen::setNbThreads(1..3)
// (Eigen threads a product itself when it runs in a team of one, blocked for its own count),
// a team of one while OpenMP reports more threads (omp_set_max_active_levels(0), as
// OMP_THREAD_LIMIT=1 does), dynamic teams, and calls from inside the caller's own parallel region
// (reliability.md §3 row 24; FlashAttention's determinism and race-condition tests). The shapes
// split the work: several query tiles per head, several heads and sequences, decode steps over
// more than four key splits, in-place calls past their parallel thresholds. Without OpenMP only
// the repeated-run identity and Eigen's setting are checked.
#include "support/attention_case.hpp"
#include "support/entry_points.hpp"
#include "support/scalars.hpp"

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class ThreadsTest : public ::testing::Test {};
using Scalars = attend::test::TypedScalars;
TYPED_TEST_SUITE(ThreadsTest, Scalars);

/// 160 queries: 5 query tiles of 32 per head (a tail-free count, so tiles are equal work);
/// 800 keys: 4 decode splits of the default 256 (the last one short), 13 key tiles of 64, and a
/// depth of 800 in the materialized P V product, which Eigen blocks by its thread count.
EntrySizes thread_sizes() { return {160, 800, 16, 12, blocked_path(32, 64)}; }

/// One threading setting of the process, imposed for the lifetime of a Setting object.
struct ThreadSetting {
  int eigen_threads;              // Eigen::setNbThreads; 0 = Eigen's default (OpenMP's max threads)
  int omp_threads;                // omp_set_num_threads
  bool dynamic = false;           // omp_set_dynamic
  bool team_of_one = false;       // omp_set_max_active_levels(0): every region gets one thread
  bool in_caller_region = false;  // called from one thread of a 2-thread region of the caller's

  std::string name() const {
    return "Eigen threads " + std::to_string(eigen_threads) + ", OpenMP threads " + std::to_string(omp_threads) +
           (dynamic ? ", dynamic" : "") + (team_of_one ? ", max active levels 0" : "") +
           (in_caller_region ? ", inside the caller's parallel region" : "");
  }
};

std::vector<ThreadSetting> thread_settings() {
  std::vector<ThreadSetting> settings;
  for (int eigen : {0, 1, 2, 3}) {
    for (int omp : {1, 2, 3}) settings.push_back({eigen, omp});
#ifdef _OPENMP
    settings.push_back({eigen, 3, true});
    settings.push_back({eigen, 3, false, true});
    settings.push_back({eigen, 3, false, false, true});
#endif
  }
  return settings;
}

/// Imposes a ThreadSetting and restores the previous one.
class Setting {
 public:
  explicit Setting(const ThreadSetting& s) {
    Eigen::setNbThreads(s.eigen_threads);
#ifdef _OPENMP
    omp_set_num_threads(s.omp_threads);
    omp_set_dynamic(s.dynamic ? 1 : 0);
    if (s.team_of_one) omp_set_max_active_levels(0);
#endif
  }
  ~Setting() {
    Eigen::setNbThreads(0);
#ifdef _OPENMP
    omp_set_num_threads(saved_threads_);
    omp_set_dynamic(saved_dynamic_);
    omp_set_max_active_levels(saved_levels_);
#endif
  }
  Setting(const Setting&) = delete;
  Setting& operator=(const Setting&) = delete;

 private:
#ifdef _OPENMP
  int saved_threads_ = omp_get_max_threads();
  int saved_dynamic_ = omp_get_dynamic();
  int saved_levels_ = omp_get_max_active_levels();
#endif
};

/// Runs `entry` under `setting`.
template <class T, class Entry>
Results<T> run_under(const ThreadSetting& setting, const Entry& entry, const Inputs<T>& in) {
  const Setting imposed(setting);
#ifdef _OPENMP
  if (setting.in_caller_region) {
    std::optional<Results<T>> results;
#pragma omp parallel num_threads(2)
    {
      if (omp_get_thread_num() == 0) results = run_entry<T>(entry, in.q, in.k, in.v);
    }
    return *results;
  }
#endif
  return run_entry<T>(entry, in.q, in.k, in.v);
}

TYPED_TEST(ThreadsTest, EveryEntryPointIsBitwiseIndependentOfRunsAndThreadSettings) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const EntryPoints<T> entries(thread_sizes(), rng);
  const std::vector<ThreadSetting> settings = thread_settings();
  std::size_t visited = 0;
  entries.for_each([&](const auto& entry) {
    SCOPED_TRACE(entry.name);
    const Inputs<T> in = draw_inputs<T>(entry.problem, rng);
    const Results<T> first = run_entry<T>(entry, in.q, in.k, in.v);
    ASSERT_TRUE(informative(first));
    EXPECT_TRUE(identical_results(run_entry<T>(entry, in.q, in.k, in.v), first)) << "repeated run";
    for (const ThreadSetting& setting : settings)
      EXPECT_TRUE(identical_results(run_under<T>(setting, entry, in), first)) << setting.name();
    ++visited;
  });
  EXPECT_GE(visited, 30u);
}

/// The results of every entry point, in order, with `sizes` (its options included) and inputs
/// drawn from a copy of `rng`.
template <class T>
std::vector<Results<T>> run_every_entry(const EntrySizes& sizes, Rng rng) {
  const EntryPoints<T> entries(sizes, rng);
  std::vector<Results<T>> results;
  entries.for_each([&](const auto& entry) {
    const Inputs<T> in = draw_inputs<T>(entry.problem, rng);
    results.push_back(run_entry<T>(entry, in.q, in.k, in.v));
  });
  return results;
}

// options.num_threads = 1, 2, 3 on every entry point, and two std::thread callers at once (which
// share OpenMP's threads between them by default), give the bits of a lone call with the default.
TYPED_TEST(ThreadsTest, PerCallThreadCountsAndConcurrentCallersGiveTheSameBits) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const std::vector<Results<T>> expected = run_every_entry<T>(thread_sizes(), rng);
  ASSERT_GE(expected.size(), 30u);
  const auto expect_same = [&](const std::vector<Results<T>>& results, const std::string& what) {
    ASSERT_EQ(results.size(), expected.size());
    for (std::size_t i = 0; i < results.size(); ++i)
      EXPECT_TRUE(identical_results(results[i], expected[i])) << what << ", entry point " << i;
  };
  for (const int threads : {1, 2, 3}) {
    EntrySizes sizes = thread_sizes();
    sizes.blocked.num_threads = threads;
    expect_same(run_every_entry<T>(sizes, rng), "num_threads=" + std::to_string(threads));
  }
  std::vector<Results<T>> first, second;
  std::thread a([&] { first = run_every_entry<T>(thread_sizes(), rng); });
  std::thread b([&] { second = run_every_entry<T>(thread_sizes(), rng); });
  a.join();
  b.join();
  expect_same(first, "first of two concurrent callers");
  expect_same(second, "second of two concurrent callers");
}

TEST(ThreadsErrors, NegativeThreadCountIsRejected) {
  const Matrix<float> x = Matrix<float>::Ones(3, 4);
  AttentionOptions options;
  options.num_threads = -1;
  try {
    scaled_dot_product_attention(x, x, x, NoMask{}, options);
    ADD_FAILURE() << "no exception";
  } catch (const attend::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("num_threads=-1"), std::string::npos) << e.what();
  }
}

}  // namespace
