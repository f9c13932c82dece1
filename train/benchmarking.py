"""What the training benchmarks share: loading configs with overrides, naming the CPU."""

from __future__ import annotations

import ast
import importlib.util
import os
import platform

from flexjax import config as config_lib


def load_config(spec: str, overrides: list[str]):
    """The validated config of ``path[:arg]`` with ``key=value`` overrides applied."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ValueError(f"unknown config key {key!r} in --set")
            node = node[name]
        if leaf not in node and parents != ["model", "kwargs"]:
            raise ValueError(f"unknown config key {key!r} in --set")
        node[leaf] = value
    return config_lib.validate(config)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a benchmark report says about the machine it ran on."""
    return {"cpus": os.cpu_count(), "processor": cpu_model(), "python": platform.python_version()}
