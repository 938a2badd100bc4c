# SPDX-License-Identifier: MIT
# cmake -DPROGRAM=<executable> -DEXPECTED=<text> -P expect_abort.cmake
# Passes when PROGRAM aborts (SIGABRT) and its standard error contains "attend: " and EXPECTED.
execute_process(COMMAND "${PROGRAM}" RESULT_VARIABLE result OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("exit: ${result}\nstderr: ${err}")
if(NOT result MATCHES "aborted")  # "Child aborted" or "Subprocess aborted"
  message(FATAL_ERROR "expected ${PROGRAM} to abort, but its exit status is '${result}'")
endif()
string(FIND "${err}" "attend: " prefix_at)
string(FIND "${err}" "${EXPECTED}" expected_at)
if(prefix_at EQUAL -1 OR expected_at EQUAL -1)
  message(FATAL_ERROR "expected 'attend: ...${EXPECTED}...' on standard error")
endif()
