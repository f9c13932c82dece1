"""AMS policies, each a pure ``step(state, request) -> (decision, state)``.

``mcdnn`` (MCDNN's Algorithm 1), ``pace`` (ours), ``best_model`` and ``original``
(see `runtime.ams`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from runtime.ams.catalog import CLOUD, DEVICE, AmsError, Catalog, Option, knee
from runtime.ams.state import (
    Budgets,
    Decision,
    Policy,
    Request,
    State,
    cached_entry,
    execute,
    install,
    observe,
    rate,
    unknown_app,
)


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
        bad = unknown_app(req, catalog)
        if bad:
            return bad, state
        state = observe(state, req)
        opts = catalog.options[req.app]
        e_n, c_n = mcdnn_budgets(state, req.app, budgets)
        chosen = state.choice.get(req.app)
        entry = cached_entry(state, req.app)
        current = None
        if chosen and chosen[1] == CLOUD:
            current = next(o for o in opts if (o.variant, o.location) == chosen)
        elif entry is not None:
            current = catalog.device(req.app, entry.variant)
        decision = None
        if current is not None:  # hit: run what is cached
            decision, state = execute(
                state, req, current, load=False, capacity=budgets.memory_bytes
            )
        if decision is None or not decision.served:
            # miss (or the cached choice can no longer be paid for): pick with the load
            # latency, load, run
            opt, why = _pick(opts, e_n, c_n, budgets, with_load=True)
            if opt is None:
                return Decision(
                    req.t, req.app, False, reason=decision.reason if decision else why
                ), state
            hit = opt.location == CLOUD or (entry is not None and entry.variant == opt.variant)
            return execute(state, req, opt, load=not hit, capacity=budgets.memory_bytes)
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
        got = install(state, better, budgets.memory_bytes)
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
        bad = unknown_app(req, catalog)
        if bad:
            return bad, state
        state = observe(state, req)
        opt = chosen[req.app]
        if opt.latency_ms > budgets.latency_ms:
            return Decision(req.t, req.app, False, reason="variant misses the latency limit"), state
        hit = cached_entry(state, req.app) is not None
        return execute(state, req, opt, load=not hit, capacity=budgets.memory_bytes)

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


def count_window(
    windows: tuple[int, int, int, float, float], t: float, window_s: float
) -> tuple[int, int, int, float, float]:
    """`windows` (see `State.windows`) after one more request at `t` (empty windows count 0)."""
    cur, c, n, total, sq = windows
    k = int(t // window_s)
    if k > cur:  # window `cur` is complete; any skipped ones were empty
        n, total, sq, cur, c = n + k - cur, total + c, sq + float(c) * c, k, 0
    return cur, c + 1, n, total, sq


def demand_spread(
    windows: tuple[int, int, int, float, float],
    t: float,
    day_s: float,
    window_s: float,
    prior_cv: float,
    horizon: bool = True,
) -> float:
    """Relative standard deviation of the remaining day's demand, estimated online.

    ``cv`` is the coefficient of variation of the requests per window among the
    windows completed so far (`prior_cv` until two are). The day's average rate
    so far is uncertain by ``cv / sqrt(windows seen)``; with `horizon` the
    remaining day's own average adds ``cv / sqrt(windows left)`` (windows
    treated as independent). Only requests already seen are used.
    """
    _, _, n, total, sq = windows
    cv = prior_cv
    if n >= 2 and total > 0:
        mu = total / n
        cv = math.sqrt(max(sq - n * mu * mu, 0.0) / (n - 1)) / mu
    seen = window_s / max(t, window_s)
    left = window_s / max(day_s - t, window_s) if horizon else 0.0
    return cv * math.sqrt(seen + left)


def pace_policy(
    catalog: Catalog,
    budgets: Budgets,
    resolve_s: float = 60.0,
    recent_weight: float = 0.25,
    rule: str = "blend",
    quantile_z: float = 0.0,
    window_s: float = 1200.0,
    prior_cv: float = 1.0,
    horizon: bool = True,
    prior_rate: float = 0.0,
    prior_days: float = 1.0,
    dither: str = "all",
) -> Policy:
    """Ours: re-solve the priced plan every `resolve_s` (see the module docstring).

    The plans live in the state (app -> (variant, location), location
    ``"skip"`` for apps priced out), so the step stays a pure function. Each
    app's remaining demand is its rate times the time left, the rate a blend
    of the recent (decayed) one (weight `recent_weight`) and the day's average.

    `prior_rate` > 0 (total requests/s of past days, e.g. yesterday's) is a
    prior on the day's total rate worth `prior_days` days of observations: the
    apps' forecasts are scaled so their total is the prior and the observed
    total rate weighted by their durations (a day whose rate rises late no
    longer looks quiet all morning). `quantile_z` > 0 plans for the mean
    forecast times ``1 + z * spread`` (`demand_spread`: the window counts'
    dispersion, windows of `window_s`, `prior_cv` until two are complete,
    the remaining day's own variation with `horizon`). The LP's mix fraction is
    dithered over the requests of the apps it mixes (`dither` "mixed"), or over
    every request (credit capped at 1; "all", the original rule).
    """
    if not 0.0 <= recent_weight <= 1.0:
        raise AmsError(f"pace: recent_weight must be in [0, 1], got {recent_weight}")
    if rule not in ("blend", "max"):
        raise AmsError(f"pace: rule must be 'blend' or 'max', got {rule!r}")
    if dither not in ("all", "mixed"):
        raise AmsError(f"pace: dither must be 'all' or 'mixed', got {dither!r}")
    for name, v, lo_open in (
        ("resolve_s", resolve_s, False),
        ("quantile_z", quantile_z, False),
        ("window_s", window_s, True),
        ("prior_cv", prior_cv, False),
        ("prior_rate", prior_rate, False),
        ("prior_days", prior_days, True),
    ):
        if not (math.isfinite(v) and (v > 0 if lo_open else v >= 0)):
            raise AmsError(
                f"pace: {name} must be a finite number {'>' if lo_open else '>='} 0, got {v}"
            )

    def demand(state: State, t: float) -> dict[str, float]:
        remaining = max(budgets.day_s - t, 0.0)
        elapsed = max(t, 1.0)
        w = recent_weight
        # plan for an upper quantile of the remaining demand: the mean forecast times
        # (1 + z * its relative spread), the spread estimated from the requests seen
        q = 1.0
        if quantile_z > 0:
            spread = demand_spread(state.windows, t, budgets.day_s, window_s, prior_cv, horizon)
            q = 1.0 + quantile_z * spread
        if rule == "max":  # the larger of the two rates: plan for the busier future
            r = {a: max(rate(state, a, t), state.seen.get(a, 0) / elapsed) for a in catalog.apps}
        else:
            r = {
                a: w * rate(state, a, t) + (1.0 - w) * state.seen.get(a, 0) / elapsed
                for a in catalog.apps
            }
        total = sum(r.values())
        if prior_rate > 0 and total > 0:
            # the day's total rate: the prior (past days), worth `prior_days` days of this
            # day's observations, blended with the rate seen; the apps' mix is today's
            prior_s = prior_days * budgets.day_s
            q *= (prior_rate * prior_s + total * elapsed) / (prior_s + elapsed) / total
        return {a: r[a] * remaining * q for a in catalog.apps}

    def step(state: State, req: Request) -> tuple[Decision, State]:
        bad = unknown_app(req, catalog)
        if bad:
            return bad, state
        state = observe(state, req)
        if quantile_z > 0:  # the window counts feed only the quantile rule
            state = dataclasses.replace(state, windows=count_window(state.windows, req.t, window_s))
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
        mine, alt = state.plan[req.app], state.alt[req.app]
        mixed = alt != mine and (SKIP in (mine[1], alt[1]) or CLOUD in (mine[1], alt[1]))
        # `mix` is a fraction of the mixed apps' requests: with dither "mixed" only their
        # requests earn credit ("all": every request did, capped at 1 -- a rare mixed app
        # then followed `alt` nearly always and overspent)
        credit = state.credit + (state.mix if mixed or dither == "all" else 0.0)
        use_alt = mixed and credit >= 1.0
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
            (e := cached_entry(state, req.app)) is not None and e.variant == opt.variant
        )
        return execute(state, req, opt, load=not hit, capacity=budgets.memory_bytes)

    return Policy("pace", _init(budgets), step)


POLICIES: dict[str, Callable[..., Policy]] = {
    "mcdnn": mcdnn_policy,
    "pace": pace_policy,
    "best_model": best_model_policy,
    "original": original_policy,
}


def make_policy(name: str, catalog: Catalog, budgets: Budgets, **options: Any) -> Policy:
    """The policy `name` over `catalog` and `budgets`; `options` go to its constructor
    (e.g. pace's ``prior_rate``)."""
    if name not in POLICIES:
        raise AmsError(f"unknown policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name](catalog, budgets, **options)
