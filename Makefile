# kvpool quick start:
#   make demo   install what is missing, build (Release), run kvpoold with a demo workload
#   make test   install what is missing, build, run every test through ctest
#   make plots  the codecs' figures (docs/codecs-*.png; a few minutes, one core for the bench)
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=

.PHONY: all deps build demo test bench plots clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD)

test: build
	@KVPOOL_VENV=$(BUILD)/venv scripts/setup-python.sh
	@scripts/build-fuzz.sh $(BUILD)
	@cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	@$(BUILD)/bin/kvpool-bench transfer

plots: build
	@KVPOOL_VENV=$(BUILD)/venv scripts/setup-python.sh
	@$(BUILD)/venv/bin/python scripts/plot-codecs.py --kvpool $(BUILD)/bin/kvpool --bench $(BUILD)/bin/kvpool-bench

clean:
	rm -rf $(BUILD)
