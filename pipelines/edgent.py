"""Edgent end to end: train, export with partitions, sweep, profile, fit, benchmark.

`run(config, workdir)` is the job behind ``python -m train.edgent`` (config:
`flexjax.config.edgent_defaults`). Each stage leaves its output in the
workdir and is recorded in ``stages.json`` when it finishes, so re-running the
same command continues after the last finished stage; a workdir made with
another config is refused, and a finished one says so.

  train/          the multi-exit net (`flexjax.training`, config ``model_config``; or a
                  pretrained backbone with distilled exits, `pipelines.edgent_distill`,
                  whose cached activations stay in features/ and test frames in
                  frames_test.npz)
  bundle/         its bundle with device/edge partition signatures (`export.bundle`);
                  the fit stage adds the latency models to its manifest
  sweep/          single-layer signatures for the regressions (`export.sweep`)
  profiles/       {device,edge}_{sweep,parts}.json (`runtime.profile` on each target)
  fit.json        held-out and whole-path errors of the fit (`export.latency_fit`)
  bench/          edgent_bench.json / .md, trace.csv (`runtime.edgent_bench`:
                  real gRPC edge servers on 127.0.0.1, emulated bandwidth)
  report.json, edgent_{bandwidth,deadline,trace}.png

The single commands (``runtime.profile``, ``export.latency_fit``,
``runtime.edge_server``, ``runtime.coinfer``) remain for profiling a real
phone or edge box; this job emulates both machines on this one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np

from export import edgent_figures, latency_fit, sweep
from export.bundle import export_bundle
from flexjax import config as config_lib
from flexjax import training
from flexjax.io import jsonable, write_json_atomic
from pipelines import edgent_distill
from runtime import edgent_bench, planner
from runtime import profile as profile_lib

STAGES = ("train", "export", "sweep", "profile", "fit", "bench")
PROFILES = ("device_sweep", "edge_sweep", "device_parts", "edge_parts")


def load_model_config(ref: str) -> ml_collections.ConfigDict:
    """The validated training config named by ``PATH[:ARG]`` (as ``--config=`` takes it).

    Raises:
      FileNotFoundError: no such file. ValueError: not a valid training config.
    """
    try:
        return config_lib.validate(config_lib.load(ref))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"model_config: {e} (a training config, PATH[:ARG])") from None
    except ValueError as e:
        raise ValueError(f"model_config {ref}: {e}") from None


def _distilled(config: ml_collections.ConfigDict) -> bool:
    """True when the job distills exits onto a pretrained backbone (``distill.backbone``)."""
    return bool(config.distill.backbone)


def _check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """Every value the stages will use, checked before anything is written.

    Returns the model's training config, or None for a distilled job.
    """
    if config.sweep.size not in sweep.SIZES:
        raise ValueError(
            f"sweep.size must be one of {', '.join(sweep.SIZES)}; got {config.sweep.size!r}"
        )
    if config.fit.form not in latency_fit.FORMS:
        raise ValueError(
            f"fit.form must be one of {', '.join(latency_fit.FORMS)}; got {config.fit.form!r}"
        )
    for name in ("device", "edge"):
        section = config[name]
        try:
            target = profile_lib.Target.parse(section.target)
        except ValueError as e:
            raise ValueError(f"{name}.target: {e}") from None
        if target.kind != "local":
            raise ValueError(
                f"{name}.target must be local[...] (the job emulates both machines here); "
                "profile a phone with python -m runtime.profile --target=adb"
            )
        if section.runs < 1:
            raise ValueError(f"{name}.runs must be >= 1; got {section.runs}")
    b = config.bench
    if not 0 <= b.margin < 1:
        raise ValueError(f"bench.margin must be in [0, 1); got {b.margin}")
    bad = [p for p in b.policies if p not in edgent_bench.POLICIES]
    if bad or (b.policies and "edgent" not in b.policies):
        raise ValueError(
            f"bench.policies must include 'edgent' and come from "
            f"{', '.join(edgent_bench.POLICIES)}; got {list(b.policies)}"
        )
    if _distilled(config):
        edgent_distill.check(config)
    if min(b.frames, b.trace_frames, b.servers) < 1:
        raise ValueError("bench.frames, bench.trace_frames and bench.servers must be >= 1")
    if not (b.deadline_ms > 0 and b.bandwidth_mbps > 0 and b.trace_step_s > 0):
        raise ValueError("bench.deadline_ms, bench.bandwidth_mbps, bench.trace_step_s must be > 0")
    if any(not float(x) > 0 for x in (*b.bandwidths, *b.deadlines)):
        raise ValueError("bench.bandwidths and bench.deadlines must be > 0")
    return None if _distilled(config) else load_model_config(config.model_config)


def _same(saved_path: str, config: ml_collections.ConfigDict) -> list[str]:
    """Keys whose values differ between a saved config.json and `config` ([] if none saved)."""
    if not os.path.exists(saved_path):
        return []
    with open(saved_path) as f:
        old = json.load(f)
    new = jsonable(config.to_dict())
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = flat_old.keys() | flat_new.keys()
    return sorted(k for k in keys if flat_old.get(k) != flat_new.get(k))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _stage_settings(config: ml_collections.ConfigDict, root: str) -> edgent_bench.Settings:
    b = config.bench
    data = edgent_distill.test_frames(root) if _distilled(config) else b.data
    defaults = edgent_bench.Settings()
    edge = profile_lib.Target.parse(config.edge.target)
    return edgent_bench.Settings(
        frames=b.frames, servers=b.servers, deadline_ms=float(b.deadline_ms),
        bandwidth_mbps=float(b.bandwidth_mbps), margin=float(b.margin),
        trace_frames=b.trace_frames,
        bandwidths=tuple(float(x) for x in b.bandwidths) or defaults.bandwidths,
        deadlines=tuple(float(x) for x in b.deadlines) or defaults.deadlines,
        policies=tuple(b.policies) or defaults.policies, data=data,
        trace_seconds=float(b.trace_seconds), trace_step_s=float(b.trace_step_s),
        trace_seed=b.trace_seed,
        edge_threads=edge.threads,
        adapt=bool(b.adapt),
    )  # fmt: skip


class _Workdir:
    """Paths of the job's outputs, and the record of finished stages."""

    def __init__(self, root: str):
        self.root = root
        self.train = os.path.join(root, "train")
        self.bundle = os.path.join(root, "bundle")
        self.sweep = os.path.join(root, "sweep")
        self.profiles = os.path.join(root, "profiles")
        self.fit = os.path.join(root, "fit.json")
        self.bench = os.path.join(root, "bench")
        self.report = os.path.join(root, "report.json")
        self.stages_path = os.path.join(root, "stages.json")

    def profile(self, name: str) -> str:
        return os.path.join(self.profiles, f"{name}.json")

    def finished(self) -> dict[str, float]:
        """``{stage: seconds}`` of the finished stages."""
        if not os.path.exists(self.stages_path):
            return {}
        with open(self.stages_path) as f:
            return json.load(f)

    def mark(self, stage: str, seconds: float) -> None:
        write_json_atomic(self.stages_path, {**self.finished(), stage: seconds})


