// SPDX-License-Identifier: MIT
// Every public entry point gives bitwise the same results on 1, 2 and 3 OpenMP threads, and on
// repeated runs with one thread count (reliability.md §3 row 24; FlashAttention's determinism
// and race-condition tests). The shapes split the work: several query tiles per head, several
// heads and sequences, decode steps over more than four key splits, in-place calls past their
// parallel thresholds. Without OpenMP only the repeated-run identity is checked.
#include "support/attention_case.hpp"
#include "support/entry_points.hpp"

#include <gtest/gtest.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace attend;
using namespace attend::test;

template <class T>
class ThreadsTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ThreadsTest, Scalars);

/// 160 queries: 5 query tiles of 32 per head (a tail-free count, so tiles are equal work);
/// 800 keys: 4 decode splits of the default 256 (the last one short), 13 key tiles of 64.
EntrySizes thread_sizes() {
  return {160, 800, 16, 12, blocked_path(32, 64)};
}

#ifdef _OPENMP
/// Sets the OpenMP thread count for its lifetime.
class ThreadCount {
 public:
  ThreadCount() : saved_(omp_get_max_threads()) {}
  ~ThreadCount() { omp_set_num_threads(saved_); }
  ThreadCount(const ThreadCount&) = delete;
  ThreadCount& operator=(const ThreadCount&) = delete;
  void set(int n) { omp_set_num_threads(n); }

 private:
  int saved_;
};
#endif

TYPED_TEST(ThreadsTest, EveryEntryPointIsBitwiseIndependentOfRunsAndThreads) {
  using T = TypeParam;
  ATTEND_SEEDED_RNG(rng);
  const EntryPoints<T> entries(thread_sizes(), rng);
  std::size_t visited = 0;
  entries.for_each([&](const auto& entry) {
    SCOPED_TRACE(entry.name);
    const Inputs<T> in = draw_inputs<T>(entry.problem, rng);
    const Results<T> first = run_entry<T>(entry, in.q, in.k, in.v);
    ASSERT_TRUE(informative(first));
    EXPECT_TRUE(identical_results(run_entry<T>(entry, in.q, in.k, in.v), first)) << "repeated run";
#ifdef _OPENMP
    ThreadCount threads;
    for (int n : {1, 2, 3}) {
      threads.set(n);
      EXPECT_TRUE(identical_results(run_entry<T>(entry, in.q, in.k, in.v), first)) << n << " threads";
    }
#endif
    ++visited;
  });
  EXPECT_GE(visited, 30u);
}

}  // namespace
