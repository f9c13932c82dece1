"""MCDNN's offline side: tasks, catalogs, sharing, specialization, and the AMS report.

`run(config, workdir)` is what ``python -m train.catalog`` calls; the steps are
listed in `train/catalog.py`. Everything the runtime needs (AMS, the shared
stem, ``--execute``) is written as data: ``catalog.json``, bundles,
``eval.npz``, ``shared/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from export import convert
from export.bundle import export_model
from flexjax import approx, checkpoint, costs, evaluation, models, specialize, training
from flexjax import config as config_lib
from flexjax.approx import plain
from flexjax.finetune import finetune
from flexjax.io import sha256_file, write_json_atomic
from flexjax.models import count_params, layer_name
from flexjax.spec import FINAL, Net, dense
from pipelines.mcdnn_report import plot_fig11, plot_pareto, targets
from runtime import ams
from runtime import traces as traces_lib
from runtime.adb import AdbTarget
from runtime.lite import Model
from runtime.mcdnn import SharedStem, time_interleaved, time_load
from runtime.names import CATALOG_FILE, FULL, MODEL_FILE, SHARED_MANIFEST
from runtime.skew import scan, skew_init

_VARIANT_KEYS = {"name", "recipe", "precision", "sparsity"}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a catalog config up front (before anything is trained or written).

    Raises:
      ValueError: one line naming the bad key and what is expected.
    """
    c = config_lib.validate(config, config_lib.catalog_defaults)  # keys and types
    c.base = config_lib.validate(c.base, config_lib.defaults)
    tasks = tuple(c.tasks)
    bad = [t for t in tasks if t not in specialize.TASKS]
    if bad or not tasks or tasks[0] != "digit" or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"tasks must start with 'digit' and be distinct names from "
            f"{list(specialize.TASKS)}, got {list(tasks)}"
        )
    names = []
    for i, v in enumerate(c.variants):
        v = dict(v)
        extra = sorted(set(v) - _VARIANT_KEYS)
        if extra or "name" not in v:
            raise ValueError(f"variants[{i}]: needs a name; unknown keys {extra}")
        if v.get("precision", "fp32") not in convert.PRECISIONS:
            raise ValueError(
                f"variant {v['name']}: precision must be one of {list(convert.PRECISIONS)}"
            )
        for step in v.get("recipe", []):
            approx.technique(dict(step).get("technique", "<missing>"))
        names.append(v["name"])
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    if "original" not in names or _variant(c, "original").get("recipe"):
        raise ValueError("the variants must include 'original' with an empty recipe")
    missing_tv = sorted(set(c.task_variants) - set(names))
    if missing_tv:
        raise ValueError(f"task_variants {missing_tv} are not variant names {names}")
    for key in ("rounds", "frames", "load_repeats", "threads"):
        if int(c.bench[key]) < 1:
            raise ValueError(f"bench.{key} must be >= 1, got {c.bench[key]}")
    for key in ("cpu_power_w", "dram_j_per_byte", "storage_j_per_byte"):
        if not float(c.energy[key]) >= 0:
            raise ValueError(f"energy.{key} must be >= 0, got {c.energy[key]}")
    s = c.specialize
    if s.variant not in names:
        raise ValueError(f"specialize.variant {s.variant!r} is not a variant name {names}")
    if not 0 < s.p <= 1 or not 1 <= s.n < 10 or s.window < 1:
        raise ValueError("specialize needs 1 <= n < 10, 0 < p <= 1 and window >= 1")
    if int(c.finetune.steps) < 0 or int(c.heads.steps) < 1:
        raise ValueError("finetune.steps must be >= 0 and heads.steps >= 1")
    return c


def _variant(c: ml_collections.ConfigDict, name: str) -> dict:
    for v in c.variants:
        if v["name"] == name:
            return plain(v)
    raise KeyError(name)


# ---------------------------------------------------------------------------
# Models per task (sharing the digit model's stem).
# ---------------------------------------------------------------------------


