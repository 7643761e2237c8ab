# lossgeom: two commands on a fresh machine.
#   make demo   -- set up .venv, run the batch-size study at demo size (2 batch sizes x
#                  3 seeds on sklearn digits), test H1, write demo-out/report.html
#   make test   -- set up .venv, run the test suite (fast tests only)
# TORCH_SPEC picks the torch build (default: the CPU wheel pinned below; a bare
# 'torch' requirement would pull a multi-GB CUDA build).

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

# The peers the tests compare with (curvlinops' K-FAC), installed without their
# dependencies, which would replace torch; LOSSGEOM_REQUIRE_PEERS=1 makes the
# comparison fail rather than skip when they are missing.
PEERS_STAMP := $(VENV)/.lossgeom-peers

$(PEERS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(BENCH_PEERS)
	touch $(PEERS_STAMP)

test: $(STAMP) $(PEERS_STAMP)
	LOSSGEOM_REQUIRE_PEERS=1 $(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# The speed benchmarks of the README, each writing benchmarks/results/*.json.
# spectra.py compares with PyHessian and curvlinops: installed without their
# dependencies, which would replace torch. slices.py compares with loss-landscapes
# when it is installed and skips it otherwise.
BENCH_PEERS := pyhessian curvlinops-for-pytorch backpack-for-pytorch einops einconv \
	linear_operator opt-einsum jaxtyping

# One torch thread by default, as the recorded CPU numbers were taken: on a small
# machine a second thread competes with everything else and slows small models.
BENCH_THREADS ?= 1
BENCH := OMP_NUM_THREADS=$(BENCH_THREADS) $(PY)

bench: $(PEERS_STAMP)
	$(BENCH) benchmarks/hvp.py
	$(BENCH) benchmarks/spectra.py
	$(BENCH) benchmarks/slices.py --threads $(BENCH_THREADS)
	$(BENCH) benchmarks/gradient_noise.py --threads $(BENCH_THREADS)
	$(BENCH) benchmarks/train_callbacks.py
	$(BENCH) benchmarks/cost_curve.py --threads $(BENCH_THREADS)
	$(PY) benchmarks/plot_cost_curve.py
	$(PY) benchmarks/study.py
	$(BENCH) benchmarks/kfac.py --threads $(BENCH_THREADS)
	$(PY) benchmarks/speed_table.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
