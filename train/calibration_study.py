"""Does a threshold calibration hold on test? Random re-splits of a workdir's held-out frames.

  python -m train.calibration_study --workdir=runs/demo/flexdnn --resplits=20 \\
      --epsilon=0.01 --delta=0.05 [--margin=0.005] [--methods=empirical,margin,ucb,ltt] \\
      [--val-fraction=0.5] [--seed=0] [--cache-dir=DIR] [--json=OUT]

`--workdir` is a multi-exit training workdir (``train.multi_exit``; FlexDNN's
``final/`` and BranchyNet's ``branchy/`` are such workdirs) or a FlexDNN job
directory, whose ``final`` (FlexDNN) and ``branchy`` (BranchyNet) models are
then both studied with the same options. The held-out frames are the
workdir's validation and test splits together. Every exit's logits on them
(and the final exit's) are computed once from the saved model and cached in
``heldout_logits.npz`` (in the workdir, or ``--cache-dir``), keyed by the net
and the data config, so a second run loads no JAX model.

Each re-split draws a random ``--val-fraction`` of the held-out frames as
validation and keeps the rest as test; every method (`flexjax.exits.METHODS`)
calibrates on validation at ``--epsilon`` and is measured on test. Reported
per method: how often the test loss (final-exit accuracy minus early-exit
accuracy, on test) exceeds epsilon, its mean and 90th percentile, and what the
thresholds buy: the mean fraction of frames leaving at a side exit and the
mean expected FLOPs per frame as a fraction of the backbone's (``cost``), with
the mean test accuracy of the early-exit model and of the final exit alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from flexjax import exits as exits_lib
from flexjax.costs import of as costs_of
from flexjax.io import write_json_atomic
from flexjax.spec import Net
from runtime import args as args_lib

CACHE_FILE = "heldout_logits.npz"
MAX_RESPLITS = 10_000


def resplit_study(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    costs: Mapping[str, float],
    backbone_cost: float,
    *,
    criterion: str,
    epsilon: float,
    delta: float,
    margin: float,
    methods: Sequence[str] = exits_lib.METHODS,
    resplits: int = 20,
    val_fraction: float = 0.5,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict:
    """Calibrates on random validation parts of the frames and measures on the rest.

    Args:
      logits: exit name -> [N, C] logits of the held-out frames (final exit last).
      labels: [N] labels.
      costs: exit name -> cost of a frame leaving there; `backbone_cost` the
        backbone's (for the cost ratio).
      methods: calibration methods to compare (`flexjax.exits.METHODS`).
      resplits: random re-splits (each method sees the same splits).
      val_fraction: fraction of the frames drawn as validation, in (0, 1).

    Returns:
      ``{"methods": {method: summary}, "splits": [...]}``; a summary holds
      ``exceed_rate`` (fraction of re-splits whose test loss > epsilon),
      ``mean_test_loss``, ``p90_test_loss``, ``mean_exit_rate``,
      ``mean_cost_ratio``, ``mean_test_accuracy`` and the per-split values.

    Raises:
      ValueError: bad options, or a split that leaves validation or test empty.
    """
    names = tuple(names or logits)
    labels = np.asarray(labels)
    n = len(labels)
    for m in methods:
        exits_lib.check_options(m, epsilon, delta, margin)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * n))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"{n} held-out frames at val_fraction {val_fraction} leave "
            f"{'validation' if n_val < 1 else 'test'} empty"
        )
    if resplits < 1:
        raise ValueError(f"resplits must be >= 1, got {resplits}")
    rng = np.random.default_rng(seed)
    per: dict[str, dict[str, list]] = {m: {} for m in methods}
    for r in range(resplits):
        order = rng.permutation(n)
        val, test = np.sort(order[:n_val]), np.sort(order[n_val:])
        vl = {k: np.asarray(logits[k])[val] for k in names}
        tl = {k: np.asarray(logits[k])[test] for k in names}
        for m in methods:
            cal = exits_lib.calibrate(
                vl, labels[val], costs, criterion=criterion, epsilon=epsilon, names=names,
                method=m, delta=delta, margin=margin, seed=seed + r,
            )  # fmt: skip
            st = exits_lib.simulate(tl, labels[test], cal.thresholds, criterion, costs, names)
            final_acc = float((tl[names[-1]].argmax(-1) == labels[test]).mean())
            row = {
                "test_loss": final_acc - st.accuracy,
                "test_accuracy": st.accuracy,
                "final_accuracy": final_acc,
                "val_loss": cal.final_accuracy - cal.val.accuracy,
                "exit_rate": 1.0 - st.rates[names[-1]],
                "cost_ratio": st.expected_cost / backbone_cost,
            }
            for k, v in row.items():
                per[m].setdefault(k, []).append(float(v))
    summary = {}
    for m, rows in per.items():
        loss = np.array(rows["test_loss"])
        summary[m] = {
            "exceed_rate": float(np.mean(loss > epsilon + 1e-12)),
            "exceed_count": int(np.sum(loss > epsilon + 1e-12)),
            "mean_test_loss": float(loss.mean()),
            "p90_test_loss": float(np.quantile(loss, 0.9)),
            "max_test_loss": float(loss.max()),
            "mean_val_loss": float(np.mean(rows["val_loss"])),
            "mean_exit_rate": float(np.mean(rows["exit_rate"])),
            "mean_cost_ratio": float(np.mean(rows["cost_ratio"])),
            "mean_test_accuracy": float(np.mean(rows["test_accuracy"])),
            "mean_final_accuracy": float(np.mean(rows["final_accuracy"])),
            "per_split": rows,
        }
    return {
        "frames": n,
        "val_frames": n_val,
        "test_frames": n - n_val,
        "resplits": resplits,
        "epsilon": epsilon,
        "delta": delta,
        "margin": margin,
        "criterion": criterion,
        "seed": seed,
        "methods": summary,
    }


# ---------------------------------------------------------------------------
# Workdirs: held-out logits, computed once and cached.
# ---------------------------------------------------------------------------


def systems_of(workdir: str) -> dict[str, str]:
    """``{system: training workdir}``: the workdir itself, or a FlexDNN job's final + branchy.

    Raises:
      FileNotFoundError: neither a training workdir nor a FlexDNN job directory.
    """
    if os.path.isfile(os.path.join(workdir, "net.json")):
        return {os.path.basename(os.path.normpath(workdir)): workdir}
    found = {
        label: os.path.join(workdir, sub)
        for label, sub in (("flexdnn", "final"), ("branchynet", "branchy"))
        if os.path.isfile(os.path.join(workdir, sub, "net.json"))
    }
    if not found:
        raise FileNotFoundError(
            f"{workdir} is neither a trained multi-exit workdir (net.json + checkpoints) nor a "
            "FlexDNN job directory (final/, branchy/)"
        )
    return found


def _fingerprint(net_json: str, config: Mapping) -> str:
    key = json.dumps({"net": json.loads(net_json), "data": config.get("data")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def heldout_logits(workdir: str, cache_path: str, log=print) -> dict:
    """``{"logits", "labels", "names", "costs", "backbone_cost", "criterion"}`` of a workdir.

    Logits of every exit on the validation + test frames: read from
    `cache_path` when it was made from this net and data config, else computed
    from the saved model (JAX) and written there (atomically).
    """
    with open(os.path.join(workdir, "net.json")) as fh:
        net_json = fh.read()
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{workdir} has no config.json (not a training workdir)")
    with open(cfg_path) as fh:
        config = json.load(fh)
    fp = _fingerprint(net_json, config)

    net = Net.from_dict(json.loads(net_json))
    nc = costs_of(net)
    names = list(net.exit_names)
    out = {
        "names": names,
        "costs": {k: float(v) for k, v in nc.exit_flops.items()},
        "backbone_cost": float(nc.backbone_flops),
        "criterion": config.get("exits", {}).get("criterion", "entropy"),
    }
    if os.path.isfile(cache_path):
        with np.load(cache_path, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fp:
                out["logits"] = {k: z[f"logits/{k}"] for k in names}
                out["labels"] = z["labels"]
                log(f"{workdir}: held-out logits from {cache_path}")
                return out
    log(f"{workdir}: computing held-out logits (once; cached in {cache_path})")
    # lazy: JAX (and the data sets) load only when the cache misses
    import ml_collections

    from flexjax import checkpoint, evaluation, training  # lazy: JAX, as above

    splits = training.load_data(ml_collections.ConfigDict(config))
    saved, variables = checkpoint.load(workdir)
    x = np.concatenate([splits.val.x, splits.test.x])
    labels = np.concatenate([splits.val.y, splits.test.y]).astype(np.int64)
    logits = evaluation.predict(saved, variables, x)
    tmp = cache_path + ".tmp.npz"
    np.savez(
        tmp, fingerprint=np.array(fp), labels=labels,
        **{f"logits/{k}": np.asarray(logits[k], np.float32) for k in names},
    )  # fmt: skip
    os.replace(tmp, cache_path)
    out["logits"] = {k: np.asarray(logits[k], np.float32) for k in names}
    out["labels"] = labels
    return out


def format_table(report: dict) -> str:
    lines = []
    for system, rep in report["systems"].items():
        lines.append(
            f"{system}: {rep['frames']} held-out frames, {rep['resplits']} re-splits "
            f"({rep['val_frames']} val / {rep['test_frames']} test), {rep['criterion']}, "
            f"epsilon {rep['epsilon']:g}, delta {rep['delta']:g}, margin {rep['margin']:g}"
        )
        lines.append(
            f"  {'method':<10}{'test>eps':>10}{'mean loss':>11}{'p90 loss':>10}"
            f"{'exit rate':>11}{'cost':>8}{'accuracy':>10}{'final':>9}"
        )
        for m, s in rep["methods"].items():
            lines.append(
                f"  {m:<10}{s['exceed_count']:>5}/{rep['resplits']:<4}"
                f"{100 * s['mean_test_loss']:>10.2f}p{100 * s['p90_test_loss']:>9.2f}p"
                f"{s['mean_exit_rate']:>11.3f}{s['mean_cost_ratio']:>8.3f}"
                f"{s['mean_test_accuracy']:>10.4f}{s['mean_final_accuracy']:>9.4f}"
            )
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m train.calibration_study``."""
    p = args_lib.ArgumentParser(
        prog="python -m train.calibration_study", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workdir", required=True, type=args_lib.existing_dir(),
                   help="a multi-exit training workdir, or a FlexDNN job directory")  # fmt: skip
    p.add_argument("--resplits", type=args_lib.count(1, MAX_RESPLITS), default=20)
    p.add_argument("--epsilon", type=args_lib.real(0.0, 1.0, hi_open=True), default=0.01,
                   help="allowed accuracy loss, a fraction (0.01 = 1 point)")  # fmt: skip
    p.add_argument("--delta", type=args_lib.real(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.05, help="the ucb and ltt methods' error level")  # fmt: skip
    p.add_argument("--margin", type=args_lib.real(0.0, 1.0, hi_open=True), default=0.005,
                   help="the margin method's safety margin (fraction)")  # fmt: skip
    p.add_argument("--methods", default=",".join(exits_lib.METHODS),
                   help=f"comma-separated, from {', '.join(exits_lib.METHODS)}")  # fmt: skip
    p.add_argument("--val-fraction", type=args_lib.real(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.5, help="held-out share drawn as validation")  # fmt: skip
    p.add_argument("--seed", type=args_lib.seed(), default=0)
    p.add_argument("--criterion", default=None, choices=exits_lib.CRITERIA,
                   help="default: the workdir config's exits.criterion")  # fmt: skip
    p.add_argument("--cache-dir", default=None, type=args_lib.existing_dir(),
                   help="held-out logits cache (default: each workdir)")  # fmt: skip
    p.add_argument("--json", default=None, type=args_lib.output_file())
    return p


def _methods(text: str) -> list[str]:
    items = [m.strip() for m in text.split(",")]
    bad = [m for m in items if m not in exits_lib.METHODS]
    if not items or bad or len(set(items)) != len(items):
        raise ValueError(
            f"--methods must list distinct names from {', '.join(exits_lib.METHODS)}, got {text!r}"
        )
    return items


def run(a, log=print) -> dict:
    """The study of every system `--workdir` holds; returns the report."""
    methods = _methods(a.methods)
    for m in methods:
        exits_lib.check_options(m, a.epsilon, a.delta, a.margin)
    systems = systems_of(a.workdir)
    report = {"workdir": os.path.abspath(a.workdir), "systems": {}}
    for label, wd in systems.items():
        cache = os.path.join(a.cache_dir or wd, CACHE_FILE if not a.cache_dir else
                             f"{label}_{CACHE_FILE}")  # fmt: skip
        h = heldout_logits(wd, cache, log=log)
        rep = resplit_study(
            h["logits"], h["labels"], h["costs"], h["backbone_cost"],
            criterion=a.criterion or h["criterion"], epsilon=a.epsilon, delta=a.delta,
            margin=a.margin, methods=methods, resplits=a.resplits, val_fraction=a.val_fraction,
            seed=a.seed, names=h["names"],
        )  # fmt: skip
        rep["workdir"] = os.path.abspath(wd)
        rep["cost"] = "FLOPs (flexjax.costs exit_flops / backbone_flops)"
        report["systems"][label] = rep
    report["load_average"] = list(os.getloadavg())
    return report


def main(argv=None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(a) -> int:
    report = run(a, log=lambda s: print(s, file=sys.stderr))
    print(format_table(report))
    if a.json:
        write_json_atomic(a.json, report)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
