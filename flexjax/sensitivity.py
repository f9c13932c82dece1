"""Per-layer approximations of an MBConv net chosen by measured sensitivity (issue 15, item 1).

Uniform settings (every 1x1 conv at 90% spectral energy, every block's
expansion pruned to 50%) destroyed the pretrained Lite0's top-1 on the clips,
while milder uniform settings saved almost nothing (BENCHMARKS.md). Layers
differ: this module measures, for every candidate layer and setting, what
changing *only that layer* costs, and spends a loss budget where a byte saved
costs least.

1. `options`: the candidate settings, one *knob* per layer --
   ``layer_NN/expand`` (an MBConv block's expansion: structured pruning to a
   keep ratio, `flexjax.approx.prune_expansion`, or a low-rank expansion 1x1),
   and one knob per projection 1x1, head 1x1 and classifier (low rank by
   spectral-energy level, `flexjax.approx.low_rank_1x1`; only where the two
   factors are smaller than the kernel). Each option knows the parameters it
   removes.
2. `sensitivity_table`: each option applied alone, *in place* (same shapes, so
   one compiled forward serves every option: a low-rank kernel is replaced by
   its rank-r product ``U_r S_r V_r``; a pruned expansion zeroes the dropped
   channels' projection rows and folds their mean into the projection
   BatchNorm, which is exactly the function of the pruned net), measured on
   the given frames against the unchanged net: mean KL(original || changed),
   share of the original's top-1 kept, agreement with the reference labels.
3. `allocate`: a multiple-choice greedy knapsack -- repeatedly the upgrade of
   one knob with the most parameters saved per unit of added KL; the result is
   an ordered list of moves, each prefix one assignment of settings.
4. `choose`: the longest prefix whose *real* combined net (built by
   `to_steps` + `flexjax.approx.apply_recipe`, so exactly the net that is
   exported) stays within the budget on the frames, found by bisection over the
   prefix length (the per-layer losses do not add up exactly, so every
   decision is a measurement of the combined net, not a prediction).

`run_pass` does all four and returns plain data (JSON-able), including the
recipe steps that `flexjax.approx.apply_recipe` rebuilds the chosen net from.
The frames are the *val* clips' (`pipelines.lite_catalog`): the test split is
never used to choose.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexjax import approx
from flexjax.models.build import build, layer_name
from flexjax.spec import Net
from flexjax.transforms import get_path, set_path
from runtime.names import FINAL


class SensitivityError(approx.ApproxError):
    """Bad sensitivity settings (one line: what was expected)."""


METRICS = ("reference", "original")
# Settings of a sensitivity approximation (`check_settings` fills the defaults).
DEFAULTS: dict[str, Any] = {
    # Budget on the val frames: the combined net may lose at most this many points of
    # `metric` -- "reference": agreement with the clips' reference labels (the target's
    # measure), "original": share of the original's top-1 kept.
    "budget_pts": 2.0,
    "metric": "reference",
    # And keep at least this share of the original's top-1 on the val frames (0: no bound).
    "min_keep_original": 0.0,
    "keeps": (0.875, 0.75, 0.5),  # expansion-pruning keep ratios per block
    "energies": (0.95, 0.9, 0.8),  # low-rank spectral-energy levels per 1x1 / classifier
    "parts": approx.LITE_PARTS,  # which layers are candidates
    "rank_multiple": 1,  # round ranks up (32: blockwise-32 4-bit classifier weights)
    "multiple": 8,  # expansion channels kept in multiples of this
    "table_frames": 0,  # val frames for the per-layer table (0: all; evenly spread)
    "bytes_per_param": 1.0,  # bytes saved per parameter removed (1: int8 weights)
}
TABLE_KEYS = ("keeps", "energies", "parts", "rank_multiple", "multiple", "table_frames")


def _fraction_list(value: Any, key: str, *, upper_open: bool) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise SensitivityError(f"sensitivity.{key} must be a non-empty list of fractions, "
                               f"got {value!r}")  # fmt: skip
    out = []
    for x in value:
        ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        if not ok or not (0.0 < x < 1.0 if upper_open else 0.0 < x <= 1.0):
            interval = "(0, 1)" if upper_open else "(0, 1]"
            raise SensitivityError(f"sensitivity.{key}: {x!r} is not a fraction in {interval}")
        out.append(float(x))
    return tuple(sorted(set(out), reverse=True))


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SensitivityError(f"sensitivity.{key} must be an int >= {low}, got {value!r}")
    return int(value)


def _number(value: Any, key: str, *, low: float, high: float = math.inf) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low < value <= high:
        raise SensitivityError(
            f"sensitivity.{key} must be a finite number in ({low:g}, {high:g}], got {value!r}"
        )
    return float(value)


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with defaults filled in; a bad value raises one line.

    Raises:
      SensitivityError: an unknown key, a budget that is zero, negative, NaN or
        infinite, an unknown metric or part, a fraction out of range.
    """
    if not isinstance(settings, Mapping):
        raise SensitivityError(f"sensitivity settings must be a mapping, got {settings!r}")
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise SensitivityError(
            f"unknown sensitivity settings {unknown}; valid: {', '.join(DEFAULTS)}"
        )
    s = {**DEFAULTS, **settings}
    out = {
        "budget_pts": _number(s["budget_pts"], "budget_pts", low=0.0, high=100.0),
        "metric": s["metric"],
        "keeps": _fraction_list(s["keeps"], "keeps", upper_open=True),
        "energies": _fraction_list(s["energies"], "energies", upper_open=True),
        "rank_multiple": _int(s["rank_multiple"], "rank_multiple", 1),
        "multiple": _int(s["multiple"], "multiple", 1),
        "table_frames": _int(s["table_frames"], "table_frames", 0),
        "bytes_per_param": _number(s["bytes_per_param"], "bytes_per_param", low=0.0, high=8.0),
    }
    if out["metric"] not in METRICS:
        raise SensitivityError(
            f"sensitivity.metric must be one of {', '.join(METRICS)}, got {s['metric']!r}"
        )
    m = s["min_keep_original"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0.0 <= m <= 1.0):
        raise SensitivityError(f"sensitivity.min_keep_original must be in [0, 1], got {m!r}")
    out["min_keep_original"] = float(m)
    parts = s["parts"]
    if isinstance(parts, str) or not isinstance(parts, Sequence) or not parts:
        raise SensitivityError(f"sensitivity.parts must be a non-empty list, got {parts!r}")
    bad = [p for p in parts if p not in approx.LITE_PARTS]
    if bad:
        raise SensitivityError(
            f"sensitivity.parts: unknown {bad}; valid: {', '.join(approx.LITE_PARTS)}"
        )
    out["parts"] = tuple(p for p in approx.LITE_PARTS if p in parts)
    return out


