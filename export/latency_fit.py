"""Fits Edgent's per-layer-kind linear latency regressions and stores them in a bundle.

  python -m export.latency_fit --bundle=BUNDLE \\
      --device=DEVICE_SWEEP.json --edge=EDGE_SWEEP.json \\
      [--device-paths=DEVICE_PARTS.json --edge-paths=EDGE_PARTS.json] \\
      [--form=auto|edgent|interaction] [--report=FIT.json]

Inputs are `runtime.profile` outputs: a sweep profile per target (single-layer
latencies, invocation overhead, loading times) and optionally a partition
profile per target (measured latency of every partition signature of
BUNDLE). For each target and regression kind (`runtime.latency_model`):

1. the samples are the single-layer times minus the invocation overhead;
   every 4th configuration of a kind (by sweep index) is held out;
2. two linear forms are fitted with scikit-learn on the rest: Edgent's
   variables (``edgent``) and Edgent's variables plus their product
   (``interaction``, ~FLOPs for conv, ~weights for dense). Least squares are
   weighted by ``1 / t^2`` so the error minimised is relative (the targets
   are MAPEs over layers spanning three orders of magnitude);
3. ``--form=auto`` keeps, per kind, the form with the lower held-out MAPE;
   the kept form is refitted on all samples and stored;
4. model loading: ``ms = a * bytes + b`` on the loading models (same 1/t^2 weights).

The manifest gains ``latency_models`` (coefficients the runtime evaluates
with numpy) and ``latency_fit`` (held-out MAPE per kind and, with partition
profiles, whole-path MAPE for every (exit, partition)). The bundle is
rewritten through a staged copy, so a failure leaves it untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from export.staging import rewrite_manifest
from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import latency_model as lm
from runtime.bundle import Bundle, BundleError

FORMS = ("auto", "edgent", "interaction")
HOLDOUT_EVERY = 4


def _variables(kind: str, form: str) -> tuple[str, ...]:
    base = lm.BASE_VARIABLES[kind]
    plain = form == "edgent" or len(base) == 1 or kind in lm.NO_INTERACTION
    return base if plain else (*base, "x1x2")


def _fit(rows: Sequence[Mapping], ys: np.ndarray, names: Sequence[str]) -> dict:
    # lazy: scikit-learn is slow to import and only the fit needs it
    from sklearn.linear_model import LinearRegression

    x = lm.design(rows, names)
    w = 1.0 / np.maximum(ys, 1e-3) ** 2
    reg = LinearRegression().fit(x, ys, sample_weight=w)
    return {
        "variables": list(names),
        "coef": [float(c) for c in reg.coef_],
        "intercept": float(reg.intercept_),
        "samples": int(len(ys)),
    }


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    return float(np.mean(np.abs(pred - true) / np.maximum(true, 1e-9)) * 100.0)


def fit_target(profile: Mapping, form: str = "auto") -> tuple[dict, dict]:
    """``(model, report)`` for one target's sweep profile.

    Raises:
      ValueError: not a sweep profile, an unknown form, or a kind with too few samples.
    """
    if profile.get("kind") != "sweep":
        raise ValueError("expected a sweep profile (runtime.profile on an export.sweep bundle)")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid: {', '.join(FORMS)}")
    overhead = float(profile["overhead_ms"])
    by_kind: dict[str, list[Mapping]] = {}
    for r in profile["layers"]:
        if r["signature"] == "probe":
            continue
        by_kind.setdefault(lm.regression_kind(r["row"]), []).append(r)
    kinds, report = {}, {}
    for kind, samples in sorted(by_kind.items()):
        rows = [s["row"] for s in samples]
        total = np.array([s["median_ms"] for s in samples])
        ys = np.maximum(total - overhead, 0.0)
        test = np.arange(len(rows)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        if (~test).sum() < 3:
            raise ValueError(f"too few {kind} samples ({len(rows)}) to fit and hold out")
        forms = ("edgent", "interaction") if form == "auto" else (form,)
        scores = {}
        for f in forms:
            names = _variables(kind, f)
            model = _fit([r for r, t in zip(rows, test) if not t], ys[~test], names)
            pred = overhead + np.array([lm.layer_ms({"kinds": {kind: model}}, r) for r in rows])
            scores[f] = {
                "heldout_mape": mape(pred[test], total[test]) if test.any() else None,
                "train_mape": mape(pred[~test], total[~test]),
                "heldout": int(test.sum()),
            }
        best = min(forms, key=lambda f: scores[f]["heldout_mape"] or scores[f]["train_mape"])
        kinds[kind] = _fit(rows, ys, _variables(kind, best))
        report[kind] = {"form": best, "forms": scores}
    loading = None
    if profile.get("loading"):
        # lazy: scikit-learn is slow to import and only the fit needs it
        from sklearn.linear_model import LinearRegression

        x = np.array([[m["bytes"]] for m in profile["loading"]], np.float64)
        y = np.array([m["median_ms"] for m in profile["loading"]])
        reg = LinearRegression().fit(x, y, sample_weight=1.0 / np.maximum(y, 1e-3) ** 2)
        loading = {"variables": ["x"], "coef": [float(reg.coef_[0])],
                   "intercept": float(reg.intercept_), "samples": int(len(y))}  # fmt: skip
        report["loading"] = {"train_mape": mape(reg.predict(x), y)}
    model = {"overhead_ms": overhead, "kinds": kinds, "target": profile["target"]}
    if loading:
        model["loading"] = loading
    lm.check(model)
    return model, report


def path_errors(
    section: Mapping, models: Mapping[str, Mapping], measured: Mapping[str, Mapping]
) -> dict:
    """Whole-path prediction error for every (exit, partition) and each target.

    Args:
      section: the bundle's ``partitions`` manifest section.
      models: ``{"device": model, "edge": model}``.
      measured: ``{"device": partition profile, "edge": partition profile}``.
    """
    rows = []
    for e in section["exits"]:
        for p, edge_sig in e["edge"].items():
            start = int(p)
            dev_sig = section["device"].get(p)
            pred = lm.signature_ms(
                models["edge"], lm.path_rows(section, e["name"], start, e["stop"])
            )
            true = measured["edge"]["signatures"][edge_sig]["median_ms"]
            d_pred = d_true = 0.0
            if dev_sig:
                d_pred = lm.signature_ms(models["device"], lm.path_rows(section, "final", 0, start))
                d_true = measured["device"]["signatures"][dev_sig]["median_ms"]
            rows.append({"exit": e["name"], "partition": start, "device_pred_ms": d_pred,
                         "device_ms": d_true, "edge_pred_ms": pred, "edge_ms": true})  # fmt: skip
            if start == 0:  # the whole path on the device: device-only
                dp = lm.signature_ms(
                    models["device"], lm.path_rows(section, e["name"], 0, e["stop"])
                )
                dt = measured["device"]["signatures"][edge_sig]["median_ms"]
                rows.append({"exit": e["name"], "partition": None, "device_pred_ms": dp,
                             "device_ms": dt, "edge_pred_ms": 0.0, "edge_ms": 0.0})  # fmt: skip
    pred = np.array([r["device_pred_ms"] + r["edge_pred_ms"] for r in rows])
    true = np.array([r["device_ms"] + r["edge_ms"] for r in rows])
    err = np.abs(pred - true) / true * 100
    for r, e_ in zip(rows, err):
        r["ape"] = float(e_)
    return {
        "paths": rows,
        "mape": mape(pred, true),
        "max_ape": float(err.max()),
        "p90_ape": float(np.percentile(err, 90)),
        "count": len(rows),
    }


def _brief(errors: Mapping) -> dict:
    return {k: errors[k] for k in ("mape", "p90_ape", "max_ape", "count")}


def _mbconv_form(section: Mapping, models: dict, measured: Mapping, report: dict) -> dict:
    """Keeps the MBConv model (block as a unit, or as its parts) with the lower path MAPE.

    Records both in ``report["mbconv"]``; ``report["paths"]`` is the kept one's.
    """
    split = {t: {**m, "kinds": {k: v for k, v in m["kinds"].items() if k != "mbconv"}}
             for t, m in models.items()}  # fmt: skip
    forms = {"unit": report["paths"]}
    try:
        forms["parts"] = path_errors(section, split, measured)
    except lm.LatencyModelError as e:  # a sweep without dwconv / conv samples
        report["mbconv"] = {"unit": _brief(forms["unit"]), "parts": str(e), "kept": "unit"}
        return models
    kept = min(forms, key=lambda f: forms[f]["mape"])
    report["mbconv"] = {f: _brief(r) for f, r in forms.items()} | {"kept": kept}
    report["paths"] = forms[kept]
    return models if kept == "unit" else split


def store(bundle_dir: str, models: Mapping, report: Mapping) -> None:
    """Rewrites the bundle's manifest with ``latency_models`` and ``latency_fit`` (staged)."""

    bundle = Bundle.from_dir(bundle_dir)
    manifest = dict(bundle.manifest)
    manifest["latency_models"] = dict(models)
    manifest["latency_fit"] = dict(report)
    rewrite_manifest(bundle_dir, manifest)


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"profile {path} does not exist")
    return args_lib.read_json(path, "dict", "profile")


