// SPDX-License-Identifier: MIT
// Process memory for the memory benchmarks: the peak resident set size so far.
#pragma once

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

namespace attend::bench {

/// Peak resident set size of the process in bytes, or 0 where it cannot be read.
inline double peak_rss_bytes() {
#if defined(__APPLE__)
  rusage usage{};
  return getrusage(RUSAGE_SELF, &usage) == 0 ? double(usage.ru_maxrss) : 0.0;  // bytes on macOS
#elif defined(__unix__)
  rusage usage{};
  return getrusage(RUSAGE_SELF, &usage) == 0 ? double(usage.ru_maxrss) * 1024.0 : 0.0;  // KiB on Linux
#else
  return 0.0;
#endif
}

}  // namespace attend::bench