def run(
    config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print
) -> dict:
    """Runs (or resumes) every stage of the Edgent job; returns the report.

    Args:
      config: an Edgent config (keys of `flexjax.config.edgent_defaults`).
      workdir: where every stage's output goes (created if missing).
      log: progress lines.

    Returns:
      The report, also written to ``workdir/report.json``.

    Raises:
      ValueError: a bad config, or a workdir made with another config.
      FileNotFoundError / FileExistsError / ExportError / BundleError /
      RuntimeError: a stage failed (its partial output is not recorded as done).
    """
    config = config_lib.validate(config, config_lib.edgent_defaults)
    model_config = _check(config)
    w = _Workdir(workdir)
    saved = os.path.join(workdir, "config.json")
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(saved):
        raise ValueError(f"{workdir} is not empty and holds no Edgent job; use a new --workdir")
    checks = [(saved, config, "config")]
    if model_config is not None:
        checks.append((os.path.join(w.train, "config.json"), model_config,
                       f"model config ({config.model_config})"))  # fmt: skip
    for path, cfg, what in checks:
        diff = _same(path, cfg)
        if diff:
            more = ", ..." if len(diff) > 4 else ""
            raise ValueError(
                f"{workdir} holds an Edgent job made with another {what} (differs in "
                f"{', '.join(diff[:4])}{more}); use a new --workdir"
            )
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(saved, config.to_dict())
    if os.path.exists(w.report) and set(STAGES) <= set(w.finished()):
        log(
            f"the Edgent job in {workdir} is finished (report.json, figures, bench/); "
            f"to start over, remove {workdir} or pass another --workdir"
        )
        with open(w.report) as f:
            return json.load(f)

    stage_fns = {
        "train": lambda: (
            edgent_distill.train(config, w.train, os.path.join(w.root, "features"), log)
            if model_config is None
            else _train(model_config, w, log)
        ),
        "export": lambda: (
            edgent_distill.export(config, w.train, w.bundle, w.root, log)
            if model_config is None
            else _export(config, w, log)
        ),
        "sweep": lambda: sweep.export_sweep(
            w.sweep, size=config.sweep.size, seed=config.sweep.seed, overwrite=True, log=log
        ),
        "profile": lambda: _profile(config, w, log),
        "fit": lambda: _fit(config, w, log),
        "bench": lambda: edgent_bench.run(
            w.bundle, w.bench, _stage_settings(config, w.root), log=log
        ),
    }
    for i, stage in enumerate(STAGES, 1):
        if stage in w.finished():
            log(f"[{i}/{len(STAGES)}] {stage}: finished before, kept")
            continue
        log(f"[{i}/{len(STAGES)}] {stage} ...")
        t0 = time.perf_counter()
        stage_fns[stage]()
        w.mark(stage, time.perf_counter() - t0)
    report = _report(config, w)
    figures = edgent_figures.plot(_load(os.path.join(w.bench, "edgent_bench.json")), workdir)
    report["figures"] = [os.path.basename(p) for p in figures]
    write_json_atomic(w.report, report)
    log(f"report written to {w.report}")
    return report


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _train(model_config, w: _Workdir, log) -> None:
    log(f"training {model_config.model.name} -> {w.train}")
    training.train_and_evaluate(model_config, w.train)