# ---------------------------------------------------------------------------
# Candidate settings.
# ---------------------------------------------------------------------------


def _kernel(variables: dict, site: str) -> np.ndarray:
    return np.asarray(get_path(variables["params"], (*site.split("/"), "kernel")))


def _rank(kernel: np.ndarray, energy: float, multiple: int) -> tuple[int, int, int]:
    """``(rank, m, n)`` keeping `energy` of a 1x1 / dense kernel's spectrum, rounded up."""
    m, n = math.prod(kernel.shape[:-1]), kernel.shape[-1]
    s = np.linalg.svd(kernel.reshape(m, n).astype(np.float64), compute_uv=False)
    r = approx.rank_for_energy(s, energy)
    return min(-(-r // multiple) * multiple, min(m, n)), m, n


def _kept_channels(net: Net, variables: dict, pos: int, keep: float, multiple: int):
    """``(mid, kept indices, dropped indices)`` exactly as `approx.prune_expansion` picks them."""
    mid = net.layers[pos].branches[0][0]["features"]
    n = min(mid, max(multiple, math.ceil(keep * mid / multiple) * multiple))
    scores = approx.expansion_scores(net, variables, pos)
    kept = np.sort(np.argsort(-scores, kind="stable")[:n])
    return mid, kept, np.setdiff1d(np.arange(mid), kept)


def options(net: Net, variables: dict, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every candidate setting of every layer: plain dicts, one knob each.

    A knob's options are mutually exclusive (a block's expansion is either
    pruned or factorized, at one level). ``params_saved`` counts the kernel
    entries removed (BatchNorm scale / bias of pruned channels included).
    """
    s = check_settings(settings)
    out: list[dict[str, Any]] = []
    expand_blocks = [i for i, lay in enumerate(net.layers) if approx.expand_layout(lay)]
    if "expand" in s["parts"]:
        for pos in expand_blocks:
            body = get_path(variables["params"], (layer_name(pos), "branch_0"))
            c_in = body[layer_name(0)]["kernel"].shape[2]
            kh, kw = body[layer_name(3)]["kernel"].shape[:2]
            c_out = body[layer_name(6)]["kernel"].shape[3]
            for keep in s["keeps"]:
                mid, kept, _ = _kept_channels(net, variables, pos, keep, s["multiple"])
                d = mid - len(kept)
                if d <= 0:
                    continue
                out.append({"knob": f"{layer_name(pos)}/expand", "technique": "prune_expansion",
                            "site": layer_name(pos), "value": keep, "channels": int(len(kept)),
                            "params_saved": int(d * (c_in + kh * kw + c_out + 4))})  # fmt: skip
    for part in s["parts"]:
        for site in approx.lite_sites(net, [part]):
            knob = f"{site.split('/')[0]}/expand" if part == "expand" else site
            k = _kernel(variables, site)
            for energy in s["energies"]:
                r, m, n = _rank(k, energy, s["rank_multiple"])
                if r * (m + n) >= m * n:
                    continue  # the factors would not be smaller: low rank does not pay here
                saved = int(m * n - r * (m + n))
                out.append({"knob": knob, "technique": "low_rank_1x1", "site": site,
                            "value": energy, "rank": r, "params_saved": saved})  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# One option applied in place (same shapes: one compiled forward for all).
# ---------------------------------------------------------------------------


def apply_in_place(net: Net, variables: dict, option: Mapping[str, Any], multiple: int = 8) -> dict:
    """`variables` with one option applied without changing any shape.

    * ``low_rank_1x1``: the kernel becomes its best rank-r approximation (the
      product of the two factors `approx.low_rank_1x1` would store);
    * ``prune_expansion``: the dropped channels' projection rows are zeroed and
      their mean contribution folded into the projection BatchNorm's mean --
      the function of the pruned net (`approx.prune_expansion`) exactly.
    """
    params = variables["params"]
    if option["technique"] == "low_rank_1x1":
        path = (*option["site"].split("/"), "kernel")
        k = np.asarray(get_path(params, path))
        m, n = math.prod(k.shape[:-1]), k.shape[-1]
        u, s, vt = np.linalg.svd(k.reshape(m, n).astype(np.float64), full_matrices=False)
        r = int(option["rank"])
        w = (u[:, :r] * s[None, :r]) @ vt[:r]
        return {**variables, "params": set_path(params, path, jnp.asarray(w.reshape(k.shape),
                                                                         k.dtype))}  # fmt: skip
    if option["technique"] == "prune_expansion":
        pos = int(option["site"].removeprefix("layer_"))
        _, _, dropped = _kept_channels(net, variables, pos, option["value"], multiple)
        pre = (layer_name(pos), "branch_0")
        bn4 = get_path(params, (*pre, layer_name(4)))
        act = approx.mean_relu6(
            np.asarray(bn4["bias"], np.float64), np.asarray(bn4["scale"], np.float64)
        )
        proj_path = (*pre, layer_name(6), "kernel")
        proj = np.asarray(get_path(params, proj_path))
        lost = act[dropped] @ proj[0, 0][dropped].astype(np.float64)
        zeroed = proj.copy()
        zeroed[:, :, dropped, :] = 0
        mean_path = (*pre, layer_name(7), "mean")
        mean = get_path(variables["batch_stats"], mean_path)
        return {
            **variables,
            "params": set_path(params, proj_path, jnp.asarray(zeroed)),
            "batch_stats": set_path(
                variables["batch_stats"], mean_path, (mean - lost).astype(mean.dtype)
            ),
        }
    raise SensitivityError(f"unknown option technique {option['technique']!r}")


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _logits_fn(net: Net):
    """A jitted forward of `net` (one per net: the table and the bisection share the original's)."""
    model = build(net)
    return jax.jit(lambda v, x: model.apply(v, x)[FINAL])


class Scorer:
    """Logits of one net (fixed shapes) on fixed frames, compiled once, in padded batches."""

    def __init__(self, net: Net, frames: np.ndarray, batch: int = 32):
        self._apply = _logits_fn(net.replace(input_shape=tuple(frames.shape[1:])))
        self._batch = min(batch, len(frames))
        pad = (-len(frames)) % self._batch
        self._x = np.concatenate([frames, frames[:pad]]) if pad else frames
        self._n = len(frames)

    def logits(self, variables: dict) -> np.ndarray:
        b = self._batch
        out = [np.asarray(self._apply(variables, self._x[i : i + b]))
               for i in range(0, len(self._x), b)]  # fmt: skip
        return np.concatenate(out)[: self._n].astype(np.float64)


def compare(logits: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """KL(teacher || logits) (mean, T = 1), top-1 kept, agreement with `labels`."""
    lt = teacher - np.logaddexp.reduce(teacher, axis=-1, keepdims=True)
    ls = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)))
    top1 = logits.argmax(-1)
    return {"kl": max(kl, 0.0), "kept_original": float(np.mean(top1 == teacher.argmax(-1))),
            "agreement": float(np.mean(top1 == labels))}  # fmt: skip


def _pick(n: int, k: int) -> np.ndarray:
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def sensitivity_table(
    net: Net,
    variables: dict,
    frames: np.ndarray,
    labels: np.ndarray,
    settings: Mapping[str, Any],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every option of `options` measured alone on `frames` (float, [N, H, W, 3]).

    Returns ``{"frames", "base", "rows", "seconds"}``; each row is the option
    plus ``kl``, ``kept_original``, ``agreement`` and ``drop_pts`` (points of
    agreement with `labels` lost vs the unchanged net).
    """
    s = check_settings(settings)
    t0 = time.perf_counter()
    pick = _pick(len(frames), s["table_frames"])
    frames, labels = frames[pick], np.asarray(labels)[pick]
    scorer = Scorer(net, frames)
    teacher = scorer.logits(variables)
    base = compare(teacher, teacher, labels)
    rows = []
    opts = options(net, variables, s)
    for i, opt in enumerate(opts):
        m = compare(scorer.logits(apply_in_place(net, variables, opt, s["multiple"])), teacher,
                    labels)  # fmt: skip
        rows.append({**opt, **m, "drop_pts": 100.0 * (base["agreement"] - m["agreement"])})
        if (i + 1) % 20 == 0 or i + 1 == len(opts):
            log(f"  sensitivity: {i + 1}/{len(opts)} options measured "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return {"frames": int(len(frames)), "base": base, "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


# ---------------------------------------------------------------------------
# Allocation.
# ---------------------------------------------------------------------------

_EPS_KL = 1e-6


def allocate(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Greedy multiple-choice knapsack over knobs: the ordered upgrades (moves).

    At each step, among all options that save more than their knob's current
    setting, the one with the most extra parameters saved per unit of extra
    KL (at least 1e-6) is taken; ties go to the larger saving. Each move
    replaces its knob's previous setting. Returns the moves with the running
    total of parameters saved and summed KL (the additive prediction).
    """
    by_knob: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_knob.setdefault(r["knob"], []).append(r)
    current: dict[str, Mapping[str, Any]] = {}
    moves: list[dict[str, Any]] = []
    saved, kl = 0, 0.0
    while True:
        best, best_key = None, None
        for knob, opts in by_knob.items():
            cur = current.get(knob)
            cur_saved = cur["params_saved"] if cur else 0
            cur_kl = cur["kl"] if cur else 0.0
            for o in opts:
                gain = o["params_saved"] - cur_saved
                if gain <= 0:
                    continue
                key = (gain / max(o["kl"] - cur_kl, _EPS_KL), gain)
                if best_key is None or key > best_key:
                    best, best_key = o, key
        if best is None:
            return moves
        prev = current.get(best["knob"])
        saved += best["params_saved"] - (prev["params_saved"] if prev else 0)
        kl += best["kl"] - (prev["kl"] if prev else 0.0)
        current[best["knob"]] = best
        moves.append({**best, "total_params_saved": int(saved), "total_kl": kl})


def assignment(moves: Sequence[Mapping[str, Any]], k: int) -> dict[str, Mapping[str, Any]]:
    """knob -> option after the first `k` moves (later moves replace earlier ones)."""
    out: dict[str, Mapping[str, Any]] = {}
    for m in moves[:k]:
        out[m["knob"]] = m
    return out


def to_steps(
    net: Net, variables: dict, chosen: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """`flexjax.approx.apply_recipe` steps that build the net of an assignment.

    Expansion pruning first (one step per keep ratio), then one low-rank step
    with explicit ranks, each recomputed by its energy level on the kernel
    after pruning (a pruned block's projection has fewer inputs); a layer
    whose factors would not be smaller any more is left unfactorized.
    """
    s = check_settings(settings)
    prunes: dict[float, list[str]] = {}
    lowrank = []
    for o in chosen.values():
        if o["technique"] == "prune_expansion":
            prunes.setdefault(float(o["value"]), []).append(o["site"])
        else:
            lowrank.append(o)
    steps: list[dict[str, Any]] = [
        {"technique": "prune_expansion", "keep": keep, "sites": sorted(sites),
         "multiple": s["multiple"]}
        for keep, sites in sorted(prunes.items(), reverse=True)
    ]  # fmt: skip
    if lowrank:
        pruned = approx.apply_recipe(net, variables, steps)[1] if steps else variables
        ranks = {}
        for o in sorted(lowrank, key=lambda o: o["site"]):
            r, m, n = _rank(_kernel(pruned, o["site"]), o["value"], s["rank_multiple"])
            if r * (m + n) < m * n:
                ranks[o["site"]] = r
        if ranks:
            steps.append({"technique": "low_rank_1x1", "ranks": ranks})
    return steps


def _params(variables: dict) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(variables["params"])))


def choose(
    net: Net,
    variables: dict,
    moves: Sequence[Mapping[str, Any]],
    frames: np.ndarray,
    labels: np.ndarray,
    settings: Mapping[str, Any],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The longest prefix of `moves` whose real combined net is within the budget on `frames`.

    Bisection over the prefix length (0 moves, the original, is within any
    budget); every probe builds the net from `to_steps` and measures it, so
    the chosen net is one that was measured. Returns ``{"moves", "steps",
    "val", "checks"}``.
    """
    s = check_settings(settings)
    teacher = Scorer(net, frames).logits(variables)
    base = compare(teacher, teacher, labels)
    checks: list[dict[str, Any]] = []
    cache: dict[int, dict[str, Any]] = {}

    def probe(k: int) -> dict[str, Any]:
        if k not in cache:
            steps = to_steps(net, variables, assignment(moves, k), s)
            n2, v2 = approx.apply_recipe(net, variables, steps) if steps else (net, variables)
            m = compare(Scorer(n2, frames).logits(v2) if steps else teacher, teacher, labels)
            m["drop_pts"] = 100.0 * (base["agreement"] - m["agreement"])
            lost = m["drop_pts"] if s["metric"] == "reference" else 100 * (1 - m["kept_original"])
            m["ok"] = bool(lost <= s["budget_pts"] + 1e-9
                           and m["kept_original"] >= s["min_keep_original"])  # fmt: skip
            m.update(moves=k, params=_params(v2), steps=steps)
            cache[k] = m
            checks.append({k2: v for k2, v in m.items() if k2 != "steps"})
            log(f"  check {k:3d} moves: {m['params'] / 1e6:.2f} M params, kept "
                f"{m['kept_original']:.3f} of the original's top-1, drop {m['drop_pts']:+.1f} "
                f"pts, KL {m['kl']:.3f} -> {'within' if m['ok'] else 'over'} budget")  # fmt: skip
        return cache[k]

    lo, hi = 0, len(moves)
    if moves and probe(hi)["ok"]:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid)["ok"]:
            lo = mid
        else:
            hi = mid
    best = probe(lo)
    return {"moves": lo, "steps": best["steps"], "base": base,
            "val": {k: v for k, v in best.items() if k != "steps"}, "checks": checks}  # fmt: skip


def run_pass(
    net: Net,
    variables: dict,
    frames: np.ndarray,
    labels: np.ndarray,
    settings: Mapping[str, Any],
    log: Callable[[str], None] = print,
    table: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Table (or the given one), allocation and the bisection: plain data, with the steps.

    ``moves_list`` is the greedy order (`allocate`), ``moves`` how many of them
    were chosen, ``steps`` the recipe of the chosen net, ``val`` its measurement.
    """
    s = check_settings(settings)
    t0 = time.perf_counter()
    if table is None:
        table = sensitivity_table(net, variables, frames, labels, s, log)
    moves = allocate(table["rows"])
    chosen = choose(net, variables, moves, frames, labels, s, log)
    return {"settings": s, "table": dict(table), "moves_list": moves, **chosen,
            "params_original": _params(variables),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
