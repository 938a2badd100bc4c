// SPDX-License-Identifier: MIT
// Compiled with -DEIGEN_DEFAULT_DENSE_INDEX_TYPE=int by the test build_int_index_refused, which
// passes only when this fails to compile with attend's static_assert (config.hpp): a 32-bit
// index would overflow silently in L * L and in positions past 2^31.
#include <attend/attend.hpp>

int main() { return 0; }
