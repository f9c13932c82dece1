"""AMS catalogs: the options (device variants, cloud) of every app, as measured."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from runtime import args as args_lib
from runtime.names import CATALOG_FILE

DEVICE, CLOUD = "device", "cloud"  # where an option runs


class AmsError(ValueError):
    """Bad catalog, budgets or arguments (a clear, one-line message)."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One way to serve an app: a variant run at a location, with its costs per request."""

    app: str
    variant: str
    location: str
    accuracy: float
    energy_j: float  # battery energy per request (run on device, or transfer to cloud)
    latency_ms: float
    money: float  # cloud cost per request
    mem_bytes: int  # cache space on the device (0 in the cloud)
    load_ms: float  # to load into the cache (device only)
    load_energy_j: float

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.app, self.variant, self.location)


class Catalog(NamedTuple):
    """Per app, every option; plus the names of the original and the knee variant."""

    options: Mapping[str, tuple[Option, ...]]
    original: Mapping[str, str]
    path: str
    raw: Mapping[str, Any]

    @property
    def apps(self) -> tuple[str, ...]:
        return tuple(self.options)

    def device(self, app: str, variant: str) -> Option:
        for o in self.options[app]:
            if o.variant == variant and o.location == DEVICE:
                return o
        raise AmsError(f"app {app!r} has no device variant {variant!r}")


def _num(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise AmsError(f"{what} must be a non-negative number, got {v!r}")
    return float(v)


def load_catalog(path: str, *, cloud: bool = True) -> Catalog:
    """Reads ``catalog.json`` (a directory or the file) into options per app.

    Device options come from the measured costs of each variant; cloud options
    (if the catalog has a ``cloud`` section and `cloud`) cost the transfer
    energy of one frame, the round trip plus the variant's time divided by the
    cloud's speed-up, and money per request.
    """
    file = os.path.join(path, CATALOG_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CATALOG_FILE} at {path} (run python -m train.catalog)")
    try:
        raw = args_lib.read_json(file, "dict", "catalog")
    except ValueError as e:  # empty, not UTF-8, not JSON, not an object
        raise AmsError(str(e)) from None
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    if not isinstance(tasks, dict) or not tasks:
        raise AmsError(f"{file} has no 'tasks' section")
    cl = raw.get("cloud") or {}
    options: dict[str, tuple[Option, ...]] = {}
    original: dict[str, str] = {}
    if cloud and cl.get("enabled", False):
        missing = [k for k in ("energy_per_request_j", "rtt_ms", "speedup", "money_per_request")
                   if k not in cl]  # fmt: skip
        if missing:
            raise AmsError(f"{file}: the cloud section is missing {missing}")
    for app, task in tasks.items():
        variants = task.get("variants") if isinstance(task, dict) else None
        if not isinstance(variants, list) or not variants:
            raise AmsError(f"{file}: task {app!r} has no variants")
        opts = []
        for v in variants:
            if not isinstance(v, dict):
                raise AmsError(f"{file}: task {app!r} has a variant that is not an object")
            where = f"{file}: {app}/{v.get('name')}"
            try:
                dev = Option(
                    app, str(v["name"]), DEVICE, _num(v["accuracy"], f"{where} accuracy"),
                    _num(v["energy_run_j"], f"{where} energy_run_j"),
                    _num(v["latency_ms"], f"{where} latency_ms"), 0.0,
                    int(_num(v["bytes"], f"{where} bytes")),
                    _num(v["load_ms"], f"{where} load_ms"),
                    _num(v["energy_load_j"], f"{where} energy_load_j"),
                )  # fmt: skip
            except KeyError as e:
                raise AmsError(f"{where}: missing field {e}") from None
            opts.append(dev)
            if cloud and cl.get("enabled", False):
                opts.append(
                    dataclasses.replace(
                        dev,
                        location=CLOUD,
                        energy_j=_num(cl["energy_per_request_j"], "cloud.energy_per_request_j"),
                        latency_ms=_num(cl["rtt_ms"], "cloud.rtt_ms")
                        + dev.latency_ms / max(_num(cl["speedup"], "cloud.speedup"), 1e-9),
                        money=_num(cl["money_per_request"], "cloud.money_per_request")
                        + _num(cl.get("money_per_gflop", 0.0), "cloud.money_per_gflop")
                        * float(v.get("flops", 0)) / 1e9,
                        mem_bytes=0, load_ms=0.0, load_energy_j=0.0,
                    )
                )  # fmt: skip
        options[app] = tuple(opts)
        original[app] = str(task.get("original", variants[0]["name"]))
    return Catalog(options, original, os.path.dirname(os.path.abspath(file)), raw)


def knee(options: Sequence[Option]) -> Option:
    """The knee of the energy/accuracy Pareto front (MCDNN's "Best Model").

    The front's point farthest *above* the chord joining its cheapest and its
    most accurate end (both axes normalised to [0, 1]): the most accuracy
    gained per energy spent. A point below the chord is no knee (the front
    bends the other way there); if no point is above it, the most accurate end.
    """
    front = pareto(options)
    if len(front) <= 2:
        return front[-1]
    e = np.array([o.energy_j for o in front])
    a = np.array([o.accuracy for o in front])
    en = (e - e[0]) / max(e[-1] - e[0], 1e-12)
    an = (a - a[0]) / max(a[-1] - a[0], 1e-12)
    height = an - en  # signed height above the diagonal chord (up to a constant)
    i = int(np.argmax(height))
    return front[i] if height[i] > 0 else front[-1]


def pareto(options: Sequence[Option]) -> list[Option]:
    """Device options not dominated in (energy, accuracy), cheapest first."""
    dev = sorted(
        (o for o in options if o.location == DEVICE), key=lambda o: (o.energy_j, -o.accuracy)
    )
    front: list[Option] = []
    for o in dev:
        if not front or o.accuracy > front[-1].accuracy:
            front.append(o)
    return front
