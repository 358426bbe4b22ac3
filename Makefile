# Two commands for a fresh machine: `make demo` (the whole pipeline on the bundled sample) and `make test`.
# `make install` builds .venv once; it re-runs only when the package metadata changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@# Without CUDA, take the CPU wheel first; an unpinned torch would pull gigabytes of CUDA libraries.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: install
	$(PY) -m rlhf pipeline --config configs/tiny/pipeline.yaml --output runs/demo

test: install
	$(PY) -m pytest -q -rs --durations=15

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
