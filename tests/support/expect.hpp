// SPDX-License-Identifier: MIT
// Expectations on attend's errors.
#pragma once

#include <attend/config.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace attend::test {

/// Calls f, which must throw attend::invalid_argument whose message contains every fragment.
template <class F>
void expect_invalid(F&& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "no attend::invalid_argument thrown";
  } catch (const attend::invalid_argument& e) {
    for (const std::string& fragment : fragments) EXPECT_THAT(e.what(), ::testing::HasSubstr(fragment));
  }
}

}  // namespace attend::test
