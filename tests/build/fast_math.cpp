// SPDX-License-Identifier: MIT
// Compiled with -ffast-math by the test build_fast_math_refused, which passes only when this fails
// to compile with attend's #error: masking relies on IEEE infinities, which -ffinite-math-only removes.
#include <attend/attend.hpp>

int main() { return 0; }
