// SPDX-License-Identifier: MIT
// The float runs, compiled apart from the double ones to halve the build's wall time.
#include "harness.hpp"

namespace attend::fuzz {
template void run<float>(const Config&, FuzzedDataProvider&);
}  // namespace attend::fuzz