def task_net(net: Net, task: str) -> Net:
    """`net` with its logits layer resized for `task`."""
    k = specialize.TASKS[task]
    layers = (*net.layers[:-1], dense(k, use_bias=net.layers[-1]["use_bias"]))
    return net.replace(layers=layers, num_classes=k, exits=(), name=f"{net.name}_{task}")


def stem_trainable(stem: int):
    """A `finetune` predicate: only parameters above the first `stem` positions train."""
    frozen = {layer_name(i) for i in range(stem)}
    return lambda path: path.split("/")[0] not in frozen


def train_tasks(c, splits, workdir: str, log=print) -> dict[str, tuple[Net, dict]]:
    """``{task: (net, variables)}``: digit trained fully, the others on its frozen stem."""

    models_dir = os.path.join(workdir, "models")
    digit_dir = os.path.join(models_dir, "digit")
    t0 = time.perf_counter()
    training.train_and_evaluate(c.base, digit_dir)
    log(f"digit model ready ({time.perf_counter() - t0:.0f} s)")
    net, variables = checkpoint.load(digit_dir)
    out = {"digit": (net, variables)}
    for task in c.tasks[1:]:
        d = os.path.join(models_dir, task)
        if checkpoint.latest_step(os.path.join(d, "checkpoints")) is not None:
            out[task] = checkpoint.load(d)
            continue
        tnet = task_net(net, task)

        init = models.init(tnet, jax.random.PRNGKey(c.base.seed + 1))
        params = dict(init["params"])
        for i in range(c.stem):
            if layer_name(i) in variables["params"]:
                params[layer_name(i)] = variables["params"][layer_name(i)]
        tvars = {**init, "params": params}
        t0 = time.perf_counter()
        tvars = finetune(
            tnet, tvars, splits.train.x, specialize.relabel(splits.train.y, task),
            steps=int(c.heads.steps), batch_size=int(c.heads.batch_size),
            learning_rate=float(c.heads.learning_rate), trainable=stem_trainable(c.stem),
            seed=int(c.base.seed), augment_shift=int(c.heads.augment_shift),
        )  # fmt: skip
        tvars = jax.device_get(tvars)
        checkpoint.save_model(d, tnet, tvars)
        log(f"{task} head trained on the shared stem ({time.perf_counter() - t0:.0f} s)")
        out[task] = (tnet, tvars)
    return out


# ---------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------


def make_variant(
    net: Net,
    variables: dict,
    spec: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    teacher_logits: np.ndarray | None,
    ft: Mapping[str, Any],
    seed: int = 0,
) -> tuple[Net, dict, float]:
    """Applies a variant's recipe, fine-tunes it (distilled), re-applies pruning masks.

    Returns ``(net, variables, finetune_seconds)``.
    """
    recipe = list(spec.get("recipe", []))
    if not recipe:
        return net, variables, 0.0

    vnet, vvars = approx.apply_recipe(net, variables, recipe, seed=seed)
    t0 = time.perf_counter()
    if int(ft["steps"]) > 0:
        vvars = finetune(
            vnet, vvars, x, y, steps=int(ft["steps"]), batch_size=int(ft["batch_size"]),
            learning_rate=float(ft["learning_rate"]), teacher_logits=teacher_logits,
            distill_weight=float(ft["distill_weight"]), temperature=float(ft["temperature"]),
            seed=seed, augment_shift=int(ft["augment_shift"]),
        )  # fmt: skip
        # fine-tuning regrows pruned weights: prune again at the same sparsity
        prune_steps = [s for s in recipe if s["technique"] == "magnitude_prune"]
        if prune_steps:
            vnet, vvars = approx.apply_recipe(vnet, vvars, prune_steps, seed=seed)
    return vnet, jax.device_get(vvars), time.perf_counter() - t0


def _litert_accuracy(model_path: str, x: np.ndarray, y: np.ndarray, threads: int) -> float:
    sig = Model(model_path, num_threads=threads).signature(FULL)
    pred = np.array([int(np.argmax(sig(np.ascontiguousarray(xi[None])))) for xi in x])
    return float((pred == y).mean())


