"""AMS state: budgets, requests, decisions, the model cache, and the request-rate estimate."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

from runtime.ams.catalog import DEVICE, AmsError, Catalog, Option


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
    # pace: all apps' request counts per window of the day, (current window, its count,
    # completed windows, their sum, their sum of squares) -- the demand's dispersion
    windows: tuple[int, int, int, float, float] = (0, 0, 0, 0.0, 0.0)


class Policy(NamedTuple):
    """``init() -> State`` and the pure ``step(state, request) -> (decision, state)``."""

    name: str
    init: Callable[[], State]
    step: Callable[[State, Request], tuple[Decision, State]]


RATE_TAU_S = 300.0  # time constant of the request-frequency estimate


def observe(state: State, req: Request) -> State:
    """`state` after seeing `req`: its app's decayed count, request count and first sight."""
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


def cached_entry(state: State, app: str) -> CacheEntry | None:
    """The cache entry of `app`'s variant, if one is resident."""
    return next((e for e in state.cache if e.app == app), None)


def touch(state: State, app: str, t: float) -> State:
    """`state` with `app`'s cache entry marked used at `t` (for LRU eviction)."""
    return dataclasses.replace(
        state,
        cache=tuple(
            dataclasses.replace(e, last_used=t) if e.app == app else e for e in state.cache
        ),
    )


def install(
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


def execute(
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
            got = install(state, opt, capacity)
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
        state = touch(state, opt.app, req.t)
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


def unknown_app(req: Request, catalog: Catalog) -> Decision | None:
    """A refusal if `req`'s app is not in the catalog, else None."""
    if req.app not in catalog.options:
        return Decision(req.t, req.app, False, reason=f"unknown app {req.app!r}")
    return None
