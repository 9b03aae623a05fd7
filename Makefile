# One command per workflow; see README.md.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned in exactly one place; override e.g. `make install TORCH_SPEC='torch==2.6.0'`.
TORCH_SPEC ?= torch==2.13.0
SAFETY_GYMNASIUM_SPEC ?= safety-gymnasium==1.0.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test lint train bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[test]' '$(TORCH_SPEC)'
	$(PIP) install -q --no-deps '$(SAFETY_GYMNASIUM_SPEC)'
	$(PY) -c 'import importlib.util as u, cvpo, rllib_ext, cvxpy, ray, torch; assert u.find_spec("safety_gymnasium"); print("installed: ray", ray.__version__, "torch", torch.__version__, "cvxpy", cvxpy.__version__)'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src rllib_ext tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
