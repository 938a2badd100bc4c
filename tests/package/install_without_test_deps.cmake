# SPDX-License-Identifier: MIT
# cmake -DSOURCE_DIR=<attend source> -DWORK_DIR=<dir> -DGENERATOR=<generator> [-DCXX=<compiler>]
#       [-DEIGEN3_DIR=<dir>] -P install_without_test_deps.cmake
# A user installing attend from a fresh checkout on a machine without GoogleTest and Google
# Benchmark (hidden with CMAKE_DISABLE_FIND_PACKAGE_<name>) and no ATTEND_* option: configure,
# then install into WORK_DIR/prefix; both must succeed and install the package files.
file(REMOVE_RECURSE "${WORK_DIR}")
set(options -G "${GENERATOR}" -DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON)
if(CXX)
  list(APPEND options "-DCMAKE_CXX_COMPILER=${CXX}")
endif()
if(EIGEN3_DIR)
  list(APPEND options "-DEigen3_DIR=${EIGEN3_DIR}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${WORK_DIR}/build" ${options} RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "configuring attend without GoogleTest and Google Benchmark failed: ${result}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${WORK_DIR}/build" --prefix "${WORK_DIR}/prefix"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${result}")
endif()
file(GLOB_RECURSE config "${WORK_DIR}/prefix/*/attendConfig.cmake")
if(NOT EXISTS "${WORK_DIR}/prefix/include/attend/attend.hpp" OR NOT config)
  message(FATAL_ERROR "cmake --install did not install attend.hpp and attendConfig.cmake under ${WORK_DIR}/prefix")
endif()
