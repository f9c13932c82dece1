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

# Quickstart on bundled data: train a multi-exit LeNet on MNIST-5k and calibrate its
# exits, export it as a TFLite bundle (parity + GPU-op check), then benchmark the
# bundle with the LiteRT runtime on the test split and on video streams.
# Re-running resumes from (or re-reports) the workdir and re-exports the bundle.
demo: $(STAMP)
	$(BIN)/python -m train.multi_exit --config=configs/mnist_lenet_branchy.py \
	  --workdir=$(RUNS)/demo/lenet_branchy
	$(BIN)/python -m export.bundle --workdir=$(RUNS)/demo/lenet_branchy \
	  --out=$(RUNS)/demo/bundle --overwrite
	$(BIN)/python -m runtime.bench --bundle=$(RUNS)/demo/bundle --data=mnist5k:test \
	  --json=$(RUNS)/demo/bench_test.json
	$(BIN)/python -m runtime.bench --bundle=$(RUNS)/demo/bundle --data=video:mnist5k \
	  --json=$(RUNS)/demo/bench_video.json

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

# MCDNN: build the catalog (variants per task, exported + measured, sharing, specialization,
# a day of AMS), then schedule the day again through the runtime, executing 200 sampled
# requests for real. Re-running resumes the finished variants.
.PHONY: catalog
catalog: $(STAMP)
	$(BIN)/python -m train.catalog --config=configs/mnist_catalog.py --workdir=$(RUNS)/catalog
	$(BIN)/python -m runtime.ams --bundle=$(RUNS)/catalog --trace=$(RUNS)/catalog/trace.json \
	  --json=$(RUNS)/catalog/ams_cli.json --execute=200
