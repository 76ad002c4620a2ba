# kvpool_cc_test(NAME SRCS s1.cc ... DEPS d1 ... [LABELS l1 ...])
# One binary per test file, linked against the unit under test and GTest::gmock_main,
# registered with gtest_discover_tests so that each TEST is its own ctest entry; tests whose
# name starts with Cuda get the label `gpu`.
function(kvpool_cc_test name)
  cmake_parse_arguments(T "" "" "SRCS;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${T_SRCS})
  target_link_libraries(${name} PRIVATE ${T_DEPS} kvpool_test_util GTest::gmock_main)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  set(labels unit)
  if(T_LABELS)
    set(labels ${T_LABELS})
  endif()
  # Tests named Cuda* need a GPU: they carry the ctest label `gpu` (and skip without a device).
  gtest_discover_tests(${name}
    TEST_FILTER "-*.Cuda*"
    PROPERTIES LABELS "${labels}" TIMEOUT 300
    DISCOVERY_TIMEOUT 60)
  gtest_discover_tests(${name}
    TEST_FILTER "*.Cuda*"
    PROPERTIES LABELS "gpu;${labels}" TIMEOUT 300
    DISCOVERY_TIMEOUT 60)
endfunction()

# Compile warnings used by every project target.
function(kvpool_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -Wno-sign-compare>)
endfunction()
