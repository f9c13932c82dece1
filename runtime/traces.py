"""Request traces for AMS: a day of classification requests from several apps.

  python -m runtime.traces --apps=digit,parity,ge5 --out=trace.json [--hours=10] \\
      [--mean-rate=1.0] [--bursts=12] [--seed=0]

A trace is ``{"day_s": D, "apps": [...], "t": [...], "app": [...]}`` with
times in seconds from the start of the day (sorted) and one app name per
request. `make_day` draws a non-homogeneous Poisson process per app (by
thinning) whose rate changes the way a phone's camera apps are used:

* **sessions**: the day is cut into 20-minute slots; in each slot an app is
  in use with a per-app probability, at a rate drawn around its base rate
  (so the mix of apps and their frequencies change through the day);
* **a slow drift**: every rate is modulated by a slow sinusoid (period of a
  few hours, per-app phase);
* **bursts**: short episodes (30-120 s) where one app fires at 5-10x its base
  rate (someone points the camera at a crowd).

numpy only, reproducible from the seed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from runtime import args as args_lib

# Caps: make_day draws ~60x its expected requests as candidates (thinning), all in memory.
MAX_HOURS = 24.0 * 7
MAX_REQUESTS = 500_000
MAX_BURSTS = 10_000


class TraceError(ValueError):
    """A malformed trace (negative/unsorted times, unknown apps, bad shape)."""


class Trace(NamedTuple):
    day_s: float
    apps: tuple[str, ...]
    t: np.ndarray  # [N] float64 seconds, sorted
    app: np.ndarray  # [N] int index into apps

    def __len__(self) -> int:
        return int(self.t.size)

    def to_dict(self) -> dict:
        return {
            "day_s": float(self.day_s),
            "apps": list(self.apps),
            "t": [round(float(x), 4) for x in self.t],
            "app": [self.apps[i] for i in self.app],
        }

    def counts(self) -> dict[str, int]:
        return {a: int((self.app == i).sum()) for i, a in enumerate(self.apps)}


def make_day(
    apps: Sequence[str],
    *,
    hours: float = 10.0,
    mean_rate: float = 1.0,
    bursts: int = 12,
    slot_s: float = 1200.0,
    seed: int = 0,
) -> Trace:
    """A synthetic day (see the module docstring); `mean_rate` is total requests/s on average."""
    if not apps or len(set(apps)) != len(apps):
        raise TraceError(f"apps must be distinct names, got {list(apps)}")
    values = (hours, mean_rate, slot_s)
    if not all(math.isfinite(v) and v > 0 for v in values) or not 0 <= bursts <= MAX_BURSTS:
        raise TraceError(
            f"hours, mean_rate and slot_s must be finite and > 0 and bursts in [0, {MAX_BURSTS}]"
        )
    if hours > MAX_HOURS or hours * 3600.0 * mean_rate > MAX_REQUESTS:
        raise TraceError(
            f"a trace of {hours} h at {mean_rate} requests/s is too long: at most {MAX_HOURS} h "
            f"and {MAX_REQUESTS} requests (hours x 3600 x mean_rate)"
        )
    rng = np.random.default_rng(seed)
    day = hours * 3600.0
    n_apps = len(apps)
    base = rng.dirichlet(np.full(n_apps, 2.0)) * mean_rate
    use_p = rng.uniform(0.4, 0.9, n_apps)
    n_slots = int(math.ceil(day / slot_s))
    active = rng.random((n_slots, n_apps)) < use_p
    level = rng.lognormal(0.0, 0.5, (n_slots, n_apps)) * active
    level /= max(level.mean(axis=0).mean(), 1e-9)  # keep the mean near mean_rate
    period = rng.uniform(2.0, 5.0, n_apps) * 3600.0
    phase = rng.uniform(0, 2 * math.pi, n_apps)
    burst_app = rng.integers(0, n_apps, bursts)
    burst_t0 = rng.uniform(0, day, bursts)
    burst_len = rng.uniform(30.0, 120.0, bursts)
    burst_mult = rng.uniform(5.0, 10.0, bursts)

    def rate(a: int, t: np.ndarray) -> np.ndarray:
        slot = np.minimum((t // slot_s).astype(int), n_slots - 1)
        r = base[a] * level[slot, a] * (1.0 + 0.5 * np.sin(2 * math.pi * t / period[a] + phase[a]))
        for b in np.flatnonzero(burst_app == a):
            inside = (t >= burst_t0[b]) & (t < burst_t0[b] + burst_len[b])
            r = np.where(inside, np.maximum(r, base[a]) * burst_mult[b], r)
        return r

    ts, idx = [], []
    for a in range(n_apps):
        r_max = base[a] * max(level[:, a].max(), 1.0) * 1.5 * max(burst_mult.max(), 1.0)
        n = rng.poisson(r_max * day)
        cand = np.sort(rng.uniform(0, day, n))
        keep = rng.random(n) * r_max < rate(a, cand)
        ts.append(cand[keep])
        idx.append(np.full(int(keep.sum()), a))
    t = np.concatenate(ts)
    order = np.argsort(t, kind="stable")
    return Trace(day, tuple(apps), t[order], np.concatenate(idx)[order].astype(np.int64))


def from_dict(d: object, known_apps: Sequence[str] | None = None) -> Trace:
    """Validates a trace dict.

    Raises:
      TraceError: missing fields, negative or non-finite times, times past the
        end of the day, mismatched lengths, or apps not in `known_apps`.
    """
    if not isinstance(d, dict):
        raise TraceError(f"a trace must be a JSON object, got {type(d).__name__}")
    missing = [k for k in ("day_s", "t", "app") if k not in d]
    if missing:
        raise TraceError(f"trace is missing field(s) {missing}; expected day_s, t, app")
    try:
        t = np.asarray(d["t"], np.float64).reshape(-1)
        day = float(d["day_s"])
    except (TypeError, ValueError) as e:
        raise TraceError(f"trace times must be numbers: {e}") from None
    if not isinstance(d["app"], list) or not isinstance(d.get("apps", []), list):
        raise TraceError("trace fields app and apps must be lists of app names")
    names = [str(a) for a in d["app"]]
    if len(names) != t.size:
        raise TraceError(f"trace has {t.size} times but {len(names)} app names")
    if not math.isfinite(day) or day <= 0:
        raise TraceError(f"trace day_s must be > 0, got {d['day_s']!r}")
    if t.size and not np.isfinite(t).all():
        raise TraceError("trace times must be finite")
    if t.size and t.min() < 0:
        i = int(np.argmin(t))
        raise TraceError(f"trace has a negative time {t[i]} (request {i}); times start at 0")
    if t.size and t.max() > day:
        raise TraceError(f"trace time {t.max()} is past the end of the day ({day} s)")
    apps = tuple(d.get("apps") or sorted(set(names)))
    unknown = sorted(set(names) - set(apps))
    if known_apps is not None:
        unknown = sorted(set(names) - set(known_apps))
        apps = tuple(known_apps)
    if unknown:
        raise TraceError(
            f"trace has requests for unknown app(s) {unknown}; known: {', '.join(apps)}"
        )
    pos = {a: i for i, a in enumerate(apps)}
    idx = np.array([pos[a] for a in names], np.int64)
    order = np.argsort(t, kind="stable")
    return Trace(day, apps, t[order], idx[order])


def load(path: str, known_apps: Sequence[str] | None = None) -> Trace:
    """Reads and validates a trace JSON file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trace {path} does not exist")
    try:
        d = args_lib.read_json(path, "dict", "trace")
    except ValueError as e:  # empty, not UTF-8, not JSON, not an object
        raise TraceError(str(e)) from None
    return from_dict(d, known_apps)


def save(trace: Trace, path: str) -> None:
    """Writes the trace atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(trace.to_dict(), f)
    os.replace(tmp, path)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.traces`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.traces", description=__doc__.split("\n")[0])
    p.add_argument("--apps", required=True, help="comma-separated app names")
    p.add_argument("--out", required=True, type=args_lib.output_file())
    p.add_argument("--hours", type=args_lib.positive(MAX_HOURS), default=10.0)
    p.add_argument("--mean-rate", type=args_lib.positive(1000.0), default=1.0,
                   help="requests per second")  # fmt: skip
    p.add_argument("--bursts", type=args_lib.count(0, MAX_BURSTS), default=12)
    p.add_argument("--seed", type=args_lib.seed(), default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    apps = [a for a in args.apps.split(",") if a]
    tr = make_day(
        apps, hours=args.hours, mean_rate=args.mean_rate, bursts=args.bursts, seed=args.seed
    )
    save(tr, args.out)
    print(f"{len(tr)} requests over {tr.day_s / 3600:.1f} h: {tr.counts()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
