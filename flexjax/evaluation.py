"""Evaluating a multi-exit network: logits per exit, calibrated thresholds, the report.

`evaluate_and_report` is the last stage of ``python -m train.multi_exit``: per
exit accuracy, thresholds calibrated on the validation split (FLOPs as the
cost, `flexjax.exits.calibrate`), their effect on the test split, an epsilon
sweep, and the same on video streams when the config has video.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from flexjax import config as config_lib
from flexjax import costs, exits
from flexjax import data as data_lib
from flexjax.io import (
    jsonable,
    save_figure_atomic,
)
from flexjax.models import build
from flexjax.spec import FINAL, Net


@functools.lru_cache(maxsize=8)
def _predict_fn(net: Net):
    model = build(net)
    return jax.jit(lambda v, xb: model.apply(v, xb, train=False))


def predict(
    net: Net,
    variables: dict,
    x: np.ndarray,
    batch_size: int = 256,
    sharding: NamedSharding | None = None,
) -> dict[str, np.ndarray]:
    """Logits of every exit on `x` (inference mode), as numpy arrays."""
    fn = _predict_fn(net)
    outs: dict[str, list[np.ndarray]] = {n: [] for n in net.exit_names}
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        n = len(xb)
        if n < batch_size:  # one compiled shape: pad the last batch
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
        if sharding is not None:
            xb = jax.device_put(xb, sharding)
        res = jax.device_get(fn(variables, xb))
        for name in net.exit_names:
            outs[name].append(np.asarray(res[name][:n], np.float32))
    return {n: np.concatenate(v) for n, v in outs.items()}


def accuracies(logits: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    return {n: float((v.argmax(-1) == labels).mean()) for n, v in logits.items()}


def evaluate_and_report(
    net: Net,
    variables: dict,
    splits: data_lib.Splits,
    config: ml_collections.ConfigDict,
    sharding: NamedSharding | None = None,
) -> dict:
    """Per-exit accuracy, calibrated thresholds (val) and their effect (test)."""
    nc = costs.of(net)
    cal, test, test_acc, sweep = _calibrate_and_test(
        net, variables, splits.val, splits.test, nc, config, sharding
    )
    rows = []
    for name in net.exit_names:
        rows.append(
            {
                "name": name,
                "position": net.exit_position(name),
                "accuracy": test_acc[name],
                "exit_rate": test.rates[name],
                "exited_accuracy": test.accuracies[name],
                "flops": nc.exit_flops[name],
                "head_flops": nc.heads[name].flops if name != FINAL else 0,
                "threshold": cal.thresholds.get(name),
            }
        )
    backbone = nc.backbone_flops
    video = (
        _video_report(net, variables, splits, nc, config, sharding)
        if config.video.enabled
        else None
    )
    return jsonable(
        {
            "model": config.model.name,
            "net": net.name,
            "dataset": config.data.name,
            "num_test": len(splits.test),
            "num_val": len(splits.val),
            "criterion": cal.criterion,
            "epsilon": cal.epsilon,
            "exits": rows,
            "final_accuracy": test_acc[FINAL],
            "early_exit_accuracy": test.accuracy,
            "expected_flops": test.expected_cost,
            "backbone_flops": backbone,
            "flops_ratio": test.expected_cost / backbone,
            "calibration": cal.to_dict(),
            "tradeoff": sweep,
            **({"video": video} if video else {}),
        }
    )


def _calibrate_and_test(net, variables, val, test, nc, config, sharding):
    """Calibrates on `val`, measures on `test`; also sweeps epsilon for the trade-off curve."""
    bs = config.train.eval_batch_size
    val_logits = predict(net, variables, val.x, bs, sharding)
    test_logits = predict(net, variables, test.x, bs, sharding)

    def at(epsilon):
        cal = exits.calibrate(
            val_logits,
            val.y,
            nc.exit_flops,
            criterion=config.exits.criterion,
            epsilon=epsilon,
            names=net.exit_names,
            **config_lib.calibration_options(config),
        )
        stats = exits.simulate(
            test_logits, test.y, cal.thresholds, cal.criterion, nc.exit_flops, net.exit_names
        )
        return cal, stats

    cal, stats = at(config.exits.epsilon)
    sweep = []
    for eps in sorted({*exits.EPSILONS, config.exits.epsilon}):
        c, st = at(eps)
        sweep.append(
            {
                "epsilon": eps,
                "thresholds": c.thresholds,
                "val_accuracy": c.val.accuracy,
                "accuracy": st.accuracy,
                "expected_flops": st.expected_cost,
                "flops_ratio": st.expected_cost / nc.backbone_flops,
            }
        )
    return cal, stats, accuracies(test_logits, test.y), sweep


def plot_tradeoff(report: Mapping[str, Any], path: str) -> None:
    """Accuracy vs expected FLOPs from the epsilon sweeps (test split, and video if present)."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series = [("test split", report)]
    if "video" in report:
        series.append(("video stream", report["video"]))
    for (label, part), color in zip(series, ("tab:blue", "tab:orange")):
        pts = part["tradeoff"]
        ax.plot(
            [p["flops_ratio"] for p in pts],
            [p["accuracy"] for p in pts],
            "o-",
            color=color,
            label=f"early exits, {label}",
        )
        ax.axhline(part["final_accuracy"], color=color, ls="--", lw=1, label=f"backbone, {label}")
        labels: dict[tuple[float, float], list[str]] = {}
        for p in pts:  # several epsilons can land on the same thresholds
            labels.setdefault((p["flops_ratio"], p["accuracy"]), []).append(f"{p['epsilon']:g}")
        for xy, eps in labels.items():
            text = f"ε={eps[0]}" if len(eps) == 1 else f"ε={eps[0]}…{eps[-1]}"
            ax.annotate(text, xy, fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xlabel("expected FLOPs / backbone FLOPs")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report['net']} on {report['dataset']}: {report['criterion']} thresholds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def _video_report(net, variables, splits, nc, config, sharding) -> dict:
    """Early exits on video: calibrated on a val-split stream, measured on a test-split one."""
    v = config.video
    streams = {}
    for split, offset in (("val", 1000), ("test", 0)):
        vcfg = data_lib.VideoConfig(
            num_clips=v.num_clips, frames_per_clip=v.frames_per_clip, seed=v.seed + offset
        )
        streams[split] = data_lib.make_stream(getattr(splits, split), vcfg)
    cal, stats, acc, sweep = _calibrate_and_test(
        net,
        variables,
        streams["val"].as_dataset(),
        streams["test"].as_dataset(),
        nc,
        config,
        sharding,
    )
    difficulty = streams["test"].difficulty
    edges = np.quantile(difficulty, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bins = np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, 4)
    by_difficulty = []
    for b in range(5):
        m = bins == b
        by_difficulty.append(
            {
                "difficulty": [float(edges[b]), float(edges[b + 1])],
                "frames": int(m.sum()),
                "accuracy": float(stats.correct[m].mean()) if m.any() else None,
                "mean_exit_index": float(stats.exit_index[m].mean()) if m.any() else None,
                "expected_flops": float(
                    np.mean([nc.exit_flops[net.exit_names[i]] for i in stats.exit_index[m]])
                )
                if m.any()
                else None,
            }
        )
    return {
        "frames": len(difficulty),
        "thresholds": cal.thresholds,
        "final_accuracy": acc[FINAL],
        "early_exit_accuracy": stats.accuracy,
        "exit_rates": stats.rates,
        "expected_flops": stats.expected_cost,
        "flops_ratio": stats.expected_cost / nc.backbone_flops,
        "by_difficulty": by_difficulty,
        "tradeoff": sweep,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """A plain-text table of a report (what the demo prints)."""
    lines = [
        f"{report['net']} on {report['dataset']} (test n={report['num_test']}, "
        f"criterion={report['criterion']}, epsilon={report['epsilon']:.3f})",
        f"{'exit':<10}{'position':>9}{'accuracy':>10}{'exit rate':>11}{'exited acc':>12}"
        f"{'MFLOPs':>10}{'vs backbone':>13}",
    ]
    for r in report["exits"]:
        ea = r["exited_accuracy"]
        lines.append(
            f"{r['name']:<10}{r['position']:>9}{r['accuracy']:>10.4f}"
            f"{r['exit_rate']:>11.3f}{(f'{ea:.4f}' if ea is not None else '-'):>12}"
            f"{r['flops'] / 1e6:>10.3f}{r['flops'] / report['backbone_flops']:>12.2f}x"
        )
    lines.append(
        f"final accuracy {report['final_accuracy']:.4f} | early-exit accuracy "
        f"{report['early_exit_accuracy']:.4f} | expected "
        f"{report['expected_flops'] / 1e6:.3f} MFLOPs = "
        f"{report['flops_ratio']:.3f}x backbone "
        f"({report['backbone_flops'] / 1e6:.3f} MFLOPs)"
    )
    if "video" in report:
        v = report["video"]
        rates = " ".join(f"{k}={r:.3f}" for k, r in v["exit_rates"].items())
        lines.append(
            f"video ({v['frames']} frames): final accuracy {v['final_accuracy']:.4f} | "
            f"early-exit accuracy {v['early_exit_accuracy']:.4f} | exit rates {rates} | "
            f"expected {v['flops_ratio']:.3f}x backbone FLOPs"
        )
        lines.append(
            "  by difficulty quintile (easy -> hard): "
            + " | ".join(
                f"acc {b['accuracy']:.2f}, {b['expected_flops'] / report['backbone_flops']:.2f}x"
                for b in v["by_difficulty"]
            )
        )
    if "train" in report:
        tr = report["train"]
        lines.append(
            f"trained {tr['steps']} steps on {tr['devices']} {tr['platform']} device(s): "
            f"{tr['images_per_sec']} images/s ({tr['train_seconds']} s + "
            f"{tr['compile_seconds']} s compile)"
        )
    return "\n".join(lines)
