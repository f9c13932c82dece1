"""Edgent on the 5-exit AlexNet (MNIST-5k): an emulated 20x slower device and an edge box.

  python -m train.edgent --config=configs/mnist_edgent.py --workdir=runs/edgent
  python -m train.edgent --config=configs/mnist_edgent.py:smoke --workdir=/tmp/edgent

The network and its training are configs/mnist_alexnet_branchy.py (`model_config`).
Both machines run here: the device is one core slowed 20x in CPU time (about a
Raspberry Pi 3 against one desktop core), the edge one core; 2 edge servers
(gRPC on 127.0.0.1) answer the device client, and the bandwidth between them is
emulated in the client's transport. The benchmark reproduces the paper's three
experiments: exit and partition vs bandwidth (deadline 10 ms), Edgent vs its
baselines vs deadline (2 Mbps), and a fluctuating bandwidth trace.
"""

from flexjax.config import edgent_defaults


def get_config(arg: str | None = None):
    config = edgent_defaults()
    config.model_config = "configs/mnist_alexnet_branchy.py"
    config.export.parity_examples = 1000
    config.sweep.size = "full"
    config.device.target = "local:threads=1:slowdown=20"
    config.device.runs = 10
    config.edge.target = "local:threads=1"
    config.edge.runs = 20
    config.bench.servers = 2
    config.bench.frames = 200
    config.bench.margin = 0.15  # headroom against the noise of a shared VM (Edgent uses 0)
    config.bench.deadline_ms = 10.0
    config.bench.bandwidths = ()  # runtime.edgent_bench.BANDWIDTHS: 0.05 ... 10 Mbps
    config.bench.bandwidth_mbps = 2.0
    config.bench.deadlines = ()  # runtime.edgent_bench.DEADLINES: 2 ... 20 ms
    config.bench.trace_frames = 1000
    if arg == "smoke":  # the end-to-end test: every stage, a few seconds each
        # The BranchyNet LeNet (2 exits, 11 exit/partition options) trains and exports in
        # half the time of the 5-exit AlexNet; tests/test_edgent_system.py covers the AlexNet.
        config.model_config = "configs/mnist_lenet_branchy.py:smoke"
        config.export.parity_examples = 40
        config.export.epsilons = (0.01,)
        config.sweep.size = "smoke"
        config.device.target = "local:threads=1:slowdown=5"
        config.device.runs = 3
        config.edge.runs = 3
        config.bench.servers = 1
        config.bench.frames = 8
        config.bench.deadline_ms = 40.0
        config.bench.bandwidths = (0.5, 10.0)
        config.bench.deadlines = (10.0, 40.0)
        config.bench.policies = ("edgent", "device-only", "edge-only")
        config.bench.trace_frames = 20
        config.bench.trace_seconds = 2.0
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
