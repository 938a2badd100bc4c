// SPDX-License-Identifier: MIT
// Threads of the caller (detail/parallel.hpp): two std::thread workers, each decoding its own
// sequence, against one worker decoding both in turn. The same decode steps (32 query heads on
// 8 kv heads, d = 128, Lk = 8192, fp32; 16 steps per sequence and iteration) run
//  - OneWorkerBothInTurn: one caller thread, OpenMP's default team for each step;
//  - TwoWorkers: two std::threads at once with the default num_threads = 0, which shares
//    OpenMP's threads among the callers inside attend (one each on a 2-core machine);
//  - TwoWorkersTwoThreadsEach: two std::threads forcing num_threads = OpenMP's max each, what
//    every caller got before the default shared the threads (oversubscription).
// The goal (issue #13): TwoWorkers no slower than OneWorkerBothInTurn. Each run reports the
// steps per second and the GB/s of K and V read.
#include <attend/attention/split_kv.hpp>

#include <benchmark/benchmark.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <thread>
#include <vector>

namespace {

using attend::Index;
using T = float;

constexpr Index kHeads = 32, kKvHeads = 8, kDim = 128, kKeys = 8192, kSteps = 16;

struct Sequence {
  Sequence()
      : q(attend::Matrix<T>::Random(1, kHeads * kDim)),
        k(attend::Matrix<T>::Random(kKeys, kKvHeads * kDim)),
        v(attend::Matrix<T>::Random(kKeys, kKvHeads * kDim)),
        out(1, kHeads * kDim) {}
  double bytes() const { return double(sizeof(T)) * double(k.size() + v.size()); }

  void step(const attend::AttentionOptions& options) {
    attend::decode_attention_into(q, k, v, kHeads, out, options);
    benchmark::DoNotOptimize(out.data());
  }

  attend::Matrix<T> q, k, v, out;
};

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void report(benchmark::State& state, const std::vector<Sequence>& sequences) {
  const double steps = double(kSteps) * double(sequences.size());
  state.counters["steps_per_s"] = benchmark::Counter(steps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GBps"] =
      benchmark::Counter(steps * sequences[0].bytes() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["omp_max_threads"] = max_threads();
}

void BM_OneWorkerBothInTurn(benchmark::State& state) {
  std::vector<Sequence> sequences(2);
  for (auto _ : state)
    for (Index s = 0; s < kSteps; ++s)
      for (Sequence& sequence : sequences) sequence.step({});
  report(state, sequences);
}

void two_workers(benchmark::State& state, int num_threads) {
  std::vector<Sequence> sequences(2);
  attend::AttentionOptions options;
  options.num_threads = num_threads;
  for (auto _ : state) {
    std::vector<std::thread> workers;
    for (Sequence& sequence : sequences)
      workers.emplace_back([&sequence, &options] {
        for (Index s = 0; s < kSteps; ++s) sequence.step(options);
      });
    for (std::thread& worker : workers) worker.join();
  }
  report(state, sequences);
}

void BM_TwoWorkers(benchmark::State& state) { two_workers(state, 0); }
void BM_TwoWorkersTwoThreadsEach(benchmark::State& state) { two_workers(state, max_threads()); }

BENCHMARK(BM_OneWorkerBothInTurn)->Name("Decode/OneWorkerBothInTurn")->MinTime(0.5)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TwoWorkers)->Name("Decode/TwoWorkers")->MinTime(0.5)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TwoWorkersTwoThreadsEach)
    ->Name("Decode/TwoWorkersTwoThreadsEach")
    ->MinTime(0.5)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
