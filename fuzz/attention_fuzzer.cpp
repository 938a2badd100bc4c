// SPDX-License-Identifier: MIT
// libFuzzer target for attend's public entry points.
//
// Each input is decoded (fuzz_input.hpp) into a scalar type, shapes (0 to 64), a mask, a scale,
// tile sizes, a storage layout, an entry point and the matrices' values (NaN and Inf included).
// The run then calls that entry point through every path it has and checks:
//  - a call throws attend::invalid_argument exactly when the configuration is invalid (any other
//    exception, or a missing or spurious throw, aborts);
//  - nothing writes outside an output block (the buffer around it stays NaN), and every output
//    has its documented shape;
//  - a row that sees no key is exactly 0 (lse -inf); a NaN in a visible score makes its row NaN;
//  - with finite inputs, every path lies within the a-priori error bound of oracle.hpp of the
//    exact (long double) result, so the blocked and materialized paths agree with each other.
// The sanitizers (address, undefined) catch the rest.
#include "harness.hpp"

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdint>

namespace attend::fuzz {
extern template void run<float>(const Config&, FuzzedDataProvider&);
extern template void run<double>(const Config&, FuzzedDataProvider&);
}  // namespace attend::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const attend::fuzz::Config config = attend::fuzz::draw_config(in);
  if (config.use_double)
    attend::fuzz::run<double>(config, in);
  else
    attend::fuzz::run<float>(config, in);
  return 0;
}
