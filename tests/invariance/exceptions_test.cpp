// SPDX-License-Identifier: MIT
// Exceptions thrown inside attend's parallel regions reach the caller instead of ending the
// process (an exception leaving an OpenMP region calls std::terminate), and a decode step that
// fails, allocation included, leaves its cache as it was (DESIGN.md section 6, "Threads"; the
// strong guarantee documented on decode_step_into).
//
// Allocations fail on demand: from the n-th allocation after FailingAllocations(n) on, every
// allocation throws std::bad_alloc until the object is destroyed, Eigen's (through its
// EIGEN_RUNTIME_NO_MALLOC check, whose eigen_assert is redefined here before Eigen is included)
// and operator new's (replaced below). Sweeping n from 0 until a call succeeds fails every
// allocation the call makes in turn, those of the threads inside its parallel regions included.
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#ifdef ATTEND_TEST_EIGEN_ASSERTS_THROW  // support/eigen_assert.hpp is force-included: keep its other checks
#define ATTEND_TEST_OTHER_EIGEN_ASSERT(condition) \
  if (!(condition)) throw ::attend::test::eigen_assertion_failure(#condition, __FILE__, __LINE__)
#else  // as Eigen's own under NDEBUG
#define ATTEND_TEST_OTHER_EIGEN_ASSERT(condition) static_cast<void>(sizeof(static_cast<bool>(condition)))
#endif

namespace attend::test {

/// Whether an allocation budget is set, and the allocations left in it.
inline std::atomic<bool> allocations_armed{false};
inline std::atomic<long> allocations_left{0};

/// Called by every allocation: throws std::bad_alloc once the budget is spent.
inline void count_allocation() {
  if (allocations_armed.load() && allocations_left.fetch_sub(1) <= 0) throw std::bad_alloc();
}

/// Whether an assertion's text is Eigen's check that heap allocation is allowed.
constexpr bool is_allocation_check(const char* condition) {
  constexpr char key[] = "is_malloc_allowed";
  for (; *condition != 0; ++condition) {
    std::size_t i = 0;
    while (key[i] != 0 && condition[i] == key[i]) ++i;
    if (key[i] == 0) return true;
  }
  return false;
}

}  // namespace attend::test

#define EIGEN_RUNTIME_NO_MALLOC
#undef eigen_assert
#define eigen_assert(condition)                                      \
  do {                                                               \
    if constexpr (::attend::test::is_allocation_check(#condition)) { \
      if (!(condition)) ::attend::test::count_allocation();          \
    } else {                                                         \
      ATTEND_TEST_OTHER_EIGEN_ASSERT(condition);                     \
    }                                                                \
  } while (false)

#include <attend/attend.hpp>

#include "support/random.hpp"

#include <gtest/gtest.h>

#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// GCC 12 takes the free() of a replacement operator delete for a mismatch with new.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t size) {
  attend::test::count_allocation();
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace attend::test {
namespace {

/// Makes every allocation from the n-th on (counting from 0) throw std::bad_alloc for its
/// lifetime.
class FailingAllocations {
 public:
  explicit FailingAllocations(long n) {
    allocations_left = n;
    allocations_armed = true;
    Eigen::internal::set_is_malloc_allowed(false);
  }
  ~FailingAllocations() {
    allocations_armed = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
  FailingAllocations(const FailingAllocations&) = delete;
  FailingAllocations& operator=(const FailingAllocations&) = delete;
};

/// Calls run() with the allocations from the n-th on failing, for n = 0, 1, ... until it
/// succeeds; after each std::bad_alloc, check() verifies what must hold after a failure.
/// Returns the number of failed runs.
template <class Run, class Check>
long fail_each_allocation_in_turn(Run&& run, Check&& check) {
  for (long n = 0; n < 100000; ++n) {
    bool failed = false;
    {
      const FailingAllocations failing(n);
      try {
        run();
      } catch (const std::bad_alloc&) {
        failed = true;
      }
    }
    if (!failed) return n;
    check();
  }
  ADD_FAILURE() << "the call still fails after 100000 allocations";
  return 0;
}

struct LoopError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#ifdef _OPENMP
std::vector<int> thread_counts() { return {1, 2, 3}; }
#else
std::vector<int> thread_counts() { return {1}; }
#endif

/// Sets the OpenMP thread count for its lifetime.
class Threads {
 public:
  explicit Threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    (void)n;
  }
  ~Threads() {
#ifdef _OPENMP
    omp_set_num_threads(saved_);
#endif
  }
  Threads(const Threads&) = delete;
  Threads& operator=(const Threads&) = delete;

 private:
#ifdef _OPENMP
  int saved_ = omp_get_max_threads();
#endif
};

TEST(ParallelLoop, AnExceptionFromTheBodyReachesTheCallerAndTheNextLoopRunsWhole) {
  for (int threads : thread_counts()) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    const Threads set(threads);
    const auto throw_at_7 = [](Index i, int&) {
      if (i == 7) throw LoopError("iteration 7");
    };
    try {
      detail::parallel_for_with_scratch(
          100, [] { return 0; }, throw_at_7);
      ADD_FAILURE() << "no exception";
    } catch (const LoopError& e) {
      EXPECT_STREQ(e.what(), "iteration 7");
    }
    EXPECT_THROW(detail::parallel_for_with_scratch(
                     100, [] { return 0; }, [](Index, int&) { throw LoopError("every iteration"); }),
                 LoopError);
    std::vector<std::atomic<int>> runs(100);
    detail::parallel_for_with_scratch(
        100, [] { return 0; }, [&](Index i, int&) { ++runs[std::size_t(i)]; });
    for (std::size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(runs[i].load(), 1) << "iteration " << i;
  }
}

TEST(ParallelLoop, AnExceptionFromTheScratchReachesTheCaller) {
  for (int threads : thread_counts()) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    const Threads set(threads);
    std::atomic<int> scratches{0};
    std::atomic<int> runs_without_scratch{0};
    // The first thread to build its scratch throws; the others' iterations must not run with it.
    const auto first_throws = [&] {
      if (scratches++ == 0) throw LoopError("scratch");
      return 1;
    };
    EXPECT_THROW(detail::parallel_for_with_scratch(
                     64, first_throws, [&](Index, int& scratch) { runs_without_scratch += scratch == 1 ? 0 : 1; }),
                 LoopError);
    EXPECT_EQ(runs_without_scratch.load(), 0);
  }
}

TEST(ParallelLoop, AnExceptionFromANestedLoopReachesTheCaller) {
  for (int threads : thread_counts()) {
    SCOPED_TRACE(std::to_string(threads) + " threads");
    const Threads set(threads);
    const auto inner = [](Index outer, int&) {
      detail::parallel_for_with_scratch(
          8, [] { return 0; },
          [&](Index i, int&) {
            if (outer == 3 && i == 5) throw LoopError("nested");
          });
    };
    EXPECT_THROW(detail::parallel_for_with_scratch(
                     6, [] { return 0; }, inner),
                 LoopError);
  }
}

/// Bitwise equality of two matrices.
template <class A, class B>
bool same(const A& a, const B& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * std::size_t(a.size())) == 0);
}

TEST(OutOfMemory, BatchedMaterializedAttentionThrowsBadAlloc) {
  ATTEND_SEEDED_RNG(rng);
  const BatchLayout layout{4, 2};  // 8 heads: one (Lq, Lk) scratch per thread, built inside the region
  const Matrix<float> q = rng.normal<float>(2 * 40, 4 * 8), k = rng.normal<float>(2 * 50, 4 * 8),
                      v = rng.normal<float>(2 * 50, 4 * 6);
  AttentionOptions options;
  options.algorithm = Algorithm::Materialized;
  Matrix<float> expected(q.rows(), v.cols()), out(q.rows(), v.cols());
  batched_attention_into(q, k, v, expected, layout, Causal(), options);
  const long failures =
      fail_each_allocation_in_turn([&] { batched_attention_into(q, k, v, out, layout, Causal(), options); }, [] {});
  EXPECT_GE(failures, 1);
  EXPECT_TRUE(same(out, expected));
}

TEST(OutOfMemory, MultiHeadMaterializedAttentionThrowsBadAlloc) {
  ATTEND_SEEDED_RNG(rng);
  const Matrix<double> q = rng.normal<double>(40, 4 * 8), k = rng.normal<double>(50, 2 * 8),
                       v = rng.normal<double>(50, 2 * 6);
  AttentionOptions options;
  options.algorithm = Algorithm::Materialized;  // each head allocates its (Lq, Lk) weights in the region
  const Matrix<double> expected = multi_head_attention(q, k, v, 4, NoMask{}, options);
  Matrix<double> out(expected.rows(), expected.cols());
  const long failures =
      fail_each_allocation_in_turn([&] { multi_head_attention_into(q, k, v, 4, out, NoMask{}, options); }, [] {});
  EXPECT_GE(failures, 1);
  EXPECT_TRUE(same(out, expected));
}

/// A decode step that fails at any allocation leaves the cache as it was: the same rows, size
/// and position. `rows` new tokens go into `cache` (1: the split-KV path; more: the multi-head
/// path).
template <class T>
void expect_failed_decode_steps_leave_the_cache_unchanged(KVCache<T> cache, Index rows, Rng& rng) {
  const Index heads = 4, width = cache.kv_heads() * cache.head_dim();
  const Matrix<T> q = rng.normal<T>(rows, heads * cache.head_dim()), k = rng.normal<T>(rows, width),
                  v = rng.normal<T>(rows, cache.kv_heads() * cache.value_head_dim());
  const Matrix<T> keys = cache.keys(), values = cache.values();
  const Index size = cache.size(), position = cache.position();
  KVCache<T> reference = cache;
  const Matrix<T> expected = decode_step(reference, q, k, v, heads);
  Matrix<T> out(expected.rows(), expected.cols());
  const long failures = fail_each_allocation_in_turn([&] { decode_step_into(cache, q, k, v, heads, out); },
                                                     [&] {
                                                       EXPECT_EQ(cache.size(), size);
                                                       EXPECT_EQ(cache.position(), position);
                                                       EXPECT_TRUE(same(Matrix<T>(cache.keys()), keys));
                                                       EXPECT_TRUE(same(Matrix<T>(cache.values()), values));
                                                     });
  EXPECT_GE(failures, 1);
  EXPECT_TRUE(same(out, expected));
  EXPECT_TRUE(same(Matrix<T>(cache.keys()), Matrix<T>(reference.keys())));
  EXPECT_EQ(cache.position(), reference.position());
}

TEST(OutOfMemory, AFailedDecodeStepLeavesTheCacheUnchanged) {
  ATTEND_SEEDED_RNG(rng);
  for (Index rows : {1, 5}) {
    SCOPED_TRACE(std::to_string(rows) + " new tokens");
    {
      SCOPED_TRACE("unbounded cache");
      KVCache<float> cache(600, 2, 8);
      cache.append(rng.normal<float>(300, 16), rng.normal<float>(300, 16));  // 2 key splits of 256
      expect_failed_decode_steps_leave_the_cache_unchanged(cache, rows, rng);
    }
    {
      SCOPED_TRACE("window 296 in 300 rows: the step moves the kept rows over the rows held");
      KVCache<double> cache(300, 2, 8, {296, 6});
      cache.append(rng.normal<double>(300, 16), rng.normal<double>(300, 12));
      expect_failed_decode_steps_leave_the_cache_unchanged(cache, rows, rng);
    }
  }
}

// A batched paged decode step that fails at any allocation leaves the pool as it was: every
// sequence's length and block table, the reference counts, the free blocks and the rows; then it
// succeeds with the result of an undisturbed copy. The step appends to a forked sequence (a copy
// on write), to one that needs new blocks, and to a windowed pool's sequences.
TEST(OutOfMemory, AFailedPagedDecodeStepLeavesThePoolUnchanged) {
  ATTEND_SEEDED_RNG(rng);
  for (const Index window : {Index(-1), Index(6)}) {
    SCOPED_TRACE("window " + std::to_string(window));
    PagedKVCache<float> cache(24, 2, 8, {4, window});
    const Index a = cache.add_sequence();
    cache.append(a, rng.normal<float>(10, 16), rng.normal<float>(10, 16));
    const Index b = cache.fork(a), c = cache.add_sequence();
    cache.append(c, rng.normal<float>(3, 16), rng.normal<float>(3, 16));
    const std::vector<Index> ids{a, b, c};
    const auto rows = SequenceRows::packed(std::vector<Index>{0, 1, 3, 6});
    const Matrix<float> q = rng.normal<float>(6, 32), k = rng.normal<float>(6, 16), v = rng.normal<float>(6, 16);
    const auto state = [&] {
      std::vector<Matrix<float>> s;
      for (Index id : ids) {
        s.push_back(cache.gather_keys(id));
        s.push_back(cache.gather_values(id));
        Matrix<float> table(1, Index(cache.block_table(id).size()) + 2);
        for (std::size_t i = 0; i < cache.block_table(id).size(); ++i) table(0, Index(i)) = float(cache.block_table(id)[i]);
        table(0, table.cols() - 2) = float(cache.length(id));
        table(0, table.cols() - 1) = float(cache.first_position(id));
        s.push_back(table);
      }
      Matrix<float> counts(1, cache.num_blocks() + 1);
      for (Index p = 0; p < cache.num_blocks(); ++p) counts(0, p) = float(cache.ref_count(p));
      counts(0, cache.num_blocks()) = float(cache.free_blocks());
      s.push_back(counts);
      return s;
    };
    const std::vector<Matrix<float>> before = state();
    PagedKVCache<float> reference = cache;
    Matrix<float> expected(6, 32), out(6, 32);
    paged_decode_step_into(reference, ids, rows, q, k, v, 4, expected);
    const long failures = fail_each_allocation_in_turn([&] { paged_decode_step_into(cache, ids, rows, q, k, v, 4, out); },
                                                       [&] {
                                                         const std::vector<Matrix<float>> after = state();
                                                         for (std::size_t i = 0; i < before.size(); ++i)
                                                           EXPECT_TRUE(same(after[i], before[i])) << "state " << i;
                                                       });
    EXPECT_GE(failures, 1);
    EXPECT_TRUE(same(out, expected));
    for (Index id : ids) EXPECT_TRUE(same(cache.gather_keys(id), reference.gather_keys(id)));
    EXPECT_EQ(cache.free_blocks(), reference.free_blocks());
  }
}

}  // namespace
}  // namespace attend::test