def _technique(spec: Mapping[str, Any]) -> str:
    steps = [s["technique"] for s in spec.get("recipe", [])]
    prec = spec.get("precision", "fp32")
    if prec != "fp32":
        steps.append(f"quantize_{prec}")
    return "+".join(steps) or "original"


def energy_model(entry: Mapping[str, Any], e: Mapping[str, Any]) -> tuple[float, float]:
    """``(energy_run_j, energy_load_j)`` from measured latency/load time and sizes (README)."""
    run = e["cpu_power_w"] * entry["latency_ms"] / 1e3 + e["dram_j_per_byte"] * entry["bytes"]
    load = e["storage_j_per_byte"] * entry["bytes"] + e["cpu_power_w"] * entry["load_ms"] / 1e3
    return float(run), float(load)


def build_variants(c, splits, tasks, workdir: str, log=print) -> dict[str, list[dict]]:
    """Makes, exports and measures the accuracy of every variant (resumable per variant)."""

    out: dict[str, list[dict]] = {}
    entries_dir = os.path.join(workdir, "entries")
    os.makedirs(entries_dir, exist_ok=True)
    for task, (net, variables) in tasks.items():
        names = [v["name"] for v in c.variants]
        if task != "digit":
            names = [n for n in names if n in set(c.task_variants)]
        y_train = specialize.relabel(splits.train.y, task)
        y_test = specialize.relabel(splits.test.y, task)
        teacher = evaluation.predict(net, variables, splits.train.x)[FINAL]
        out[task] = []
        for i, name in enumerate(names):
            path = os.path.join(entries_dir, f"{task}__{name}.json")
            if os.path.exists(path):
                with open(path) as f:
                    out[task].append(json.load(f))
                continue
            spec = _variant(c, name)
            vnet, vvars, ft_s = make_variant(
                net, variables, spec, splits.train.x, y_train, teacher, plain(c.finetune),
                seed=int(c.base.seed) + i,
            )  # fmt: skip
            rel = os.path.join("bundles", task, name)
            t0 = time.perf_counter()
            export_model(
                c.base, vnet, vvars, os.path.join(workdir, rel),
                source=f"catalog variant {task}/{name}", precision=spec.get("precision", "fp32"),
                sparsity=bool(spec.get("sparsity", False)), overwrite=True,
                parity_examples=200, log=lambda *_: None,
            )  # fmt: skip
            export_s = time.perf_counter() - t0
            checkpoint.save_model(
                os.path.join(workdir, "models", "variants", task, name), vnet, vvars
            )
            model_path = os.path.join(workdir, rel, MODEL_FILE)
            nc = costs.of(vnet)
            leaves = [np.asarray(a) for a in jax.tree.leaves(vvars["params"])]
            entry = {
                "name": name,
                "task": task,
                "technique": _technique(spec),
                "recipe": spec.get("recipe", []),
                "precision": spec.get("precision", "fp32"),
                "sparsity_storage": bool(spec.get("sparsity", False)),
                "accuracy": _litert_accuracy(model_path, splits.test.x, y_test, c.bench.threads),
                "params_count": count_params(vvars["params"]),
                "nonzero_params": int(sum((a != 0).sum() for a in leaves)),
                "bytes": os.path.getsize(model_path),
                "flops": int(nc.backbone_flops),
                "bundle": rel,
                "net": vnet.to_dict(),
                "finetune_s": ft_s,
                "export_s": export_s,
            }
            write_json_atomic(path, entry)
            log(
                f"{task}/{name}: acc {entry['accuracy']:.4f}, {entry['bytes']:,} B, "
                f"{entry['flops']:,} FLOPs ({ft_s:.0f} s fine-tune, {export_s:.0f} s export)"
            )
            out[task].append(entry)
    return out


