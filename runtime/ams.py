"""AMS: approximate model scheduling over MCDNN catalogs (numpy + LiteRT only).

  python -m runtime.ams --bundle=CATALOG_DIR --trace=trace.json --json=OUT \\
      [--policies=mcdnn,pace,best_model,original] [--energy-budget=0.12x] \\
      [--memory-mb=2.5] [--money=0] [--latency-ms=50] [--execute=200]

`--bundle` is a catalog directory written by ``train.catalog`` (its
``catalog.json`` lists every app's variants with MEASURED costs; see
`Catalog`). A day of requests (`runtime.traces`) is served by pure policies
``step(state, request) -> (decision, state)``:

* ``mcdnn`` -- MCDNN's Algorithm 1 (Han et al., MobiSys'16): a per-request
  energy budget ``e_n = (e - de_n*T/dt_n) * f_n / (T * sum_{i in cache} f_i^2)``
  (``e`` energy left, ``T`` time left in the day, ``f_i`` request
  frequencies, ``de_n`` the energy app n spent on loads over the ``dt_n``
  seconds since its first request, i.e. reloads projected to the end of the
  day) and the same for cloud
  money; on a cache miss the most accurate option (device variant or cloud)
  within the budgets and the latency limit *including the load*, evicting LRU
  entries to make room; on a hit the cached variant runs and the best option is
  re-picked "in the background" (loaded now, used from the next request), so
  variants grow and shrink with the frequencies.
* ``pace`` -- ours: certainty-equivalent re-solving. Every `resolve_s` it
  estimates each app's remaining requests (blend of the recent and the
  day-average rate times the time left) and prices energy (``lam``) and money
  (``mu``) so that the plan ``argmax acc - lam*energy - mu*money`` (or skip)
  spends exactly what is left; the plan must fit the cache. Requests follow
  the plan; loads are amortized over the app's expected requests.
* ``best_model`` -- one static variant per app, the knee of its
  energy/accuracy Pareto front (MCDNN's "Best Model"), device only.
* ``original`` -- the unapproximated model, device only.

`offline_optimum` solves the day with hindsight as an integer program
(`scipy.optimize.milp`, optional): how many requests of each app each option
serves, which device variants stay resident (load energy once, cache capacity),
the same energy/money/latency budgets; maximizing expected correct answers.
Each policy's regret is measured against it.

A day simulates in about a second. ``--execute=N`` also runs N sampled
requests for real: the policy's loads and evictions are replayed with the
LiteRT interpreter and each sampled request runs its chosen variant's bundle
on a test image of its app (``eval.npz`` in the catalog), so the simulated
accuracy and latency are checked against reality.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from flexjax.io import write_json_atomic
from runtime import traces as traces_lib
from runtime.bundle import Bundle
from runtime.lite import Model
from runtime.names import CATALOG_FILE, FULL

DEVICE, CLOUD = "device", "cloud"


class AmsError(ValueError):
    """Bad catalog, budgets or arguments (a clear, one-line message)."""


# ---------------------------------------------------------------------------
# Catalog.
# ---------------------------------------------------------------------------


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
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise AmsError(f"{file} is not valid JSON: {e}") from None
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

    The front's point farthest from the chord joining its cheapest and its
    most accurate end (both axes normalised to [0, 1]).
    """
    front = pareto(options)
    if len(front) <= 2:
        return front[-1]
    e = np.array([o.energy_j for o in front])
    a = np.array([o.accuracy for o in front])
    en = (e - e[0]) / max(e[-1] - e[0], 1e-12)
    an = (a - a[0]) / max(a[-1] - a[0], 1e-12)
    dist = np.abs(an - en)  # distance to the diagonal chord (up to a constant)
    return front[int(np.argmax(dist))]


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


