"""Exports a trained workdir as a bundle: one multi-signature .tflite + manifest.

  python -m export.bundle --workdir=runs/lenet --out=bundles/lenet \\
      [--precision=fp32|fp16|dynamic|int8] [--sparsity] [--overwrite]

Steps: restore ``(net, variables)`` and the training config; convert
(`export.convert`); check GPU-delegate compatibility by reading the
flatbuffer (`runtime.tflite_model`); check parity against JAX in the LiteRT
interpreter (fails the export if it does not hold); calibrate exit
thresholds on the exported model's own validation outputs (still images and,
if the config has video, a validation-split video stream) for several
epsilons; write ``manifest.json`` with every file's sha256. The bundle is
assembled in a temporary sibling directory and renamed into place, so a
failed export leaves nothing half-written and never touches an existing
bundle unless ``--overwrite`` is given.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags, logging

from export import convert
from export import partitions as partitions_lib
from export.staging import ExportError, Staged, rewrite_manifest, write_manifest
from flexjax import checkpoint, evaluation, training
from flexjax import config as config_lib
from flexjax import costs as costs_lib
from flexjax import data as data_lib
from flexjax import exits as exits_lib
from flexjax.cli import define_float_list, fail
from flexjax.spec import FINAL, Net
from runtime import tflite_model
from runtime.args import MAX_COUNT
from runtime.bundle import SCHEMA_VERSION, Bundle, summary
from runtime.executor import EarlyExitExecutor
from runtime.names import MODEL_FILE

FLOPS = "flops"  # thresholds minimise expected FLOPs (nothing was measured)
MEASURED_MS = "measured_ms"  # ... expected time from the bundle's measured signature times
FP32_TOLERANCE = 1e-4  # default max |delta logit| vs JAX
AGREEMENT_TARGET = 0.99  # default top-1 agreement vs JAX for fp16 / dynamic / int8


def load_workdir(workdir: str):
    """``(config, net, variables)`` of a `train.multi_exit` workdir."""

    path = os.path.join(workdir, "config.json")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} has no config.json (not a training workdir)")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    net, variables = checkpoint.load(workdir)
    return config, net, variables


def _signature_costs(net: Net, plan: convert.SignaturePlan, nc: costs_lib.NetCosts) -> dict:
    if plan.kind == "head":
        c = nc.heads[plan.exit]
    else:
        c = costs_lib.total(nc.layers[plan.start : plan.stop])
        if plan.kind == "stage":  # the segment, then its head
            c = costs_lib.total([c, nc.heads[plan.exit]])
    return {
        "flops": c.flops,
        "param_bytes": c.param_bytes,
        "input_bytes": int(np.prod(plan.input_shape)) * 4,
        "output_bytes": sum(int(np.prod(shape)) * 4 for _, shape in plan.outputs),
    }


def _weight_stats(variables: Mapping[str, Any]) -> dict:
    """How many parameters there are and how many are exactly zero (pruned)."""

    leaves = [np.asarray(a) for a in jax.tree.leaves(variables.get("params", {}))]
    count = int(sum(a.size for a in leaves))
    zeros = int(sum((a == 0).sum() for a in leaves))
    return {"count": count, "zeros": zeros, "zero_fraction": zeros / max(count, 1)}


def _parity(net, variables, plans, model, precision, test, parity_examples, executor, tol, agree):
    """Runs every signature in LiteRT against JAX; raises ExportError if parity fails.

    Every signature is checked on up to 64 of the `parity_examples` test inputs (a caller
    that asks for fewer examples, e.g. a demo, gets fewer: JAX on 64 frames per signature
    of a 224 px backbone is most of an export's time), the chained exits on all of them.
    """
    k = min(64, parity_examples, len(test.x))
    inputs = convert.representative_inputs(net, variables, plans, test.x[:k])
    per_sig = {}
    for plan in plans:
        names = [n for n, _ in plan.outputs]
        ref = convert.jax_outputs(net, variables, plan, inputs[plan.name])
        refs = ref if plan.extra_outputs else (ref,)
        sig = model.signature(plan.name, names if plan.extra_outputs else None)
        outs = [sig(np.ascontiguousarray(x[None])) for x in inputs[plan.name]]
        if not plan.extra_outputs:
            outs = [(o,) for o in outs]
        gots = [np.concatenate([o[j] for o in outs]) for j in range(len(names))]
        diff = max(float(np.abs(g - r).max()) for g, r in zip(gots, refs))
        scale = max(float(max(1.0, np.abs(r).max())) for r in refs)
        per_sig[plan.name] = {"examples": k, "max_abs_diff": diff, "scale": scale}
    xs = test.x[:parity_examples]

    ref_logits = evaluation.predict(net, variables, xs)
    got_logits = executor.all_logits(xs)
    full_sig = model.signature(convert.FULL)
    full = np.concatenate([full_sig(np.ascontiguousarray(x[None])) for x in xs])
    chain = {}
    for name in net.exit_names:
        chain[name] = {
            "max_abs_diff": float(np.abs(got_logits[name] - ref_logits[name]).max()),
            "top1_agreement": float(
                (got_logits[name].argmax(-1) == ref_logits[name].argmax(-1)).mean()
            ),
        }
    chain[convert.FULL] = {
        "max_abs_diff": float(np.abs(full - ref_logits[FINAL]).max()),
        "top1_agreement": float((full.argmax(-1) == ref_logits[FINAL].argmax(-1)).mean()),
    }
    failures = []
    if precision == "fp32":
        for name, r in per_sig.items():
            if r["max_abs_diff"] > tol * r["scale"]:
                failures.append(f"{name} max|d|={r['max_abs_diff']:.2e}")
        for name, r in chain.items():
            if r["max_abs_diff"] > tol:
                failures.append(f"{name} logits max|d|={r['max_abs_diff']:.2e}")
    else:
        for name, r in chain.items():
            if r["top1_agreement"] < agree:
                failures.append(f"{name} top-1 agreement {r['top1_agreement']:.3f}")
    result = {
        "precision": precision,
        "examples": len(xs),
        "split": "test",
        "criterion": (
            f"max |delta logit| <= {tol} (activations: relative to max(1, |ref|))"
            if precision == "fp32"
            else f"top-1 agreement with JAX >= {agree}"
        ),
        "signatures": per_sig,
        "exits": chain,
        "passed": not failures,
    }
    if failures:
        raise ExportError(f"{precision} parity with JAX failed: {'; '.join(failures)}")
    return result, got_logits


def _calibrations(
    logits, labels, net, nc, criterion, epsilons, source, exit_costs, cost, options=None
):
    rows = []
    for eps in epsilons:
        cal = exits_lib.calibrate(
            logits, labels, exit_costs, criterion=criterion, epsilon=eps, names=net.exit_names,
            **(options or {}),
        )  # fmt: skip
        row = {"source": source, "cost": cost, **cal.to_dict()}
        flops = cal.val.expected_cost if cost == FLOPS else _expected_flops(cal, nc)
        row["val_flops_ratio"] = flops / nc.backbone_flops
        row["examples"] = int(len(labels))
        rows.append(row)
    return rows


def _expected_flops(cal: exits_lib.Calibration, nc: costs_lib.NetCosts) -> float:
    return float(sum(rate * nc.exit_flops[n] for n, rate in cal.val.rates.items()))


def calibrate(
    manifest: dict,
    executor: EarlyExitExecutor,
    config: Any,
    splits: Any,
    *,
    exit_costs: Mapping[str, float] | None = None,
    cost: str = FLOPS,
    epsilons: Sequence[float],
    test_logits: Mapping[str, np.ndarray],
) -> dict:
    """Calibrates a bundle's thresholds on its own model's outputs, into `manifest`.

    The one place thresholds are chosen for a bundle: on the exported model's
    validation logits (the validation split, and a validation-split video
    stream when the config has video), minimising the expected cost of
    `exit_costs` (default FLOPs, ``cost="flops"``; a job that measured its
    signatures passes measured ms, ``cost="measured_ms"``) within each
    epsilon. Sets every exit's ``threshold`` (the config's epsilon, still
    images), ``calibration``, ``calibrations`` and the ``test`` section.

    Args:
      manifest: the bundle's manifest (updated in place and returned).
      executor: runs the bundle's model.
      config: the training config (``data``, ``video``, ``exits`` sections).
      splits: its data splits (`flexjax.data.Splits`).
      exit_costs: exit name -> cost of a frame leaving there.
      cost: what `exit_costs` measure (recorded in the manifest).
      epsilons: the calibration rows to compute (the config's is added).
      test_logits: exit name -> the model's logits on the first test frames.
    """
    net = Net.from_dict(manifest["net"])
    nc = costs_lib.of(net)
    exit_costs = dict(nc.exit_flops if exit_costs is None else exit_costs)
    criterion = config.exits.criterion
    default_eps = float(config.exits.epsilon)
    epsilons = sorted({*map(float, epsilons), default_eps})
    val_logits = executor.all_logits(splits.val.x)
    args = (net, nc, criterion, epsilons)
    opts = config_lib.calibration_options(config)  # config.calibration: the same for every bundle
    rows = _calibrations(val_logits, splits.val.y, *args, "val", exit_costs, cost, opts)
    if config.video.enabled:
        v = config.video
        vcfg = data_lib.VideoConfig(
            num_clips=v.num_clips, frames_per_clip=v.frames_per_clip, seed=v.seed + 1000
        )
        stream = data_lib.make_stream(splits.val, vcfg)
        vlogits = executor.all_logits(stream.x)
        rows += _calibrations(vlogits, stream.y, *args, "video_val", exit_costs, cost, opts)
    default = next(r for r in rows if r["source"] == "val" and r["epsilon"] == default_eps)
    test_y = splits.test.y[: len(next(iter(test_logits.values())))]
    tested = exits_lib.simulate(
        {n: test_logits[n] for n in net.exit_names},
        test_y,
        default["thresholds"],
        criterion,
        nc.exit_flops,
        net.exit_names,
    )
    for e in manifest["exits"]:
        e["threshold"] = default["thresholds"].get(e["name"])
        e["val_accuracy"] = float((val_logits[e["name"]].argmax(-1) == splits.val.y).mean())
        e["test_accuracy"] = float((test_logits[e["name"]].argmax(-1) == test_y).mean())
    manifest["calibration"] = {**default, "exit_costs": exit_costs}
    manifest["calibrations"] = rows
    manifest["test"] = {
        "examples": int(len(tested.correct)),
        "accuracy": tested.accuracy,
        "final_accuracy": next(e["test_accuracy"] for e in manifest["exits"] if e["name"] == FINAL),
        "exit_rates": tested.rates,
        "expected_flops": tested.expected_cost,
        "flops_ratio": tested.expected_cost / nc.backbone_flops,
    }
    return manifest


def calibrate_bundle(
    bundle_dir: str,
    config: Any,
    exit_costs: Mapping[str, float],
    *,
    cost: str = MEASURED_MS,
    log=print,
) -> dict:
    """Re-calibrates an exported bundle on `exit_costs` and rewrites its manifest (staged).

    For a job that measured the bundle's signatures: the thresholds it ships
    are then the ones its own report was measured with (`calibrate`, same
    validation data and epsilons as at export). Returns the new manifest.

    Raises:
      BundleError: not a bundle. ValueError: `exit_costs` misses an exit.
    """
    bundle = Bundle.from_dir(bundle_dir)
    manifest = json.loads(json.dumps(bundle.manifest))
    missing = sorted({e["name"] for e in manifest["exits"]} - set(exit_costs))
    if missing:
        raise ValueError(f"exit_costs has no cost for exits {missing}")
    splits = training.load_data(config)
    executor = EarlyExitExecutor(bundle, num_threads=1)
    n = int(manifest["test"]["examples"])
    calibrate(
        manifest, executor, config, splits, exit_costs=exit_costs, cost=cost,
        epsilons=[r["epsilon"] for r in manifest["calibrations"]],
        test_logits=executor.all_logits(splits.test.x[:n]),
    )  # fmt: skip
    rewrite_manifest(bundle_dir, manifest)
    thr = manifest["calibration"]["thresholds"]
    log(f"calibrated {os.path.basename(bundle_dir)} on {cost}: thresholds {thr}")
    return manifest


def export_bundle(workdir: str, out: str, **kwargs: Any) -> dict:
    """Exports a `train.multi_exit` workdir into the bundle directory `out`.

    Keyword arguments are those of `export_model`. Returns the manifest.

    Raises:
      FileNotFoundError / FileExistsError / ValueError: bad arguments or workdir.
      ExportError: parity with JAX failed (nothing is written).
    """
    _check_options(**kwargs)  # bad options fail before the workdir is read
    config, net, variables = load_workdir(workdir)
    return export_model(config, net, variables, out, source=os.path.abspath(workdir), **kwargs)


def _check_options(
    *,
    precision: str = "fp32",
    epsilons: Sequence[float] = exits_lib.EPSILONS,
    min_agreement: float = AGREEMENT_TARGET,
    max_logit_diff: float = FP32_TOLERANCE,
    parity_examples: int = 1000,
    **_: Any,
) -> None:
    if precision not in convert.PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(convert.PRECISIONS)}")
    for eps in epsilons:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"epsilon must be in [0, 1) (0.01 = 1 point); got {eps}")
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1]; got {min_agreement}")
    if not max_logit_diff >= 0.0:
        raise ValueError(f"max_logit_diff must be >= 0; got {max_logit_diff}")
    if parity_examples < 1:
        raise ValueError(f"parity_examples must be >= 1; got {parity_examples}")


def export_model(
    config: Any,
    net: Net,
    variables: Mapping[str, Any],
    out: str,
    *,
    source: str = "",
    precision: str = "fp32",
    sparsity: bool = False,
    overwrite: bool = False,
    epsilons: Sequence[float] = exits_lib.EPSILONS,
    parity_examples: int = 1000,
    num_calibration: int = 200,
    max_logit_diff: float = FP32_TOLERANCE,
    min_agreement: float = AGREEMENT_TARGET,
    partitions: bool = False,
    cuts: Sequence[int] | None = None,
    splits: Any = None,
    log=print,
) -> dict:
    """Exports an in-memory `(config, net, variables)` into the bundle directory `out`.

    `config` is the training config (ml_collections) of the model: its `data`
    section supplies the parity, calibration and test inputs and its `exits`
    section the criterion and default epsilon. `source` is recorded in the
    manifest (a workdir, or a description such as "catalog variant lowrank_r8").
    Any search or catalog job exports its variants through this one function.
    `partitions=True` adds Edgent's device/edge partition signatures
    (`export.partitions`, a second model file and a ``partitions`` manifest section);
    `cuts` limits them to those interior partition points. `splits` (a
    `flexjax.data.Splits`) replaces the config's data, for data no registered
    dataset loads (e.g. the real clips).

    Raises:
      FileExistsError / ValueError: bad arguments.
      ExportError: parity with JAX failed (nothing is written).
    """
    _check_options(
        precision=precision, epsilons=epsilons, min_agreement=min_agreement,
        max_logit_diff=max_logit_diff, parity_examples=parity_examples,
    )  # fmt: skip
    if partitions and precision == "int8":
        raise ValueError("--partitions supports fp32, fp16 and dynamic precision, not int8")
    t0 = time.perf_counter()
    staged = Staged(out, overwrite)
    try:
        manifest = _export(
            config, net, variables, staged.dir, precision, sparsity, epsilons,
            parity_examples, num_calibration, source, log, (max_logit_diff, min_agreement),
            partitions=partitions, cuts=cuts, splits=splits,
        )  # fmt: skip
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    log(f"bundle written to {staged.out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _export(
    config, net, variables, tmp, precision, sparsity, epsilons, parity_examples,
    num_calibration, source, log, parity_limits, partitions=False, cuts=None, splits=None,
) -> dict:  # fmt: skip

    splits = training.load_data(config) if splits is None else splits
    plans = convert.plan_signatures(net, stages=True)
    nc = costs_lib.of(net)
    rep = None
    if precision == "int8":
        rep = convert.representative_inputs(net, variables, plans, splits.train.x[:num_calibration])
    t = time.perf_counter()
    buf = convert.to_tflite(
        net, variables, plans, precision=precision, sparsity=sparsity, representative=rep,
        num_calibration=num_calibration,
    )  # fmt: skip
    convert_s = time.perf_counter() - t
    log(f"converted {len(plans)} signatures ({precision}) in {convert_s:.1f} s: {len(buf):,} bytes")
    model_path = os.path.join(tmp, MODEL_FILE)
    with open(model_path, "wb") as f:
        f.write(buf)
    sig_info = tflite_model.gpu_report(buf)
    gpu_bad = {n: list(s.gpu_offending) for n, s in sig_info.items() if not s.gpu_compatible}

    criterion = config.exits.criterion
    default_eps = float(config.exits.epsilon)
    signatures = {}
    for plan in plans:
        info = sig_info[plan.name]
        signatures[plan.name] = {
            **plan.to_dict(),
            **_signature_costs(net, plan, nc),
            "ops": info.ops,
            "gpu_compatible": info.gpu_compatible,
            "gpu_offending": list(info.gpu_offending),
        }
    exits = []
    for plan in plans:
        if plan.kind == "segment":
            head = next((p.name for p in plans if p.kind == "head" and p.exit == plan.exit), None)
            stage = next((p.name for p in plans if p.kind == "stage" and p.exit == plan.exit), None)
            after = net.get_exit(plan.exit).after if plan.exit != FINAL else len(net.layers) - 1
            exits.append(
                {
                    "name": plan.exit,
                    "after": after,
                    "segment": plan.name,
                    "head": head,
                    **({"stage": stage} if stage else {}),
                    "flops": nc.exit_flops[plan.exit],
                }
            )
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "format": "flexjax-bundle",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {"workdir": source, "exporter": "flexjax export.bundle"},
        "model": MODEL_FILE,
        "net": net.to_dict(),
        "precision": precision,
        "sparsity": bool(sparsity),
        "input": {
            "name": "x",
            "shape": [1, *net.input_shape],
            "dtype": "float32",
            "layout": "NHWC",
            "range": [0.0, 1.0],
            "normalization": "pixel / 255 (no mean or std); grayscale has 1 channel",
        },
        "data": config.data.to_dict(),
        "video": config.video.to_dict(),
        "signatures": signatures,
        "exits": exits,
        "criterion": criterion,
        "calibration": {"epsilon": default_eps, "thresholds": {}},  # filled below
        "costs": nc.to_dict(),
        "weights": _weight_stats(variables),
        "gpu": {"compatible": not gpu_bad, "offending": gpu_bad},
        "convert_seconds": convert_s,
        "files": {},
    }
    # A provisional manifest lets the runtime open the staged model for parity and calibration.
    write_manifest(tmp, manifest)
    bundle = Bundle.from_dir(tmp)
    executor = EarlyExitExecutor(bundle, num_threads=1)

    parity, test_logits = _parity(
        net, variables, plans, executor.model, precision, splits.test, parity_examples, executor,
        *parity_limits,
    )  # fmt: skip
    log(
        "parity: "
        + ", ".join(
            f"{n} agree={r['top1_agreement']:.4f} max|d|={r['max_abs_diff']:.1e}"
            for n, r in parity["exits"].items()
        )
    )
    calibrate(
        manifest, executor, config, splits, epsilons=epsilons,
        test_logits={n: v for n, v in test_logits.items()},
    )  # fmt: skip
    manifest["parity"] = parity
    if partitions:
        k = min(8, len(splits.test.x))
        manifest["partitions"] = partitions_lib.export_partitions(
            net, variables, tmp, precision=precision, check_x=splits.test.x[:k],
            check_logits={n: v[:k] for n, v in test_logits.items()},
            calibration_x=splits.train.x[:num_calibration],
            validation=(splits.val.x, splits.val.y), cuts=cuts, log=log,
        )  # fmt: skip
    write_manifest(tmp, manifest)
    Bundle.from_dir(tmp)  # the final bundle verifies
    return manifest


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)

    f = flags.FLAGS
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not f.workdir or not f.out:
        fail("--workdir and --out are required")
    try:
        epsilons = [float(e) for e in f.epsilons]
        manifest = export_bundle(
            f.workdir, f.out, precision=f.precision, sparsity=f.sparsity, overwrite=f.overwrite,
            epsilons=epsilons, parity_examples=f.parity_examples,
            num_calibration=f.num_calibration, max_logit_diff=f.max_logit_diff,
            min_agreement=f.min_agreement, partitions=f.partitions,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, ExportError) as e:
        fail(str(e))
    print(summary(manifest))
    if not manifest["gpu"]["compatible"]:
        print(
            f"warning: not GPU-delegate compatible: {manifest['gpu']['offending']}", file=sys.stderr
        )


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "train.multi_exit workdir to export")
    flags.DEFINE_string("out", None, "bundle directory to create")
    flags.DEFINE_enum("precision", "fp32", list(convert.PRECISIONS), "weight/activation precision")
    flags.DEFINE_bool("sparsity", False, "store (magnitude-pruned) weights in sparse form")
    flags.DEFINE_bool("overwrite", False, "replace an existing bundle at --out")
    define_float_list("epsilons", exits_lib.EPSILONS, "calibration epsilons",
                      lower_bound=0.0, upper_bound=0.999)  # fmt: skip
    flags.DEFINE_integer("parity_examples", 1000, "test examples checked against JAX",
                         lower_bound=0, upper_bound=MAX_COUNT)  # fmt: skip
    flags.DEFINE_integer("num_calibration", 200, "training images for int8 calibration",
                         lower_bound=1, upper_bound=100_000)  # fmt: skip
    flags.DEFINE_float("max_logit_diff", FP32_TOLERANCE, "fp32 parity: max |delta logit| vs JAX",
                       lower_bound=0.0, upper_bound=1e6)  # fmt: skip
    flags.DEFINE_float("min_agreement", AGREEMENT_TARGET, "fp16/int8 parity: top-1 agreement",
                       lower_bound=0.0, upper_bound=1.0)  # fmt: skip
    flags.DEFINE_bool("partitions", False, "add Edgent device/edge partition signatures")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    from flexjax.cli import parse_flags

    _define_flags()
    app.run(main, flags_parser=parse_flags)