def measure_costs(c, variants: dict[str, list[dict]], splits, workdir: str) -> dict:
    """Adds measured latency (interleaved vs the original), load time and energy to entries."""

    b = c.bench
    xs = [np.ascontiguousarray(x[None]) for x in splits.test.x[: b.frames]]
    info: dict[str, Any] = {"frames": len(xs), "rounds": int(b.rounds), "threads": int(b.threads)}
    adb = None
    if c.energy.adb_binary:
        adb = AdbTarget(c.energy.adb_serial or None, c.energy.adb_binary)
        info["adb_serial"] = adb.check()
    for entries in variants.values():
        paths = {e["name"]: os.path.join(workdir, e["bundle"], MODEL_FILE) for e in entries}
        sigs = {n: Model(p, num_threads=b.threads).signature(FULL) for n, p in paths.items()}
        stats = time_interleaved(sigs, xs, rounds=int(b.rounds), warmup=int(b.warmup))
        base = stats["original"]["mean_ms"]
        orig = next(e for e in entries if e["name"] == "original")
        for e in entries:
            s = stats[e["name"]]
            e["latency_ms"] = s["mean_ms"]
            e["latency_p50_ms"] = s["p50_ms"]
            e["latency_ratio"] = base / s["mean_ms"]  # > 1: faster than the original
            e["memory_ratio"] = orig["bytes"] / e["bytes"]  # > 1: smaller
            e["accuracy_drop_points"] = 100.0 * (orig["accuracy"] - e["accuracy"])
            e["load_ms"] = time_load(paths[e["name"]], repeats=int(b.load_repeats))["p50_ms"]
            e["energy_run_j"], e["energy_load_j"] = energy_model(e, c.energy)
            e["energy_source"] = "model"
            if adb is not None:
                t = adb.benchmark(paths[e["name"]], FULL, num_threads=b.threads, energy=True)
                if t.energy:
                    e["energy_run_j"] = t.energy["energy_per_inference_active_j"]
                    e["energy_load_j"] = (
                        c.energy.storage_j_per_byte * e["bytes"]
                        + t.energy["power_w"] * t.init_us * 1e-6
                    )
                    e["energy_source"] = f"adb {info['adb_serial']}"
                e["phone_latency_ms"] = t.avg_us / 1e3
    return info


# ---------------------------------------------------------------------------
# Sharing.
# ---------------------------------------------------------------------------


def build_shared(c, tasks, splits, workdir: str) -> dict:
    """Exports the stem once and a head per task; times shared vs separate execution."""

    net, variables = tasks["digit"]
    k = int(c.stem)
    shapes = net.shapes()
    act = tuple(shapes[k - 1][1])
    directory = os.path.join(workdir, "shared")
    os.makedirs(directory, exist_ok=True)
    stem_plan = convert.SignaturePlan(
        "stem", "segment", 0, k, FINAL, "x", "activation", tuple(net.input_shape), act
    )
    files = {"stem.tflite": convert.to_tflite(net, variables, [stem_plan])}
    heads = {}
    for task, (tnet, tvars) in tasks.items():
        for i in range(k):  # the stems really are the same weights
            a = jax.tree.leaves(tvars["params"].get(layer_name(i), {}))
            b = jax.tree.leaves(variables["params"].get(layer_name(i), {}))
            if not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)):
                raise ValueError(f"task {task} does not share the digit stem at position {i}")
        plan = convert.SignaturePlan(
            "head", "segment", k, len(tnet.layers), FINAL, "x", "logits", act,
            (tnet.num_classes,),
        )  # fmt: skip
        files[f"head_{task}.tflite"] = convert.to_tflite(tnet, tvars, [plan])
        heads[task] = f"head_{task}.tflite"
    for name, buf in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(buf)
    manifest = {
        "stem": "stem.tflite",
        "stem_positions": [0, k],
        "heads": heads,
        "files": {n: sha256_file(os.path.join(directory, n)) for n in files},
    }
    write_json_atomic(os.path.join(directory, SHARED_MANIFEST), manifest)

    shared = SharedStem(directory, num_threads=int(c.bench.threads))
    preds = shared.run_batch(splits.test.x)
    acc = {t: float((preds[t] == specialize.relabel(splits.test.y, t)).mean()) for t in tasks}
    fulls = {
        t: Model(os.path.join(workdir, "bundles", t, "original", MODEL_FILE)).signature(FULL)
        for t in tasks
    }
    xs = [np.ascontiguousarray(x[None]) for x in splits.test.x[: c.bench.frames]]
    stats = time_interleaved(
        {
            "separate": lambda x: [s(x) for s in fulls.values()],
            "shared": shared.run,
        },
        xs, rounds=int(c.bench.rounds), warmup=int(c.bench.warmup),
    )  # fmt: skip
    sep_bytes = sum(
        os.path.getsize(os.path.join(workdir, "bundles", t, "original", MODEL_FILE)) for t in tasks
    )
    return {
        "tasks": list(tasks),
        "accuracy": acc,
        "time_per_frame_ms": {k2: v["mean_ms"] for k2, v in stats.items()},
        "speedup": stats["separate"]["mean_ms"] / stats["shared"]["mean_ms"],
        "bytes": {"separate": sep_bytes, "shared": sum(len(b) for b in files.values())},
    }