def _export(config, w: _Workdir, log) -> None:
    e = config.export
    export_bundle(
        w.train, w.bundle, partitions=True, overwrite=True, precision=e.precision,
        parity_examples=e.parity_examples, epsilons=[float(x) for x in e.epsilons], log=log,
    )  # fmt: skip


def _profile(config, w: _Workdir, log) -> None:
    """The sweep and the partitions on each target (a finished profile is kept)."""
    os.makedirs(w.profiles, exist_ok=True)
    for name in PROFILES:
        path = w.profile(name)
        if os.path.exists(path):
            continue
        machine, what = name.split("_")
        section = config[machine]
        source = w.sweep if what == "sweep" else w.bundle
        rep = profile_lib.profile(source, profile_lib.Target.parse(section.target), section.runs)
        write_json_atomic(path, rep)
        log(f"profiled {what} on the {machine} ({section.target}) -> {path}")


def _fit(config, w: _Workdir, log) -> None:
    report = latency_fit.run(
        w.bundle, w.profile("device_sweep"), w.profile("edge_sweep"),
        device_paths=w.profile("device_parts"), edge_paths=w.profile("edge_parts"),
        form=config.fit.form,
    )  # fmt: skip
    write_json_atomic(w.fit, report)
    log(latency_fit.format_report(report))


