"""MCDNN's report: targets per catalog, Pareto plots, the Fig. 11 analogue and the text summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexjax.io import save_figure_atomic
from runtime.ams import format_report as ams_format


def targets(entries: Sequence[Mapping[str, Any]], max_drop_points: float = 2.0) -> dict:
    """The issue's catalog targets: >= 5x smaller, >= 2x faster, each within 2 points."""
    ok = [e for e in entries if e["accuracy_drop_points"] <= max_drop_points]

    def best(key):
        e = max(ok, key=lambda e: e[key]) if ok else None
        return (
            {
                "variant": e["name"],
                "ratio": e[key],
                "accuracy_drop_points": e["accuracy_drop_points"],
            }
            if e
            else None
        )

    mem, lat = best("memory_ratio"), best("latency_ratio")
    return {
        "max_drop_points": max_drop_points,
        "memory": {**(mem or {}), "target": 5.0, "met": bool(mem and mem["ratio"] >= 5.0)},
        "latency": {**(lat or {}), "target": 2.0, "met": bool(lat and lat["ratio"] >= 2.0)},
    }


def plot_pareto(
    entries: Sequence[Mapping[str, Any]],
    title: str,
    path: str,
    ylabel: str = "test accuracy (LiteRT)",
) -> None:
    """Accuracy vs bytes / FLOPs / measured latency / energy per run; Pareto points joined."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    keys = [("bytes", "bytes on disk"), ("flops", "FLOPs"), ("latency_ms", "LiteRT ms"),
            ("energy_run_j", "energy / run (J)")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    acc = np.array([e["accuracy"] for e in entries])
    for ax, (k, label) in zip(axes, keys):
        v = np.array([e[k] for e in entries], np.float64)
        ax.scatter(v, acc, s=18)
        for e, vi, ai in zip(entries, v, acc):
            ax.annotate(e["name"], (vi, ai), fontsize=6)
        order = np.argsort(v)
        front, best = [], -1.0
        for i in order:
            if acc[i] > best:
                front.append(i)
                best = acc[i]
        ax.plot(v[front], acc[front], "r-", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def plot_fig11(rep: Mapping[str, Any], path: str) -> None:
    """Served fraction, energy per served request and accuracy per policy, and over the day."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    names = list(rep["policies"])
    pols = rep["policies"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    axes[0].bar(names, [pols[n]["served_fraction"] for n in names])
    axes[0].set_ylabel("fraction of requests served")
    axes[1].bar(names, [pols[n]["energy_per_served_j"] or 0 for n in names])
    axes[1].set_ylabel("energy per served request (J)")
    axes[2].bar(names, [pols[n]["accuracy_served"] or 0 for n in names])
    axes[2].set_ylim(0.5, 1.0)
    axes[2].set_ylabel("accuracy of served requests")
    for n in names:
        tl = pols[n]["timeline"]
        axes[3].plot(
            [b["t0_s"] / 3600 for b in tl], [b["served_fraction"] or 0 for b in tl], label=n
        )
    axes[3].set_xlabel("hour of the day")
    axes[3].set_ylabel("served fraction")
    axes[3].legend(fontsize=7)
    for ax in axes[:3]:
        ax.tick_params(axis="x", rotation=30)
    b = rep["budgets"]
    fig.suptitle(
        f"AMS over a day: {rep['requests']} requests, {b['energy_j']:.3g} J, "
        f"{b['memory_bytes'] / 1e6:.1f} MB cache"
    )
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


def format_report(cat: Mapping[str, Any]) -> str:
    """A readable summary: variants per task, targets, sharing, specialization, AMS."""
    lines = []
    for t, task in cat["tasks"].items():
        lines.append(f"== {t} ==")
        lines.append(
            f"{'variant':<24} {'acc':>6} {'drop':>5} {'bytes':>9} {'mem x':>6} "
            f"{'ms':>7} {'lat x':>6} {'mJ/run':>7}"
        )
        for e in task["variants"]:
            lines.append(
                f"{e['name']:<24} {e['accuracy']:>6.4f} {e['accuracy_drop_points']:>5.2f} "
                f"{e['bytes']:>9,} {e['memory_ratio']:>6.2f} {e['latency_ms']:>7.4f} "
                f"{e['latency_ratio']:>6.2f} {e['energy_run_j'] * 1e3:>7.4f}"
            )
        tg = task["targets"]
        lines.append(
            f"targets: memory >=5x {'MET' if tg['memory']['met'] else 'missed'} "
            f"({tg['memory'].get('variant')}, {tg['memory'].get('ratio', 0):.2f}x); "
            f"latency >=2x {'MET' if tg['latency']['met'] else 'missed'} "
            f"({tg['latency'].get('variant')}, {tg['latency'].get('ratio', 0):.2f}x)"
        )
    sh = cat.get("shared")
    if sh:
        lines.append(f"sharing: {sh['speedup']:.2f}x vs separate models; accuracy {sh['accuracy']}")
    sp = cat.get("specialize")
    if sp and sp.get("detected"):
        r = sp["retrain_seconds"]
        lines.append(
            f"specialize {sp['detected_classes']}: full {r['full_retrain_s']:.1f} s, retarget "
            f"{r['retarget_s']:.1f} s, +pre-forward {r['retarget_preforward_s']:.2f} s; cascade "
            f"acc {sp['stream']['cascade_accuracy']:.4f} vs general "
            f"{sp['stream']['general_accuracy']:.4f} at "
            f"{sp['stream']['cascade_latency_ratio']:.2f}x the latency"
        )
    if "ams_report" in cat:
        lines.append(ams_format(cat["ams_report"]))
    return "\n".join(lines)