# ---------------------------------------------------------------------------
# Specialization.
# ---------------------------------------------------------------------------


def run_specialization(c, tasks, variants, splits, workdir: str) -> dict:
    """Skew detection, Table 3 timings, and the cascade on a skewed stream."""

    s = c.specialize
    net, variables = tasks["digit"]
    rng = np.random.default_rng(int(s.skew_seed))
    true_classes = sorted(rng.choice(10, size=int(s.n), replace=False).tolist())
    idx = specialize.skewed_stream(
        splits.test.y, true_classes, min(0.97, s.p + 0.05), int(s.stream_frames), int(s.skew_seed)
    )
    xs, ys = splits.test.x[idx], splits.test.y[idx]
    general = evaluation.predict(net, variables, xs)[FINAL]
    # the detector sees the general model's results, as MCDNN does (no labels at run time)
    _, verdicts = scan(skew_init(int(s.window), int(s.n), float(s.p)), general.argmax(-1))
    first = next((i for i, d in enumerate(verdicts) if d is not None), None)
    if first is None:
        return {"detected": False, "true_classes": true_classes}
    classes = list(verdicts[first])

    ventry = next(e for e in variants["digit"] if e["name"] == s.variant)
    vnet, vvars = checkpoint.load(os.path.join(workdir, "models", "variants", "digit", s.variant))
    times, spec_net, spec_vars = specialize.retrain_times(
        vnet, vvars, splits.train.x, splits.train.y, classes, steps=int(s.steps),
        batch_size=int(s.batch_size), learning_rate=float(s.learning_rate),
        other_fraction=float(s.other_fraction), seed=int(s.skew_seed),
    )  # fmt: skip
    times_original = None
    if s.time_original:  # Table 3 has a big and a small variant per task: time the original too
        times_original, _, _ = specialize.retrain_times(
            net, variables, splits.train.x, splits.train.y, classes, steps=int(s.steps),
            batch_size=int(s.batch_size), learning_rate=float(s.learning_rate),
            other_fraction=float(s.other_fraction), seed=int(s.skew_seed),
        )  # fmt: skip
    after = slice(first + 1, None)
    spec_logits = evaluation.predict(spec_net, spec_vars["retarget_preforward"], xs[after])[FINAL]
    cas = specialize.cascade(spec_logits, general[after], classes, ys[after])
    orig = next(e for e in variants["digit"] if e["name"] == "original")
    cheap_alone = evaluation.predict(vnet, vvars, xs[after])[FINAL].argmax(-1)
    return {
        "detected": True,
        "true_classes": true_classes,
        "detected_classes": classes,
        "detected_after_frames": first + 1,
        "window": int(s.window),
        "n": int(s.n),
        "p": float(s.p),
        "variant": s.variant,
        "retrain_seconds": times,
        "retrain_seconds_original": times_original,
        "retarget_accuracy": {
            k: float(
                (
                    evaluation.predict(spec_net, v, xs[after])[FINAL].argmax(-1)
                    == specialize.specialized_labels(ys[after], classes)
                ).mean()
            )
            for k, v in spec_vars.items()
        },  # fmt: skip
        "stream": {
            "frames": int(len(ys[after])),
            "general_accuracy": float((general[after].argmax(-1) == ys[after]).mean()),
            "cheap_variant_accuracy": float((cheap_alone == ys[after]).mean()),
            "cascade_accuracy": cas.accuracy,
            "fallback_rate": cas.fallback_rate,
            "cascade_flops_ratio": (ventry["flops"] + cas.fallback_rate * orig["flops"])
            / orig["flops"],
            "cascade_latency_ratio": (ventry["latency_ms"] + cas.fallback_rate * orig["latency_ms"])
            / orig["latency_ms"],
        },
    }


