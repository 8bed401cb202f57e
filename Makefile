# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch 2.13.0 (CPU build) is on the machines' disk; pip takes it from there.
TORCH  := torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: demo test lint bench readme venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,deploy]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sepconv demo --out demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks tools

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,deploy,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks

# every console output in README.md, regenerated from the shipped code (run on an idle machine)
readme: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) tools/readme_outputs.py

clean:
	rm -rf $(VENV) demo runs
