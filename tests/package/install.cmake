# SPDX-License-Identifier: MIT
# cmake -DBUILD_DIR=<attend build> -DPREFIX=<dir> -DINCLUDEDIR=<rel> -DCONFIGDIR=<rel> [-DCONFIG=<config>]
#       -P install.cmake
# Installs attend from BUILD_DIR into a fresh PREFIX (the fixture of package_find_package).
file(REMOVE_RECURSE "${PREFIX}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" --config "${CONFIG}"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${result}")
endif()
foreach(file "${INCLUDEDIR}/attend/attend.hpp" "${CONFIGDIR}/attendConfig.cmake"
             "${CONFIGDIR}/attendConfigVersion.cmake" "${CONFIGDIR}/attendTargets.cmake")
  if(NOT EXISTS "${PREFIX}/${file}")
    message(FATAL_ERROR "cmake --install did not install ${file}")
  endif()
endforeach()
