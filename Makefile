# The two commands a user runs on a fresh machine:
#   make demo   real Fashion-MNIST experiment (teacher, student, AT, KD, AT+KD) with a result table
#   make test   the checks (lint, format, types, import layers) and the test suite
# Both create the virtual environment and fetch the offline Fashion-MNIST files if needed.
# Also: make lint (the checks alone), make fmt (fix what ruff can, format), make docs (the API
# reference in docs/_build/html).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
WORKDIR ?= runs/demo

.PHONY: demo test lint fmt docs data bench clean

SOURCES := at_jax configs experiments tests examples benchmarks docs/conf.py

# The tests also read PyTorch-written checkpoints (at_jax.convert): TORCH is the pip requirement
# for them (here, the CPU wheel on local disk). `make test TORCH=` leaves torch out: those tests
# are then skipped.
TORCH ?= torch==2.13.0

# What the demo needs (the package and matplotlib); the tests and checks add the dev extras.
$(VENV)/.base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[viz]'
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.torch: $(VENV)/.installed
	$(if $(TORCH),$(PY) -m pip install -q '$(TORCH)')
	touch $@

# Debian's dataset-fashion-mnist package ships the real Fashion-MNIST IDX files.
$(FMNIST):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'" \
	       "or set FMNIST_DIR to a folder with the IDX files"; exit 1; \
	fi

data: $(FMNIST)

test: lint $(VENV)/.torch $(FMNIST)
	AT_JAX_REQUIRE_TORCH=$(if $(TORCH),1,) $(PY) -m pytest -q -n auto --dist worksteal tests

# ruff (lint and format), mypy, and the import layers of pyproject.toml (import-linter)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(SOURCES)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix $(SOURCES)
	$(VENV)/bin/ruff format $(SOURCES)

# The API reference (Sphinx: autodoc, napoleon, MyST); warnings are errors
docs: $(VENV)/.installed
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

demo: $(VENV)/.base $(FMNIST)
	$(PY) -m experiments.demo --workdir $(WORKDIR) --data_dir $(FMNIST_DIR)

bench: $(VENV)/.base
	$(PY) -m at_jax.bench --student wrn-16-1 --teacher wrn-16-2 --method at --batch 128 --steps 50

clean:
	rm -rf $(VENV) runs docs/_build