def emulation(device_parts: Mapping, edge_parts: Mapping, slowdown: float) -> dict:
    """How far the emulated device is from ``slowdown`` x the edge, signature by signature.

    Both profiles time the same partition signatures; on a faithful emulation
    every ratio device / edge equals the device target's slowdown.
    """
    dev, edge = device_parts["signatures"], edge_parts["signatures"]
    ratios = {n: dev[n]["median_ms"] / edge[n]["median_ms"] for n in dev if edge[n]["median_ms"]}
    r = np.array(list(ratios.values()))
    return {
        "slowdown": slowdown,
        "signatures": len(r),
        "ratio_median": float(np.median(r)),
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
        "ratios": ratios,
    }


def _report(config, w: _Workdir) -> dict:
    train = _load(os.path.join(w.train, "report.json"))
    manifest = _load(os.path.join(w.bundle, "manifest.json"))
    fit = _load(w.fit)
    bench = _load(os.path.join(w.bench, "edgent_bench.json"))
    part = manifest["partitions"]
    device_target = profile_lib.Target.parse(config.device.target)
    paths = fit.get("paths", {})
    keys = ("name", "position", "accuracy", "backbone_agreement")
    return {
        "model_config": config.model_config,
        **({"distill": config.distill.to_dict()} if _distilled(config) else {}),
        "train": {
            "final_accuracy": train["final_accuracy"],
            "exits": [{k: e[k] for k in keys if k in e} for e in train["exits"]],
        },
        "bundle": {
            "exits": [e["name"] for e in part["exits"]],
            "cut_points": part["cut_points"],
            "activation_bytes": {p: a["bytes"] for p, a in part["activations"].items()},
            "signatures": len(part["signatures"]),
            "options": len(planner.options(manifest)),
            "encodings": encodings_brief(part),
        },
        "fit": {
            "kinds": {
                t: {k: _fit_brief(k, r) for k, r in kinds.items()}
                for t, kinds in fit["kinds"].items()
            },
            "paths": {k: paths[k] for k in ("count", "mape", "p90_ape", "max_ape") if k in paths},
            **({"mbconv": fit["mbconv"]} if "mbconv" in fit else {}),
        },
        "emulation": emulation(
            _load(w.profile("device_parts")),
            _load(w.profile("edge_parts")),
            device_target.slowdown,
        ),
        "bench": {
            "settings": {k: bench[k] for k in _BENCH_SETTINGS},
            "bandwidth": [_brief(s) for s in bench["bandwidth"]],
            "deadline": [_brief(s) for s in bench["deadline"]],
            "trace": _brief(bench["trace"]),
            "seconds": bench["seconds"],
        },
        "seconds": w.finished(),
    }


_BENCH_SETTINGS = ("deadline_ms", "frames", "margin", "servers", "bandwidth_mbps", "deadlines",
                   "policies")  # fmt: skip
_BRIEF = ("policy", "bandwidth", "deadline_ms", "frames", "deadline_met", "accuracy",
          "effective_accuracy", "mean_ms", "p95_ms", "predicted_mean_ms", "mean_abs_error_ms",
          "fallbacks", "plans", "encodings", "bandwidth_changes")  # fmt: skip


def encodings_brief(part: Mapping) -> dict:
    """Per cut-tensor encoding measured at export: cuts, bytes range, worst agreement."""
    out: dict[str, dict] = {}
    for act in part["activations"].values():
        for e in act.get("encodings", ()):
            b = out.setdefault(e["name"], {"cuts": 0, "bytes": [e["bytes"], e["bytes"]],
                                           "min_agreement": 1.0})  # fmt: skip
            b["cuts"] += 1
            b["bytes"] = [min(b["bytes"][0], e["bytes"]), max(b["bytes"][1], e["bytes"])]
            b["min_agreement"] = min(
                [b["min_agreement"], *(x["agreement"] for x in e["exits"].values())]
            )
    return out


