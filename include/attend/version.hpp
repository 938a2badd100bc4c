// SPDX-License-Identifier: MIT
/// \file version.hpp
/// \brief The library version: the single source that CMake parses.
#pragma once

#define ATTEND_VERSION_MAJOR 0
#define ATTEND_VERSION_MINOR 1
#define ATTEND_VERSION_PATCH 0

/// The version as one integer, major * 10000 + minor * 100 + patch.
#define ATTEND_VERSION (ATTEND_VERSION_MAJOR * 10000 + ATTEND_VERSION_MINOR * 100 + ATTEND_VERSION_PATCH)