def run(
    bundle: str,
    device: str,
    edge: str,
    *,
    device_paths: str | None = None,
    edge_paths: str | None = None,
    form: str = "auto",
) -> dict:
    """Fits both targets' models from profile files and stores them in `bundle`.

    Args:
      bundle: the bundle directory (rewritten through a staged copy).
      device, edge: `runtime.profile` sweep profiles (JSON paths) of each target.
      device_paths, edge_paths: optional partition profiles of `bundle` on each
        target (together or not at all): adds the whole-path errors.
      form: ``auto`` | ``edgent`` | ``interaction`` (see the module docstring).

    Returns:
      The fit report (also stored in the manifest as ``latency_fit``).

    Raises:
      BundleError: a bad bundle or one without partitions; ValueError /
        FileNotFoundError: bad or missing profiles.
    """
    b = Bundle.from_dir(bundle)
    models, report = {}, {"kinds": {}}
    for target, path in (("device", device), ("edge", edge)):
        models[target], report["kinds"][target] = fit_target(_load(path), form)
    if device_paths or edge_paths:
        if not (device_paths and edge_paths):
            raise ValueError("--device-paths and --edge-paths go together")
        section = b.manifest.get("partitions")
        if section is None:
            raise BundleError(f"bundle {bundle} has no partitions (export with --partitions)")
        measured = {"device": _load(device_paths), "edge": _load(edge_paths)}
        for t, m in measured.items():
            if m.get("kind") != "partitions":
                raise ValueError(f"--{t}-paths is not a partition profile of this bundle")
        report["paths"] = path_errors(section, models, measured)
        if any("mbconv" in m["kinds"] for m in models.values()):
            models = _mbconv_form(section, models, measured, report)
    store(bundle, models, report)
    return report


