# lossgeom: two commands on a fresh machine.
#   make demo   -- set up .venv, train a small model on sklearn digits, probe it
#   make test   -- set up .venv, run the test suite (fast tests only)
# TORCH_SPEC picks the torch build (default: the CPU wheel on this machine's disk).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lossgeom-installed
OUT ?= demo-out

.PHONY: demo test test-slow lint bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lossgeom demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/hvp.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
