# The two commands a user runs on a fresh machine:
#   make demo   real Fashion-MNIST experiment (teacher, student, AT, KD, AT+KD) with a result table
#   make test   the test suite
# Both create the virtual environment and fetch the offline Fashion-MNIST files if needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
WORKDIR ?= runs/demo

.PHONY: demo test data bench clean

# The tests also read PyTorch-written checkpoints (at_jax.convert): TORCH is the pip requirement
# for them (here, the CPU wheel on local disk). `make test TORCH=` leaves torch out: those tests
# are then skipped.
TORCH ?= torch==2.13.0

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
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

test: $(VENV)/.installed $(VENV)/.torch $(FMNIST)
	AT_JAX_REQUIRE_TORCH=$(if $(TORCH),1,) $(PY) -m pytest -q tests

demo: $(VENV)/.installed $(FMNIST)
	$(PY) -m experiments.demo --workdir $(WORKDIR) --data_dir $(FMNIST_DIR)

bench: $(VENV)/.installed
	$(PY) -m at_jax.bench --student wrn-16-1 --teacher wrn-16-2 --method at --batch 128 --steps 50

clean:
	rm -rf $(VENV) runs
