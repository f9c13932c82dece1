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

# Edgent (device-edge co-inference) on the 5-exit AlexNet: train, export with partition
# signatures, profile a latency sweep on the emulated device (1 thread, 20x slower) and the
# edge (1 thread), fit the per-layer regressions into the bundle, then benchmark co-inference
# against real gRPC edge servers (bandwidth sweep, deadline sweep vs baselines, fluctuating trace).
EDGENT ?= $(RUNS)/edgent
.PHONY: edgent
edgent: $(STAMP)
	$(BIN)/python -m train.multi_exit --config=configs/mnist_alexnet_branchy.py --workdir=$(EDGENT)/alexnet
	$(BIN)/python -m export.bundle --workdir=$(EDGENT)/alexnet --out=$(EDGENT)/bundle --partitions --overwrite
	$(BIN)/python -m export.sweep --out=$(EDGENT)/sweep --overwrite
	$(BIN)/python -m runtime.profile --bundle=$(EDGENT)/sweep --target=local:threads=1 --out=$(EDGENT)/edge_sweep.json
	$(BIN)/python -m runtime.profile --bundle=$(EDGENT)/bundle --target=local:threads=1 --out=$(EDGENT)/edge_parts.json
	$(BIN)/python -m runtime.profile --bundle=$(EDGENT)/sweep --target=local:threads=1:slowdown=20 --runs=10 --out=$(EDGENT)/dev_sweep.json
	$(BIN)/python -m runtime.profile --bundle=$(EDGENT)/bundle --target=local:threads=1:slowdown=20 --runs=10 --out=$(EDGENT)/dev_parts.json
	$(BIN)/python -m export.latency_fit --bundle=$(EDGENT)/bundle --device=$(EDGENT)/dev_sweep.json \
	  --edge=$(EDGENT)/edge_sweep.json --device-paths=$(EDGENT)/dev_parts.json \
	  --edge-paths=$(EDGENT)/edge_parts.json --report=$(EDGENT)/fit.json
	$(BIN)/python -m runtime.edgent_bench --bundle=$(EDGENT)/bundle --out=$(EDGENT)/bench --margin=0.15

# MCDNN: build the catalog (variants per task, exported + measured, sharing, specialization,
# a day of AMS), then schedule the day again through the runtime, executing 200 sampled
# requests for real. Re-running resumes the finished variants.
.PHONY: catalog
catalog: $(STAMP)
	$(BIN)/python -m train.catalog --config=configs/mnist_catalog.py --workdir=$(RUNS)/catalog
	$(BIN)/python -m runtime.ams --bundle=$(RUNS)/catalog --trace=$(RUNS)/catalog/trace.json \
	  --json=$(RUNS)/catalog/ams_cli.json --execute=200