# ---------------------------------------------------------------------------
# AMS day (Fig. 11 analogue).
# ---------------------------------------------------------------------------


def run_ams(c, workdir: str, apps: Sequence[str]) -> dict:
    """A day trace and every AMS policy on it (``trace.json``, ``ams.json``, ``fig11.png``)."""

    tr = traces_lib.make_day(list(apps), **plain(c.ams.trace))
    traces_lib.save(tr, os.path.join(workdir, "trace.json"))
    cat = ams.load_catalog(workdir, cloud=False)
    bud = plain(c.ams.budgets)
    budgets = ams.resolve_budgets(
        cat, tr, energy=bud["energy"], memory_mb=bud["memory_mb"], money=bud["money"],
        latency_ms=bud["latency_ms"],
    )  # fmt: skip
    rep, _ = ams.run(cat, tr, budgets, list(ams.POLICIES))
    write_json_atomic(os.path.join(workdir, "ams.json"), rep)
    plot_fig11(rep, os.path.join(workdir, "fig11.png"))
    return rep


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
    """Builds the catalog into `workdir` (resumable); returns catalog.json's content."""
    c = validate(config)
    splits = training.load_data(c.base)
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "catalog_config.json"), c.to_dict())
    tasks = train_tasks(c, splits, workdir, log)
    variants = build_variants(c, splits, tasks, workdir, log)
    bench = measure_costs(c, variants, splits, workdir)
    np.savez_compressed(
        os.path.join(workdir, "eval.npz"),
        x=splits.test.x,
        **{f"y_{t}": specialize.relabel(splits.test.y, t) for t in tasks},
    )
    cl = c.cloud
    catalog = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": c.base.data.name,
        "tasks": {
            t: {
                "classes": specialize.TASKS[t],
                "original": "original",
                "shares_stem_with": "digit" if t != "digit" else None,
                "variants": variants[t],
                "targets": targets(variants[t]),
            }
            for t in tasks
        },
        "bench": bench,
        "energy_model": {
            **plain(c.energy),
            "formula": "run = cpu_power_w*latency + dram_j_per_byte*bytes; "
            "load = storage_j_per_byte*bytes + cpu_power_w*load_time",
        },
        "cloud": {
            **plain(cl),
            "energy_per_request_j": cl.frame_bytes * cl.radio_j_per_byte,
        },
        "ams": {"budgets": plain(c.ams.budgets)},
    }
    write_json_atomic(os.path.join(workdir, CATALOG_FILE), catalog)
    for t in tasks:
        plot_pareto(variants[t], f"MCDNN catalog: {t}", os.path.join(workdir, f"pareto_{t}.png"))
    catalog["shared"] = build_shared(c, tasks, splits, workdir)
    log(f"sharing: {catalog['shared']['speedup']:.2f}x faster than separate models")
    catalog["specialize"] = run_specialization(c, tasks, variants, splits, workdir)
    write_json_atomic(os.path.join(workdir, "specialize.json"), catalog["specialize"])
    write_json_atomic(os.path.join(workdir, CATALOG_FILE), catalog)
    catalog["ams_report"] = run_ams(c, workdir, list(tasks))
    return catalog
