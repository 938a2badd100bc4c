# SPDX-License-Identifier: MIT
# Answers the tests' find_package(GTest) by building GoogleTest from source with the project's
# own compiler, for a cross build (the distribution's libgtest.a is built for the host).
# Load it before the first project() (CMake 3.25 or newer), as the preset "aarch64" does:
#   -DCMAKE_PROJECT_TOP_LEVEL_INCLUDES=cmake/toolchains/googletest-from-source.cmake
# The sources default to Debian's (/usr/src/googletest, package googletest); any other package
# goes to CMake's own find_package.
cmake_minimum_required(VERSION 3.25)

set(ATTEND_GOOGLETEST_SOURCE_DIR "/usr/src/googletest" CACHE PATH
    "GoogleTest's sources (with googlemock), built for the target by the tests' find_package(GTest)")

macro(attend_googletest_from_source method package_name)
  if("${package_name}" STREQUAL "GTest")
    if(NOT EXISTS "${ATTEND_GOOGLETEST_SOURCE_DIR}/googlemock/CMakeLists.txt")
      message(FATAL_ERROR "No GoogleTest sources (with googlemock) in '${ATTEND_GOOGLETEST_SOURCE_DIR}': "
                          "install googletest (Debian), or set ATTEND_GOOGLETEST_SOURCE_DIR")
    endif()
    include(FetchContent)
    set(INSTALL_GTEST OFF CACHE BOOL "Install GoogleTest (built for attend's tests only)")
    # SYSTEM: GoogleTest's headers get the tests' warning flags no more than an installed copy would.
    FetchContent_Declare(googletest SOURCE_DIR "${ATTEND_GOOGLETEST_SOURCE_DIR}" SYSTEM)
    FetchContent_MakeAvailable(googletest)  # GTest::gtest, GTest::gtest_main, GTest::gmock
    set(GTest_FOUND TRUE)
  endif()
endmacro()
cmake_language(SET_DEPENDENCY_PROVIDER attend_googletest_from_source SUPPORTED_METHODS FIND_PACKAGE)
