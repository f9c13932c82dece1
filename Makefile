# Two commands matter: `make demo` (the quickstart / main job) and `make test`.
# Both create .venv if missing and install pinned dependencies first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: demo test lint format clean setup

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[train,dev]"
	touch $(STAMP)

# Quickstart on bundled data: train a multi-exit LeNet on MNIST-5k, calibrate its
# exits, print the per-exit table. Re-running resumes from (or re-reports) the workdir.
demo: $(STAMP)
	$(BIN)/python -m train.multi_exit --config=configs/mnist_lenet_branchy.py \
	  --workdir=$(RUNS)/demo/lenet_branchy

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(RUNS)/demo .pytest_cache
