# SPDX-License-Identifier: MIT
# The quick start. Both commands first install what is missing (cmake/install-dependencies.sh).
#
#   make bench                    Release build of the benchmarks, then the comparison report
#   make bench ARGS="--variants=causal --sizes=1024,4096"   chosen variants and lengths (--list names them)
#   make bench ARGS=--full        every benchmark suite in full instead (several minutes)
#   make test                     Release build of everything (tests, examples, benchmarks), then ctest
#   make test WERROR=1            the same with warnings as errors (preset "ci"; what .ci/run runs)
#   make test PRESET=asan-ubsan   the tests under AddressSanitizer and UndefinedBehaviorSanitizer
#
# Variables: PRESET (a configure preset of CMakePresets.json), BUILD_DIR (default build/<preset>),
# JOBS (parallel compile and test jobs, default: the number of cores), WERROR=1, ARGS (for bench).

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
	@bash cmake/install-dependencies.sh $(DEPS_FLAGS)

configure: deps
	cmake --preset $(PRESET) -B $(BUILD_DIR) $(if $(werror),-DATTEND_WERROR=ON)

build: configure
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	ctest --test-dir $(BUILD_DIR) --output-on-failure --no-tests=error -j $(JOBS)

# The comparison report (benchmarks/report.sh), with ARGS passed to it; gnuplot for its plot.
bench: DEPS_FLAGS = --bench
bench: configure
	cmake --build $(BUILD_DIR) --target attend_benchmarks -j $(JOBS)
	bash benchmarks/report.sh $(BUILD_DIR) $(ARGS)

clean:
	cmake --build $(BUILD_DIR) --target clean
