# SPDX-License-Identifier: MIT
# cmake -DBUILD_DIR=<build tree> -DTARGET=<target> -DCONFIG=<config> -DEXPECTED=<text> -P expect_compile_error.cmake
# Passes when building TARGET fails and the FIRST line reporting an error ("error:", gcc and
# clang alike) contains EXPECTED: attend's own diagnostic comes before anything from Eigen.
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" --config "${CONFIG}"
                RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(result EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled; expected it to fail with '${EXPECTED}'")
endif()
string(REGEX MATCH "[^\n]*error:[^\n]*" first_error "${output}")
string(FIND "${first_error}" "${EXPECTED}" position)
if(position EQUAL -1)
  message(FATAL_ERROR "the first error building ${TARGET} is not attend's '${EXPECTED}':\n${first_error}\n\n"
                      "full output:\n${output}")
endif()
message(STATUS "first error: ${first_error}")