def _fit_brief(kind: str, r: Mapping) -> dict:
    """The kept form of one kind and its held-out MAPE (loading: in-sample, few sizes)."""
    if kind == "loading":
        return {"form": "linear", "train_mape": r["train_mape"]}
    return {"form": r["form"], "heldout_mape": r["forms"][r["form"]]["heldout_mape"]}


def _brief(summary: Mapping) -> dict:
    return {k: summary[k] for k in _BRIEF if k in summary}


def format_report(report: Mapping) -> str:
    """The lines ``python -m train.edgent`` prints."""
    t, b, f, e = report["train"], report["bundle"], report["fit"], report["emulation"]
    d = report.get("distill")
    model = f"{d['backbone']} + distilled exits" if d else report["model_config"]
    lines = [
        f"{model}: final accuracy {t['final_accuracy']:.4f}; exits "
        + ", ".join(
            f"{x['name']} {x['accuracy']:.3f}"
            + (f" (backbone {x['backbone_agreement']:.3f})" if "backbone_agreement" in x else "")
            for x in t["exits"]
        ),
        f"bundle: {len(b['exits'])} exits, cut points {b['cut_points']}, "
        f"{b['signatures']} partition signatures, {b['options']} (exit, partition, encoding) "
        "options; cut encodings (cuts, worst agreement with float32): "
        + (", ".join(f"{n} {e['cuts']} {e['min_agreement']:.3f}"
                     for n, e in b.get("encodings", {}).items()) or "float32 only"),
    ]  # fmt: skip
    if "activation_bytes" in b:
        acts = b["activation_bytes"]
        lines.append(
            "bytes crossing each cut (fp32; input first): "
            + ", ".join(f"p{p} {n:,}" for p, n in acts.items())
        )
    for target, kinds in f["kinds"].items():
        parts = []
        for k, r in kinds.items():
            m = r.get("heldout_mape", r.get("train_mape"))
            parts.append(f"{k} {r['form']} " + ("-" if m is None else f"{m:.1f}%"))
        lines.append(f"fit {target} (held-out MAPE): " + ", ".join(parts))
    if "mbconv" in f:
        m = f["mbconv"]
        forms = [f"{k} {m[k]['mape']:.1f}%" for k in ("unit", "parts") if isinstance(m[k], dict)]
        lines.append(f"MBConv latency as (whole-path MAPE): {', '.join(forms)}; kept {m['kept']}")
    if f["paths"]:
        p = f["paths"]
        lines.append(
            f"whole path ({p['count']} pairs): MAPE {p['mape']:.1f}%, p90 {p['p90_ape']:.1f}%, "
            f"max {p['max_ape']:.1f}%"
        )
    lines.append(
        f"emulated device / edge, measured per partition signature: median "
        f"{e['ratio_median']:.1f}x (min {e['ratio_min']:.1f}, max {e['ratio_max']:.1f}) "
        f"for slowdown {e['slowdown']:g}"
    )
    for s in report["bench"]["bandwidth"]:
        top = max(s["plans"], key=s["plans"].get)
        lines.append(
            f"bandwidth {s['bandwidth']} Mbps: {top}, met {s['deadline_met']:.3f}, "
            f"mean {s['mean_ms']:.2f} ms (predicted {s['predicted_mean_ms']:.2f})"
        )
    tr = report["bench"]["trace"]
    lines.append(
        f"trace: {tr['frames']} frames, met {tr['deadline_met']:.3f}, accuracy "
        f"{tr['accuracy']:.3f}, mean {tr['mean_ms']:.2f} ms, plans {tr['plans']}"
    )
    lines.append("figures: " + ", ".join(report.get("figures", [])))
    return "\n".join(lines)
