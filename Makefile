# The README's two commands: `make demo` and `make test`. Both work on a fresh machine with only python3.
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
NVCC ?= nvcc
CSRC := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu' -o -name '*.json' \))
CU := $(wildcard csrc/cuda/*.cu)
BUILD_STAMP := onp_fast/.build-stamp

.PHONY: demo test build cuda-check bench pytest clean

demo: build
	$(VENV)/bin/onp-fast demo

test: build cuda-check pytest

pytest: build
	$(PY) -m pytest -q tests

bench: build
	$(VENV)/bin/onp-fast bench

$(PY):
	python3 -m venv $(VENV)

# torch first, from TORCH_SPEC, so pip never resolves a CUDA torch for us.
$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	touch $@

# Registers the package (editable) and its dependencies; builds the extension once.
$(VENV)/.installed: pyproject.toml setup.py $(VENV)/.torch
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@
	touch $(BUILD_STAMP)

# Incremental rebuild (ninja) when a C++/CUDA source changed since the install built it. flock: one build at a time.
$(BUILD_STAMP): $(CSRC) setup.py | $(VENV)/.installed
	@if [ -z "$$(ls onp_fast/_C*.so 2>/dev/null)" ] || [ -n "$$(find $(CSRC) setup.py -newer $(VENV)/.installed)" ]; then \
	  echo "building onp_fast._C"; flock .build.lock $(PY) setup.py -q build_ext --inplace; fi
	touch $@

build: $(BUILD_STAMP)

# Compiles every CUDA kernel with nvcc (kernels take raw pointers, no torch headers).
cuda-check:
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  flags=$$($(PY) -c "import json; print(' '.join(json.load(open('csrc/build.json'))['nvcc_check_flags'] + json.load(open('csrc/build.json'))['nvcc_flags']))"); \
	  tmp=$$(mktemp -d); ok=1; \
	  for f in $(CU); do $(NVCC) -c $$flags -Icsrc $$f -o $$tmp/$$(basename $$f).o || ok=0; done; \
	  rm -rf $$tmp; [ $$ok = 1 ] && echo "cuda-check: nvcc compiled $(words $(CU)) kernel file(s)"; [ $$ok = 1 ]; \
	else echo "cuda-check: nvcc not found, CUDA kernels not compiled"; fi

clean:
	rm -rf build onp_fast/_C*.so $(BUILD_STAMP) *.egg-info