def format_report(report: Mapping) -> str:
    lines = [f"{'target':<8}{'kind':<9}{'form':<13}{'held-out MAPE %':>16}"]
    for target, kinds in report["kinds"].items():
        for kind, r in kinds.items():
            if kind == "loading":
                lines.append(f"{target:<8}{kind:<9}{'linear':<13}{r['train_mape']:>15.1f}*")
                continue
            m = r["forms"][r["form"]]["heldout_mape"]
            shown = "-" if m is None else f"{m:.1f}"
            lines.append(f"{target:<8}{kind:<9}{r['form']:<13}{shown:>16}")
    if "mbconv" in report:
        m = report["mbconv"]
        forms = [f"{f} {m[f]['mape']:.1f}%" for f in ("unit", "parts") if isinstance(m[f], dict)]
        lines.append(f"MBConv as (whole-path MAPE): {', '.join(forms)}; kept {m['kept']}")
    if "paths" in report:
        p = report["paths"]
        lines.append(
            f"whole path ({p['count']} exit/partition pairs): MAPE {p['mape']:.1f}%, "
            f"p90 {p['p90_ape']:.1f}%, max {p['max_ape']:.1f}%"
        )
    lines.append("* loading: in-sample MAPE (few model sizes)")
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.latency_fit`` (every file's kind declared)."""
    p = args_lib.ArgumentParser(prog="python -m export.latency_fit",
                                description=__doc__.split("\n")[0])  # fmt: skip
    profile = args_lib.json_file("dict")
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir(),
                   help="bundle to store the models in")  # fmt: skip
    p.add_argument("--device", required=True, type=profile,
                   help="device sweep profile (runtime.profile)")  # fmt: skip
    p.add_argument("--edge", required=True, type=profile,
                   help="edge sweep profile (runtime.profile)")  # fmt: skip
    p.add_argument("--device-paths", default=None, type=profile, help="device partition profile")
    p.add_argument("--edge-paths", default=None, type=profile, help="edge partition profile")
    p.add_argument("--form", default="auto", choices=FORMS)
    p.add_argument("--report", default=None, type=args_lib.output_file(),
                   help="also write the fit report here")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError, TypeError))


def _main(args) -> int:
    report = run(
        args.bundle, args.device, args.edge, device_paths=args.device_paths,
        edge_paths=args.edge_paths, form=args.form,
    )  # fmt: skip
    if args.report:
        write_json_atomic(args.report, report)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
