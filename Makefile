# One command per workflow; see README.md.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned in exactly one place; override e.g. `make install TORCH_SPEC='torch==2.6.0'`.
TORCH_SPEC ?= torch==2.13.0
# Optional index for the torch wheel only, e.g. https://download.pytorch.org/whl/cpu
# on CPU-only cluster nodes (PyPI's Linux torch is a multi-GB CUDA build).
TORCH_INDEX_URL ?=
SAFETY_GYMNASIUM_SPEC ?= safety-gymnasium==1.0.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Two test processes: most tests wait on Ray start-up and subprocesses, so two
# overlap well on 2 cores; --dist loadfile keeps each file in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: install test test-fast lint format train reproduce results bench bench-fsrl bench-scaling clean

# `make train`: CVPO on SafetyPointGoal1-v0 with local Ray and all local cores,
# about 10 minutes here; progress every iteration, a checkpoint and a PNG.
TRAIN_ENV ?= SafetyPointGoal1-v0
TRAIN_SECONDS ?= 540
TRAIN_DIR ?= results/train
NPROC := $(shell nproc 2>/dev/null || echo 2)
TRAIN_RUNNERS ?= $(shell echo $$(( $(NPROC) > 1 ? $(NPROC) - 1 : 1 )))

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(if $(strip $(TORCH_INDEX_URL)),--index-url $(TORCH_INDEX_URL)) '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[test]' '$(TORCH_SPEC)'
	$(PIP) install -q --no-deps '$(SAFETY_GYMNASIUM_SPEC)'
	$(PY) -c 'import importlib.util as u, cvpo, rllib_ext, cvxpy, ray, torch; assert u.find_spec("safety_gymnasium"); print("installed: ray", ray.__version__, "torch", torch.__version__, "cvxpy", cvxpy.__version__)'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

train: $(STAMP)
	$(VENV)/bin/rllib train --algo CVPO --env $(TRAIN_ENV) \
	  --config '{"num_env_runners": $(TRAIN_RUNNERS), "num_envs_per_env_runner": 4, "cost_limit": 25.0, "seed": 0, "evaluation_interval": 20, "evaluation_duration": 5}' \
	  --stop '{"time_total_s": $(TRAIN_SECONDS)}' \
	  --storage-path $(abspath $(TRAIN_DIR)) --experiment-name cvpo-make-train \
	  --plot $(TRAIN_DIR)/progress.png

# `make reproduce TASK=SafetyPointGoal1-v0 SEEDS="0 1 2" [ALGO=CVPO] [STEPS=N]`: trains the
# tuned example for the task's env-step budget per seed, evaluates the final and best
# feasible checkpoints, and rewrites tuned_examples/cvpo/RESULTS.md and the curve PNGs.
TASK ?= SafetyPointGoal1-v0
SEEDS ?= 0
ALGO ?= CVPO
STEPS ?=
reproduce: $(STAMP)
	$(PY) -m rllib_ext.reproduce --task $(TASK) --algo $(ALGO) --seed $(SEEDS) $(if $(strip $(STEPS)),--steps $(STEPS))

# Rebuild RESULTS.md and the curve PNGs from the recorded runs (no training).
results: $(STAMP)
	$(PY) -m rllib_ext.reproduce --write-only

bench: $(STAMP)
	$(PY) benchmarks/estep.py --quick
	$(PY) benchmarks/env_speed.py
	$(PY) benchmarks/learner.py --threads 1
	$(PY) benchmarks/learner.py --reward-critics 2 --threads 1
	$(PY) benchmarks/learner.py
	$(PY) benchmarks/throughput.py --quick

# `make bench-fsrl [BENCH_FSRL_ARGS=--quick]`: FSRL's CVPO (the reference, in its own venv
# .bench/fsrl-venv, built from FSRL_BENCH_DIR/install.sh on first use) and ours, learner and
# end to end, alternately in one run; the last line is JSON with the ratios (ours / FSRL).
# Save a run with BENCH_FSRL_ARGS="--out docs/measurements/vs_fsrl_<date>_N.json", then
# `$(PY) benchmarks/vs_fsrl.py --table docs/measurements/vs_fsrl_*.json --write-readme README.md`
# rewrites the README's speed table from the saved documents.
FSRL_BENCH_DIR ?= ../shared/bench/fsrl
BENCH_FSRL_ARGS ?=
bench-fsrl: $(STAMP)
	$(PY) benchmarks/vs_fsrl.py --fsrl-dir $(FSRL_BENCH_DIR) $(BENCH_FSRL_ARGS)

# `make bench-scaling`: measures the scaling model's inputs here, checks it at N = 1, 2 and
# rewrites its block in docs/performance.md (N = 8, 32, 128, CPU and GPU learner).
BENCH_SCALING_ARGS ?=
bench-scaling: $(STAMP)
	$(PY) benchmarks/scaling_model.py --measure --write docs/performance.md $(BENCH_SCALING_ARGS)

LINT_PATHS = src rllib_ext tests benchmarks cluster tuned_examples
# `make lint` checks what `make format` writes (pyproject.toml: line length 100, pyupgrade);
# tests/test_architecture.py runs the same checks in `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
