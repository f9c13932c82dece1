"""``python -m runtime.ams``: budgets from flags, each policy over a day, the optimum, a report."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import traces as traces_lib
from runtime.ams.catalog import AmsError, Catalog, knee, load_catalog
from runtime.ams.optimum import offline_optimum
from runtime.ams.policies import POLICIES, make_policy
from runtime.ams.replay import execute_sampled
from runtime.ams.simulate import simulate, summarize
from runtime.ams.state import Budgets

MAX_MEMORY_MB = 1e6  # a model cache of a terabyte is a typo
_ENERGY_J = args_lib.real(0.0)
_ENERGY_MULTIPLE = args_lib.real(0.0, 1000.0)


def energy_budget(text: str) -> str:
    """``--energy-budget``: joules (finite, >= 0) or a multiple of Original's need (``0.12x``)."""
    (_ENERGY_MULTIPLE if text.strip().endswith("x") else _ENERGY_J)(text.strip().removesuffix("x"))
    return text


energy_budget.domain = _ENERGY_J.domain  # type: ignore[attr-defined]


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
            frac = _ENERGY_MULTIPLE(energy[:-1])
            need = sum(
                n * catalog.device(a, catalog.original[a]).energy_j
                for a, n in trace.counts().items()
            )
            e = frac * need
        else:
            e = _ENERGY_J(energy)
        memory = args_lib.real(0.0, MAX_MEMORY_MB)(str(memory_mb))
        money = args_lib.real(0.0)(str(money))
        latency_ms = args_lib.positive()(str(latency_ms))
    except ValueError as e:
        raise AmsError(
            f"budgets: energy is joules or a multiple like 0.12x, memory_mb in [0, "
            f"{MAX_MEMORY_MB:g}], money >= 0, latency_ms > 0 (all finite): {e}"
        ) from None
    return Budgets(e, int(memory * 1e6), float(money), float(latency_ms), trace.day_s)


def run(
    catalog: Catalog,
    trace: traces_lib.Trace,
    budgets: Budgets,
    policies: Sequence[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict:
    """Simulates each policy (``options[name]``: its constructor's keyword arguments), solves
    the offline optimum, and reports regret."""
    report: dict[str, Any] = {
        "requests": len(trace),
        "requests_per_app": trace.counts(),
        "budgets": dataclasses.asdict(budgets),
        "best_model_variants": {a: knee(o).variant for a, o in catalog.options.items()},
        "policies": {},
    }
    decisions = {}
    for name in policies:
        pol = make_policy(name, catalog, budgets, **(options or {}).get(name, {}))
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


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.ams`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.ams", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, type=args_lib.existing_path(),
                   help="catalog directory (or its catalog.json)")  # fmt: skip
    p.add_argument("--trace", required=True, type=args_lib.json_file("dict"),
                   help="trace JSON (python -m runtime.traces)")  # fmt: skip
    p.add_argument("--json", default=None, type=args_lib.output_file(),
                   help="write the report here")  # fmt: skip
    p.add_argument("--policies", default="mcdnn,pace,best_model,original")
    p.add_argument("--energy-budget", default=None, type=energy_budget,
                   help="joules, or e.g. 0.12x of Original's need")  # fmt: skip
    p.add_argument("--memory-mb", type=args_lib.real(0.0, MAX_MEMORY_MB), default=None,
                   help="model cache size")  # fmt: skip
    p.add_argument("--money", type=args_lib.real(0.0), default=None,
                   help="cloud money for the day")  # fmt: skip
    p.add_argument("--latency-ms", type=args_lib.positive(), default=None,
                   help="limit per request")  # fmt: skip
    p.add_argument("--no-cloud", action="store_true", help="device execution only")
    p.add_argument("--execute", type=args_lib.count(0, 100_000), default=0,
                   help="also run N sampled requests for real")  # fmt: skip
    p.add_argument("--threads", type=args_lib.threads(), default=1)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError,))


def _main(args) -> int:
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
