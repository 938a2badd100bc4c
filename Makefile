# SPDX-License-Identifier: MIT
# The quick start. Both commands first install what is missing (cmake/install-dependencies.sh).
#
#   make bench                    Release build of the benchmarks, then the comparison report
#   make test                     Release build of everything (tests, examples, benchmarks), then ctest
#   make test WERROR=1            the same with warnings as errors (preset "ci"; what .ci/run runs)
#   make test PRESET=asan-ubsan   the tests under AddressSanitizer and UndefinedBehaviorSanitizer
#
# Variables: PRESET (a configure preset of CMakePresets.json), BUILD_DIR (default build/<preset>),
# JOBS (parallel compile and test jobs, default: the number of cores), WERROR=1.

WERROR ?=
werror := $(filter 1 ON on yes true,$(WERROR))
PRESET ?= $(if $(werror),ci,release)
BUILD_DIR ?= build/$(PRESET)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.DEFAULT_GOAL := help
.PHONY: help deps configure build test bench clean

help:
	@sed -n 's/^#   /  /p' $(firstword $(MAKEFILE_LIST))

deps:
	@bash cmake/install-dependencies.sh

configure: deps
	cmake --preset $(PRESET) -B $(BUILD_DIR) $(if $(werror),-DATTEND_WERROR=ON)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure --no-tests=error -j $(JOBS)

# Runs benchmarks/report.sh when it exists, otherwise every benchmark executable in turn.
bench: configure
	cmake --build $(BUILD_DIR) --target attend_benchmarks -j $(JOBS)
	@if [ -f benchmarks/report.sh ]; then \
	  bash benchmarks/report.sh $(BUILD_DIR); \
	else \
	  benches=$$(find $(BUILD_DIR)/benchmarks -name CMakeFiles -prune -o -type f -perm -u+x -name '*bench_*' -print | sort); \
	  [ -n "$$benches" ] || { echo "attend: no benchmark executables in $(BUILD_DIR)/benchmarks" >&2; exit 1; }; \
	  for bench in $$benches; do echo "== $$bench"; $$bench || exit 1; done; \
	fi

clean:
	cmake --build $(BUILD_DIR) --target clean