# ---------------------------------------------------------------------------
# Budgets, requests, decisions, state.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Budgets:
    energy_j: float  # battery energy for the whole day
    memory_bytes: int  # model cache on the device
    money: float  # cloud spend for the whole day
    latency_ms: float  # per request
    day_s: float

    def __post_init__(self):
        for name in ("energy_j", "money", "latency_ms", "day_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise AmsError(f"budget {name} must be a finite number >= 0, got {v}")
        if self.memory_bytes < 0 or self.day_s <= 0:
            raise AmsError("budget memory_bytes must be >= 0 and day_s > 0")


class Request(NamedTuple):
    t: float
    app: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happened to one request."""

    t: float
    app: str
    served: bool
    variant: str | None = None
    location: str | None = None
    accuracy: float = 0.0
    energy_j: float = 0.0  # run/transfer + any load paid for this request
    money: float = 0.0
    latency_ms: float = 0.0
    loaded: tuple[str, ...] = ()  # variants (of this app) loaded while handling it
    evicted: tuple[tuple[str, str], ...] = ()  # (app, variant) evicted
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    app: str
    variant: str
    mem_bytes: int
    last_used: float


@dataclasses.dataclass(frozen=True)
class State:
    """Everything a policy knows; policies return a new one, never mutate."""

    t: float
    energy_left: float
    money_left: float
    cache: tuple[CacheEntry, ...] = ()
    decayed: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    seen: Mapping[str, int] = dataclasses.field(default_factory=dict)
    first_seen: Mapping[str, float] = dataclasses.field(default_factory=dict)
    load_energy: Mapping[str, float] = dataclasses.field(default_factory=dict)
    choice: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    plan_at: float = -math.inf  # pace: when the plan was last solved
    plan: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # pace: in budget
    alt: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # pace: just over
    mix: float = 0.0  # pace: fraction of requests that may follow `alt`
    credit: float = 0.0  # pace: dithering accumulator for `mix`


class Policy(NamedTuple):
    """``init() -> State`` and the pure ``step(state, request) -> (decision, state)``."""

    name: str
    init: Callable[[], State]
    step: Callable[[State, Request], tuple[Decision, State]]


RATE_TAU_S = 300.0  # time constant of the request-frequency estimate


def _observe(state: State, req: Request) -> State:
    c, last = state.decayed.get(req.app, (0.0, req.t))
    c = c * math.exp(-(req.t - last) / RATE_TAU_S) + 1.0
    return dataclasses.replace(
        state,
        t=req.t,
        decayed={**state.decayed, req.app: (c, req.t)},
        seen={**state.seen, req.app: state.seen.get(req.app, 0) + 1},
        first_seen={**state.first_seen, req.app: state.first_seen.get(req.app, req.t)},
    )


def rate(state: State, app: str, t: float) -> float:
    """Recent request frequency of `app` (requests/s, exponentially decayed counts)."""
    c, last = state.decayed.get(app, (0.0, t))
    return c * math.exp(-(t - last) / RATE_TAU_S) / RATE_TAU_S


def _cached(state: State, app: str) -> CacheEntry | None:
    return next((e for e in state.cache if e.app == app), None)


def _touch(state: State, app: str, t: float) -> State:
    return dataclasses.replace(
        state,
        cache=tuple(
            dataclasses.replace(e, last_used=t) if e.app == app else e for e in state.cache
        ),
    )


def _install(
    state: State, opt: Option, capacity: int
) -> tuple[State, tuple[tuple[str, str], ...]] | None:
    """Puts `opt` in the cache (replacing its app's entry), evicting LRU entries to fit.

    Returns None if it cannot fit even in an empty cache.
    """
    if opt.mem_bytes > capacity:
        return None
    cache = [e for e in state.cache if e.app != opt.app]
    evicted = [(e.app, e.variant) for e in state.cache if e.app == opt.app]
    cache.sort(key=lambda e: e.last_used)
    while cache and sum(e.mem_bytes for e in cache) + opt.mem_bytes > capacity:
        e = cache.pop(0)
        evicted.append((e.app, e.variant))
    cache.append(CacheEntry(opt.app, opt.variant, opt.mem_bytes, state.t))
    return dataclasses.replace(state, cache=tuple(cache)), tuple(evicted)


def _run(
    state: State, req: Request, opt: Option, *, load: bool, capacity: int, extra_energy: float = 0.0
) -> tuple[Decision, State]:
    """Executes `opt` for `req` (loading it first if `load`); charges energy and money."""
    energy = opt.energy_j + (opt.load_energy_j if load else 0.0) + extra_energy
    if energy > state.energy_left + 1e-12:
        return Decision(req.t, req.app, False, reason="battery exhausted"), state
    if opt.money > state.money_left + 1e-12:
        return Decision(req.t, req.app, False, reason="cloud money exhausted"), state
    evicted: tuple = ()
    loaded: tuple[str, ...] = ()
    if opt.location == DEVICE:
        if load:
            got = _install(state, opt, capacity)
            if got is None:
                return Decision(req.t, req.app, False, reason="does not fit the cache"), state
            state, evicted = got
            loaded = (opt.variant,)
            state = dataclasses.replace(
                state,
                load_energy={
                    **state.load_energy,
                    opt.app: state.load_energy.get(opt.app, 0.0) + opt.load_energy_j,
                },
            )
        state = _touch(state, opt.app, req.t)
    state = dataclasses.replace(
        state,
        energy_left=state.energy_left - energy,
        money_left=state.money_left - opt.money,
        choice={**state.choice, opt.app: (opt.variant, opt.location)},
    )
    latency = opt.latency_ms + (opt.load_ms if load else 0.0)
    return (
        Decision(
            req.t,
            req.app,
            True,
            opt.variant,
            opt.location,
            opt.accuracy,
            energy,
            opt.money,
            latency,
            loaded,
            evicted,
        ),  # fmt: skip
        state,
    )


def _unknown(req: Request, catalog: Catalog) -> Decision | None:
    if req.app not in catalog.options:
        return Decision(req.t, req.app, False, reason=f"unknown app {req.app!r}")
    return None


# ---------------------------------------------------------------------------
# Policies.
# ---------------------------------------------------------------------------


def _init(budgets: Budgets) -> Callable[[], State]:
    return lambda: State(0.0, budgets.energy_j, budgets.money)


def mcdnn_budgets(state: State, app: str, budgets: Budgets) -> tuple[float, float]:
    """Algorithm 1's per-request energy and money budgets ``(e_n, c_n)`` at ``state.t``."""
    t = state.t
    remaining = max(budgets.day_s - t, 1.0)
    apps = {e.app for e in state.cache} | {app}
    denom = remaining * sum(rate(state, a, t) ** 2 for a in apps)
    f_n = rate(state, app, t)
    if denom <= 0 or f_n <= 0:
        return 0.0, 0.0
    dt_n = max(t - state.first_seen.get(app, t), 1.0)
    reload = state.load_energy.get(app, 0.0) * remaining / dt_n
    e_n = max(state.energy_left - reload, 0.0) * f_n / denom
    c_n = max(state.money_left, 0.0) * f_n / denom
    return e_n, c_n


def _pick(
    options: Sequence[Option], e_n: float, c_n: float, budgets: Budgets, *, with_load: bool
) -> tuple[Option | None, str]:
    """Most accurate option within the budgets (ties: less energy); or why none is."""
    fits = [o for o in options if o.location == CLOUD or o.mem_bytes <= budgets.memory_bytes]
    if not fits:
        return None, f"no variant fits the {budgets.memory_bytes} B cache"

    def lat(o):
        return o.latency_ms + (o.load_ms if with_load and o.location == DEVICE else 0.0)

    fits = [o for o in fits if lat(o) <= budgets.latency_ms]
    if not fits:
        return None, f"no variant meets the {budgets.latency_ms:g} ms latency limit"
    fits = [o for o in fits if o.money <= c_n]
    if not fits:
        return None, "no variant within the cloud-money budget"
    fits = [o for o in fits if o.energy_j <= e_n]
    if not fits:
        return None, f"no variant within the per-request energy budget ({e_n:.2e} J)"
    return max(fits, key=lambda o: (o.accuracy, -o.energy_j, -o.money)), ""


def mcdnn_policy(catalog: Catalog, budgets: Budgets) -> Policy:
    """MCDNN's Algorithm 1 (see the module docstring)."""

    def step(state: State, req: Request) -> tuple[Decision, State]:
        bad = _unknown(req, catalog)
        if bad:
            return bad, state
        state = _observe(state, req)
        opts = catalog.options[req.app]
        e_n, c_n = mcdnn_budgets(state, req.app, budgets)
        chosen = state.choice.get(req.app)
        entry = _cached(state, req.app)
        current = None
        if chosen and chosen[1] == CLOUD:
            current = next(o for o in opts if (o.variant, o.location) == chosen)
        elif entry is not None:
            current = catalog.device(req.app, entry.variant)
        decision = None
        if current is not None:  # hit: run what is cached
            decision, state = _run(state, req, current, load=False, capacity=budgets.memory_bytes)
        if decision is None or not decision.served:
            # miss (or the cached choice can no longer be paid for): pick with the load
            # latency, load, run
            opt, why = _pick(opts, e_n, c_n, budgets, with_load=True)
            if opt is None:
                return Decision(
                    req.t, req.app, False, reason=decision.reason if decision else why
                ), state
            hit = opt.location == CLOUD or (entry is not None and entry.variant == opt.variant)
            return _run(state, req, opt, load=not hit, capacity=budgets.memory_bytes)
        # re-pick in the background for later requests
        better, _ = _pick(opts, e_n, c_n, budgets, with_load=False)
        if better is None or better.key == current.key:
            return decision, state
        if better.location == CLOUD:
            return decision, dataclasses.replace(
                state, choice={**state.choice, req.app: (better.variant, CLOUD)}
            )
        if better.load_energy_j > state.energy_left:
            return decision, state
        got = _install(state, better, budgets.memory_bytes)
        if got is None:
            return decision, state
        state, evicted = got
        state = dataclasses.replace(
            state,
            energy_left=state.energy_left - better.load_energy_j,
            load_energy={
                **state.load_energy,
                req.app: state.load_energy.get(req.app, 0.0) + better.load_energy_j,
            },
            choice={**state.choice, req.app: (better.variant, DEVICE)},
        )
        decision = dataclasses.replace(
            decision,
            energy_j=decision.energy_j + better.load_energy_j,
            loaded=(better.variant,),
            evicted=decision.evicted + evicted,
        )
        return decision, state

    return Policy("mcdnn", _init(budgets), step)


def static_policy(
    catalog: Catalog, budgets: Budgets, variants: Mapping[str, str], name: str
) -> Policy:
    """Always the same device variant per app (loads on a miss, LRU eviction)."""
    chosen = {a: catalog.device(a, v) for a, v in variants.items()}

    def step(state: State, req: Request) -> tuple[Decision, State]:
        bad = _unknown(req, catalog)
        if bad:
            return bad, state
        state = _observe(state, req)
        opt = chosen[req.app]
        if opt.latency_ms > budgets.latency_ms:
            return Decision(req.t, req.app, False, reason="variant misses the latency limit"), state
        hit = _cached(state, req.app) is not None
        return _run(state, req, opt, load=not hit, capacity=budgets.memory_bytes)

    return Policy(name, _init(budgets), step)


def best_model_policy(catalog: Catalog, budgets: Budgets) -> Policy:
    return static_policy(
        catalog, budgets, {a: knee(o).variant for a, o in catalog.options.items()}, "best_model"
    )


def original_policy(catalog: Catalog, budgets: Budgets) -> Policy:
    return static_policy(catalog, budgets, dict(catalog.original), "original")


def _plan(
    catalog: Catalog,
    budgets: Budgets,
    demand: Mapping[str, float],
    energy: float,
    money: float,
) -> tuple[dict[str, Option | None], dict[str, Option | None], float]:
    """Priced plans ``(within, over, mix)`` for the remaining `demand`.

    Per app, the option maximizing ``acc - lam*e - mu*m`` (or none). ``lam``
    is the smallest energy price whose plan (`within`) fits `energy`; `over` is
    the plan just below that price (it overspends), and `mix` the fraction of
    requests that can follow `over` so the expected spend equals `energy` --
    the LP relaxation's mix of two adjacent options. Energy per request
    includes the app's load amortized over its expected requests. ``mu``
    (money) is found the same way inside. The chosen device variants must fit
    the cache together (the least valuable downgrade first).
    """

    def feasible(a):
        return [
            o
            for o in catalog.options[a]
            if o.latency_ms <= budgets.latency_ms
            and (o.location == CLOUD or o.mem_bytes <= budgets.memory_bytes)
        ]

    cands = {a: feasible(a) for a in catalog.apps}

    def eff_e(o, a):
        return o.energy_j + o.load_energy_j / max(demand.get(a, 0.0), 1.0)

    def choose(lam, mu):
        out = {}
        for a, opts in cands.items():
            best, val = None, 0.0
            for o in opts:
                v = o.accuracy - lam * eff_e(o, a) - mu * o.money
                if v > val:
                    best, val = o, v
            out[a] = best
        return out

    def spend(ch, which):
        return sum(
            demand.get(a, 0.0) * (eff_e(o, a) if which == "e" else o.money)
            for a, o in ch.items()
            if o is not None
        )

    def with_mu(lam):
        if spend(choose(lam, 0.0), "m") <= money:
            return choose(lam, 0.0)
        lo, hi = 0.0, 1.0
        while spend(choose(lam, hi), "m") > money and hi < 1e12:
            hi *= 4
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spend(choose(lam, mid), "m") > money else (lo, mid)
        return choose(lam, hi)

    plan = with_mu(0.0)
    over, mix = plan, 0.0
    if spend(plan, "e") > energy:
        lo, hi = 0.0, 1.0
        while spend(with_mu(hi), "e") > energy and hi < 1e15:
            hi *= 4
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spend(with_mu(mid), "e") > energy else (lo, mid)
        plan, over = with_mu(hi), with_mu(lo)
        e_in, e_over = spend(plan, "e"), spend(over, "e")
        mix = (energy - e_in) / (e_over - e_in) if e_over > e_in else 0.0
    return _fit_cache(plan, cands, demand, budgets), _fit_cache(over, cands, demand, budgets), mix


def _fit_cache(
    plan: dict[str, Option | None],
    cands: Mapping[str, Sequence[Option]],
    demand: Mapping[str, float],
    budgets: Budgets,
) -> dict[str, Option | None]:
    """Downgrades the cheapest-to-downgrade app until the plan's device variants fit the cache."""
    plan = dict(plan)
    while sum(o.mem_bytes for o in plan.values() if o) > budgets.memory_bytes:
        moves = []
        for a, o in plan.items():
            if o is None or o.location != DEVICE:
                continue
            smaller = [c for c in cands[a] if c.location == DEVICE and c.mem_bytes < o.mem_bytes]
            if smaller:
                c = max(smaller, key=lambda c: c.accuracy)
                moves.append((demand.get(a, 0.0) * (o.accuracy - c.accuracy), a, c))
            else:
                moves.append((demand.get(a, 0.0) * o.accuracy, a, None))
        _, a, c = min(moves, key=lambda m: m[0])
        plan[a] = c
    return plan


SKIP = "skip"


def pace_policy(catalog: Catalog, budgets: Budgets, resolve_s: float = 60.0) -> Policy:
    """Ours: re-solve the priced plan every `resolve_s` (see the module docstring).

    The plans live in the state (app -> (variant, location), location
    ``"skip"`` for apps priced out), so the step stays a pure function.
    """

    def demand(state: State, t: float) -> dict[str, float]:
        remaining = max(budgets.day_s - t, 0.0)
        elapsed = max(t, 1.0)
        return {
            a: (0.25 * rate(state, a, t) + 0.75 * state.seen.get(a, 0) / elapsed) * remaining
            for a in catalog.apps
        }

    def step(state: State, req: Request) -> tuple[Decision, State]:
        bad = _unknown(req, catalog)
        if bad:
            return bad, state
        state = _observe(state, req)
        if req.t - state.plan_at >= resolve_s:
            plan, over, mix = _plan(
                catalog, budgets, demand(state, req.t), state.energy_left, state.money_left
            )

            def keys(p):
                return {a: (o.variant, o.location) if o else ("", SKIP) for a, o in p.items()}

            state = dataclasses.replace(
                state, plan_at=req.t, plan=keys(plan), alt=keys(over), mix=min(max(mix, 0.0), 1.0)
            )
        # dithering: a fraction `mix` of requests follows the over-budget plan
        # (never between two device variants of one app: that would reload on every switch)
        credit = state.credit + state.mix
        mine, alt = state.plan[req.app], state.alt[req.app]
        use_alt = (
            credit >= 1.0
            and alt != mine
            and (SKIP in (mine[1], alt[1]) or CLOUD in (mine[1], alt[1]))
        )
        state = dataclasses.replace(state, credit=credit - 1.0 if use_alt else min(credit, 1.0))
        variant, location = (state.alt if use_alt else state.plan)[req.app]
        if location == SKIP:
            opt, why = _pick(catalog.options[req.app], math.inf, math.inf, budgets, with_load=False)
            if opt is not None:  # feasible, but priced out by the energy / money budgets
                why = "planned to skip (budget kept for requests worth more)"
            return Decision(req.t, req.app, False, reason=why), state
        opt = next(
            o for o in catalog.options[req.app] if (o.variant, o.location) == (variant, location)
        )
        hit = opt.location == CLOUD or (
            (e := _cached(state, req.app)) is not None and e.variant == opt.variant
        )
        return _run(state, req, opt, load=not hit, capacity=budgets.memory_bytes)

    return Policy("pace", _init(budgets), step)


POLICIES: dict[str, Callable[[Catalog, Budgets], Policy]] = {
    "mcdnn": mcdnn_policy,
    "pace": pace_policy,
    "best_model": best_model_policy,
    "original": original_policy,
}


def make_policy(name: str, catalog: Catalog, budgets: Budgets) -> Policy:
    if name not in POLICIES:
        raise AmsError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name](catalog, budgets)


# ---------------------------------------------------------------------------
# Simulation, summaries, offline optimum.
# ---------------------------------------------------------------------------


def simulate(policy: Policy, trace: traces_lib.Trace) -> list[Decision]:
    """Runs `policy` over every request of `trace`; never raises on a request."""
    state = policy.init()
    out = []
    for t, a in zip(trace.t.tolist(), trace.app.tolist()):
        decision, state = policy.step(state, Request(t, trace.apps[a]))
        out.append(decision)
    return out


def summarize(decisions: Sequence[Decision], day_s: float, bins: int = 10) -> dict:
    """Served fraction, energy per request, accuracy, reasons; and the same per time bin."""
    n = len(decisions)
    served = [d for d in decisions if d.served]
    energy = sum(d.energy_j for d in decisions)
    reasons: dict[str, int] = {}
    for d in decisions:
        if not d.served:
            key = d.reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    usage: dict[str, int] = {}
    for d in served:
        k = f"{d.app}/{d.variant}@{d.location}"
        usage[k] = usage.get(k, 0) + 1
    timeline = []
    edges = np.linspace(0.0, day_s, bins + 1)
    ts = np.array([d.t for d in decisions])
    for i in range(bins):
        sel = [
            d
            for d, t in zip(decisions, ts)
            if edges[i] <= t < edges[i + 1] or (i == bins - 1 and t == day_s)
        ]
        s = [d for d in sel if d.served]
        timeline.append(
            {
                "t0_s": float(edges[i]),
                "requests": len(sel),
                "served_fraction": len(s) / len(sel) if sel else None,
                "accuracy": float(np.mean([d.accuracy for d in s])) if s else None,
                "energy_per_request_j": float(np.mean([d.energy_j for d in s])) if s else None,
            }
        )
    return {
        "requests": n,
        "served": len(served),
        "served_fraction": len(served) / n if n else 0.0,
        "expected_correct": float(sum(d.accuracy for d in served)),
        "accuracy_served": float(np.mean([d.accuracy for d in served])) if served else None,
        "energy_j": energy,
        "energy_per_served_j": energy / len(served) if served else None,
        "money": float(sum(d.money for d in decisions)),
        "loads": int(sum(len(d.loaded) for d in decisions)),
        "evictions": int(sum(len(d.evicted) for d in decisions)),
        "latency_ms_mean": float(np.mean([d.latency_ms for d in served])) if served else None,
        "not_served": reasons,
        "usage": dict(sorted(usage.items(), key=lambda kv: -kv[1])),
        "timeline": timeline,
    }


def offline_optimum(catalog: Catalog, budgets: Budgets, trace: traces_lib.Trace) -> dict:
    """The day solved with hindsight (static resident set), by `scipy.optimize.milp`.

    Variables: ``x[a, o]`` requests of app a served by option o (integer),
    ``y[a, o]`` device variant resident (binary; loaded once). Constraints:
    ``sum_o x[a, o] <= N_a``; ``x <= N_a * y``; energy ``sum e*x + load*y <=
    E``; money; ``sum mem*y <= cache``; options over the latency limit
    removed. Objective: expected correct answers ``sum acc * x``.

    It upper-bounds policies that keep a variant resident once loaded; a
    policy that evicts and reloads pays loads it does not. Returns
    ``{"available": False}`` if scipy is not installed.
    """
    try:
        # lazy: SciPy is not a runtime dependency; only the MILP optimum needs it
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # pragma: no cover - scipy is optional for the runtime
        return {"available": False, "reason": "scipy is not installed"}
    counts = trace.counts()
    opts = [
        o
        for a in catalog.apps
        for o in catalog.options[a]
        if o.latency_ms + (o.load_ms if o.location == DEVICE else 0.0) <= budgets.latency_ms
        and (o.location == CLOUD or o.mem_bytes <= budgets.memory_bytes)
        and counts.get(a, 0) > 0
    ]
    if not opts:
        return {"available": True, "expected_correct": 0.0, "served": 0, "choice": {}}
    k = len(opts)
    nvar = 2 * k  # x then y
    c = np.zeros(nvar)
    c[:k] = [-o.accuracy for o in opts]
    rows, lo, hi = [], [], []
    for a in catalog.apps:
        r = np.zeros(nvar)
        r[:k] = [1.0 if o.app == a else 0.0 for o in opts]
        rows.append(r), lo.append(-np.inf), hi.append(counts.get(a, 0))
    for i, o in enumerate(opts):
        r = np.zeros(nvar)
        r[i] = 1.0
        r[k + i] = -float(counts.get(o.app, 0)) if o.location == DEVICE else 0.0
        if o.location == DEVICE:
            rows.append(r), lo.append(-np.inf), hi.append(0.0)
    r = np.zeros(nvar)
    r[:k] = [o.energy_j for o in opts]
    r[k:] = [o.load_energy_j for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.energy_j)
    r = np.zeros(nvar)
    r[:k] = [o.money for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.money)
    r = np.zeros(nvar)
    r[k:] = [o.mem_bytes for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.memory_bytes)
    ub = np.array([counts.get(o.app, 0) for o in opts] + [1.0] * k, np.float64)
    t0 = time.perf_counter()
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(nvar),
        bounds=Bounds(np.zeros(nvar), ub),
        options={"time_limit": 60.0},
    )
    if res.x is None:
        return {"available": True, "status": res.message, "expected_correct": None}
    x = np.round(res.x[:k]).astype(int)
    choice: dict[str, dict[str, int]] = {}
    for o, n in zip(opts, x):
        if n > 0:
            choice.setdefault(o.app, {})[f"{o.variant}@{o.location}"] = int(n)
    served = int(x.sum())
    return {
        "available": True,
        "status": res.message,
        "expected_correct": float(-res.fun),
        "served": served,
        "served_fraction": served / max(len(trace), 1),
        "energy_j": float(np.dot([o.energy_j for o in opts], x))
        + float(np.dot([o.load_energy_j for o in opts], np.round(res.x[k:]))),
        "choice": choice,
        "solve_s": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------
# Real execution of sampled requests.
# ---------------------------------------------------------------------------


def execute_sampled(
    catalog: Catalog, decisions: Sequence[Decision], n: int, *, seed: int = 0, threads: int = 1
) -> dict:
    """Replays loads/evictions with LiteRT and runs `n` sampled served requests for real.

    Each sampled request runs its variant's ``full`` signature on a random test
    image of its app from the catalog's ``eval.npz`` (``x``, and ``y_<app>``).
    Returns measured vs catalog accuracy and latency, and real load times.
    """

    path = os.path.join(catalog.path, "eval.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (written by train.catalog)")
    data = np.load(path)
    x = data["x"].astype(np.float32)
    rng = np.random.default_rng(seed)
    served_idx = [i for i, d in enumerate(decisions) if d.served and d.location == DEVICE]
    pick = (
        set(rng.choice(served_idx, size=min(n, len(served_idx)), replace=False).tolist())
        if served_idx
        else set()
    )
    bundles = {
        (a, v["name"]): os.path.join(catalog.path, v["bundle"])
        for a, task in catalog.raw["tasks"].items()
        for v in task["variants"]
    }
    loaded: dict[tuple[str, str], Any] = {}
    load_ms, run_ms, predicted_ms, correct, expected = [], [], [], [], []

    def load(app: str, variant: str) -> None:
        t0 = time.perf_counter()
        b = Bundle.from_dir(bundles[(app, variant)])
        m = Model(b.model_path, num_threads=threads)
        loaded[(app, variant)] = m.signature(FULL)
        load_ms.append((time.perf_counter() - t0) * 1e3)

    for i, d in enumerate(decisions):
        for ev in d.evicted:
            loaded.pop(ev, None)
        for v in d.loaded:
            load(d.app, v)
        if i not in pick:
            continue
        key = (d.app, d.variant)
        if key not in loaded:  # loaded before the replay window (never: replay is from t=0)
            load(*key)
        j = int(rng.integers(len(x)))
        sig = loaded[key]
        t0 = time.perf_counter_ns()
        logits = sig(np.ascontiguousarray(x[j : j + 1]))
        run_ms.append((time.perf_counter_ns() - t0) / 1e6)
        predicted_ms.append(d.latency_ms)
        correct.append(int(np.argmax(logits)) == int(data[f"y_{d.app}"][j]))
        expected.append(d.accuracy)
    k = len(run_ms)
    return {
        "executed": k,
        "measured_accuracy": float(np.mean(correct)) if k else None,
        "catalog_accuracy": float(np.mean(expected)) if k else None,
        "measured_latency_ms_mean": float(np.mean(run_ms)) if k else None,
        "catalog_latency_ms_mean": float(np.mean(predicted_ms)) if k else None,
        "loads": len(load_ms),
        "load_ms_mean": float(np.mean(load_ms)) if load_ms else None,
    }


# ---------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------


def resolve_budgets(
    catalog: Catalog,
    trace: traces_lib.Trace,
    *,
    energy: str,
    memory_mb: float,
    money: float,
    latency_ms: float,
) -> Budgets:
    """Budgets from CLI values; ``energy="0.12x"`` means 12% of what Original needs for the day."""
    energy = str(energy).strip()
    try:
        if energy.endswith("x"):
            frac = float(energy[:-1])
            need = sum(
                n * catalog.device(a, catalog.original[a]).energy_j
                for a, n in trace.counts().items()
            )
            e = frac * need
        else:
            e = float(energy)
    except ValueError:
        raise AmsError(
            f"--energy-budget must be joules or a multiple like 0.12x, got {energy!r}"
        ) from None
    return Budgets(e, int(memory_mb * 1e6), float(money), float(latency_ms), trace.day_s)


def run(
    catalog: Catalog, trace: traces_lib.Trace, budgets: Budgets, policies: Sequence[str]
) -> dict:
    """Simulates each policy, solves the offline optimum, and reports regret."""
    report: dict[str, Any] = {
        "requests": len(trace),
        "requests_per_app": trace.counts(),
        "budgets": dataclasses.asdict(budgets),
        "best_model_variants": {a: knee(o).variant for a, o in catalog.options.items()},
        "policies": {},
    }
    decisions = {}
    for name in policies:
        pol = make_policy(name, catalog, budgets)
        t0 = time.perf_counter()
        ds = simulate(pol, trace)
        sim_s = time.perf_counter() - t0
        decisions[name] = ds
        report["policies"][name] = {**summarize(ds, trace.day_s), "simulate_s": sim_s}
    opt = offline_optimum(catalog, budgets, trace)
    report["offline_optimum"] = opt
    if opt.get("expected_correct"):
        for rep in report["policies"].values():
            rep["regret"] = opt["expected_correct"] - rep["expected_correct"]
            rep["fraction_of_optimum"] = rep["expected_correct"] / opt["expected_correct"]
    return report, decisions


def format_report(rep: Mapping[str, Any]) -> str:
    """A table: served fraction, accuracy, energy per served request, expected correct, regret."""
    b = rep["budgets"]
    lines = [
        f"{rep['requests']} requests; energy budget {b['energy_j']:.3g} J, "
        f"cache {b['memory_bytes'] / 1e6:.2f} MB, latency {b['latency_ms']:g} ms",
        f"{'policy':<12} {'served':>7} {'acc':>6} {'J/served':>9} {'correct':>9} {'regret':>8}",
    ]
    nan = float("nan")
    for name, r in rep["policies"].items():
        acc = r["accuracy_served"] if r["accuracy_served"] is not None else nan
        eps = r["energy_per_served_j"] if r["energy_per_served_j"] is not None else nan
        lines.append(
            f"{name:<12} {r['served_fraction']:>7.1%} {acc:>6.3f} {eps:>9.2e} "
            f"{r['expected_correct']:>9.1f} {r.get('regret', nan):>8.1f}"
        )
    o = rep["offline_optimum"]
    if o.get("expected_correct") is not None:
        lines.append(
            f"{'optimum':<12} {o['served_fraction']:>7.1%} {'':>6} {'':>9} "
            f"{o['expected_correct']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.ams", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, help="catalog directory (or its catalog.json)")
    p.add_argument("--trace", required=True, help="trace JSON (python -m runtime.traces)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--policies", default="mcdnn,pace,best_model,original")
    p.add_argument("--energy-budget", default=None, help="joules, or e.g. 0.12x of Original's need")
    p.add_argument("--memory-mb", type=float, default=None, help="model cache size")
    p.add_argument("--money", type=float, default=None, help="cloud money for the day")
    p.add_argument("--latency-ms", type=float, default=None, help="limit per request")
    p.add_argument("--no-cloud", action="store_true", help="device execution only")
    p.add_argument("--execute", type=int, default=0, help="also run N sampled requests for real")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    try:
        return _main(args)
    except (AmsError, traces_lib.TraceError, FileNotFoundError, KeyError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


def _main(args) -> int:
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise FileNotFoundError(f"directory of --json={args.json} does not exist")
    if args.execute < 0:
        raise AmsError(f"--execute must be >= 0, got {args.execute}")
    catalog = load_catalog(args.bundle, cloud=not args.no_cloud)
    trace = traces_lib.load(args.trace, catalog.apps)
    defaults = catalog.raw.get("ams", {}).get("budgets", {})

    def pick(v, key, fallback):
        return v if v is not None else defaults.get(key, fallback)

    budgets = resolve_budgets(
        catalog, trace,
        energy=pick(args.energy_budget, "energy", "0.12x"),
        memory_mb=pick(args.memory_mb, "memory_mb", 2.5),
        money=pick(args.money, "money", 0.0),
        latency_ms=pick(args.latency_ms, "latency_ms", 100.0),
    )  # fmt: skip
    names = [n for n in args.policies.split(",") if n]
    for n in names:
        if n not in POLICIES:
            raise AmsError(f"unknown policy {n!r}; valid: {', '.join(POLICIES)}")
    rep, decisions = run(catalog, trace, budgets, names)
    rep["catalog"] = catalog.path
    rep["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if args.execute:
        rep["executed"] = {
            n: execute_sampled(catalog, decisions[n], args.execute, threads=args.threads)
            for n in names
        }
    print(format_report(rep))
    if args.json:
        write_json_atomic(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
