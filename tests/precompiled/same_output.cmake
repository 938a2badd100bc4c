# SPDX-License-Identifier: MIT
# cmake -DFIRST=<executable> -DSECOND=<executable> -P same_output.cmake
# Passes when both programs succeed and print the same standard output (here: hashes of results).
foreach(program FIRST SECOND)
  execute_process(COMMAND "${${program}}" RESULT_VARIABLE result OUTPUT_VARIABLE output_${program})
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${${program}} failed: ${result}")
  endif()
endforeach()
if(output_FIRST STREQUAL "")
  message(FATAL_ERROR "${FIRST} printed nothing")
endif()
if(NOT output_FIRST STREQUAL output_SECOND)
  message(FATAL_ERROR "different results:\n${FIRST}:\n${output_FIRST}\n${SECOND}:\n${output_SECOND}")
endif()
message("identical:\n${output_FIRST}")
