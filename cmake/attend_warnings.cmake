# SPDX-License-Identifier: MIT
# Flags for attend's own tests, benchmarks and examples; never put on the library target.

# attend_configure_target(<target>): warnings (errors with ATTEND_WERROR), -march=native with
# ATTEND_NATIVE_ARCH, and the library itself.
function(attend_configure_target target)
  target_link_libraries(${target} PRIVATE attend::attend)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 $<$<BOOL:${ATTEND_WERROR}>:/WX>)
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow -Wconversion-null
      $<$<BOOL:${ATTEND_WERROR}>:-Werror>)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC 12 reports false positives inside its own AVX-512 intrinsics when Eigen inlines them.
      target_compile_options(${target} PRIVATE -Wno-maybe-uninitialized)
    elseif(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
      # GoogleTest's TYPED_TEST_SUITE(Suite, Types) leaves its variadic argument empty (C++17 pedantic).
      target_compile_options(${target} PRIVATE -Wno-gnu-zero-variadic-macro-arguments)
    endif()
    # Not when cross-compiling: "native" would name the build machine, not the target.
    if(ATTEND_NATIVE_ARCH AND NOT CMAKE_CROSSCOMPILING)
      target_compile_options(${target} PRIVATE -march=native)
    endif()
  endif()
endfunction()
