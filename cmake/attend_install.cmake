# SPDX-License-Identifier: MIT
# install() rules, the package config with its version file, and a build-tree export.
include(CMakePackageConfigHelpers)

set(ATTEND_CONFIG_DIR "${CMAKE_INSTALL_DATADIR}/cmake/attend")

install(DIRECTORY include/ DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS attend EXPORT attendTargets)
install(EXPORT attendTargets NAMESPACE attend:: DESTINATION "${ATTEND_CONFIG_DIR}")
# attend::distributed in its own export set, which attendConfig.cmake loads only when it finds MPI.
if(ATTEND_HAS_MPI)
  install(TARGETS attend_distributed EXPORT attendDistributedTargets)
  install(EXPORT attendDistributedTargets NAMESPACE attend:: DESTINATION "${ATTEND_CONFIG_DIR}")
endif()

configure_package_config_file(cmake/attendConfig.cmake.in
  "${PROJECT_BINARY_DIR}/attendConfig.cmake"
  INSTALL_DESTINATION "${ATTEND_CONFIG_DIR}")
write_basic_package_version_file("${PROJECT_BINARY_DIR}/attendConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES
  "${PROJECT_BINARY_DIR}/attendConfig.cmake"
  "${PROJECT_BINARY_DIR}/attendConfigVersion.cmake"
  DESTINATION "${ATTEND_CONFIG_DIR}")

# Lets a consumer use find_package(attend) against this build tree.
export(EXPORT attendTargets NAMESPACE attend:: FILE "${PROJECT_BINARY_DIR}/attendTargets.cmake")
if(ATTEND_HAS_MPI)
  export(EXPORT attendDistributedTargets NAMESPACE attend:: FILE "${PROJECT_BINARY_DIR}/attendDistributedTargets.cmake")
endif()
