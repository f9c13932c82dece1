"""FlexDNN (Fang et al., SEC 2020): exit architecture search and the R-based insertion plan.

The pieces `python -m train.flexdnn` is made of (REFERENCE.md, "FlexDNN"):

1. **Candidates** (`block_boundaries`, `candidate_head`, `candidate_net`): an
   over-parameterized exit (``head_convs`` wide 3x3 convs with pooling, then a
   dense classifier) at every block boundary of a trained backbone.
2. The candidate exits are trained on the frozen backbone (`train_candidates`).
3. **Exit architecture search** (`search_exit`), per exit: the head is cut out as
   a net of its own (`head_net`, fed with the frozen backbone's activations), its
   filters are pruned (`flexjax.transforms.prune_filters`) and then whole conv
   layers dropped (`drop_layer`), fine-tuning briefly (`flexjax.finetune`) after
   each step; a step whose validation accuracy falls more than ``delta`` below
   the over-parameterized exit's is undone, and the last architecture before the
   drop is kept.
4. **Costs**: measured latency of each exported TFLite signature
   (`time_calls`), one ``segment_k`` per stretch of backbone between candidate
   positions and one ``exit_k`` per head.
5. Thresholds are calibrated on validation data (`flexjax.exits.calibrate`, with
   the measured latencies as costs).
6. **Insertion plan** (`insertion_plan`, `plan_exits`): R per kept exit,

       R_i = (N_exit(i) * C_saved(i)) / (N_reach(i) * C_exit(i)),

   the compute saved by the frames that leave at i (every later segment plus
   every later kept head they skip) over the compute spent on exit i by every
   frame that reaches it. The exit with the lowest R <= 1 is removed, every R is
   recomputed (removing an exit sends its frames to later exits), until every
   R > 1. `plan_exits` alternates this with re-calibrating the thresholds for
   the surviving exits until nothing more is removed.

Everything in the R / plan part is plain numpy on arrays, tested on
hand-computed examples (tests/test_flexdnn.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flexjax import costs, evaluation
from flexjax import exits as exits_lib
from flexjax.finetune import finetune
from flexjax.models import build
from flexjax.spec import (
    FINAL,
    Exit,
    Layer,
    Net,
    conv,
    dense,
    flatten,
    global_pool,
    max_pool,
    relu,
    relu6,
)
from flexjax.transforms import TransformError, drop_layer, filter_norms, prune_filters
from flexjax.transforms import prunable_sites as sites_of
from runtime import criteria, timing


class FlexDNNError(ValueError):
    """A FlexDNN setting or input that cannot work (one clear message)."""


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def validate(config) -> None:
    """Checks the ``flexdnn`` section and ``exits.epsilon`` (ranges, types).

    Raises:
      FlexDNNError: the first bad value, named by its config key.
    """
    f = config.flexdnn

    def frac(key: str, value: float, lo_open: bool = False) -> None:
        ok = (0.0 < value < 1.0) if lo_open else (0.0 <= value < 1.0)
        if not ok:
            rng = "(0, 1)" if lo_open else "[0, 1)"
            raise FlexDNNError(f"{key} must be a fraction in {rng} (0.01 = 1 point), got {value}")

    frac("flexdnn.delta", float(f.delta))
    frac("exits.epsilon", float(config.exits.epsilon))
    frac("flexdnn.prune_fraction", float(f.prune_fraction), lo_open=True)
    for key in (
        "head_features",
        "head_convs",
        "min_filters",
        "timing_rounds",
        "timing_calls",
        "bench_rounds",
    ):
        if int(getattr(f, key)) < 1:
            raise FlexDNNError(f"flexdnn.{key} must be >= 1, got {getattr(f, key)}")
    for key in ("exit_epochs", "finetune_steps", "max_trials", "bench_frames"):
        if int(getattr(f, key)) < 0:
            raise FlexDNNError(f"flexdnn.{key} must be >= 0, got {getattr(f, key)}")
    if not float(f.finetune_lr) > 0:
        raise FlexDNNError(f"flexdnn.finetune_lr must be > 0, got {f.finetune_lr}")
    for w in f.lossy_widths:
        if not 0.0 < float(w) < 1.0:
            raise FlexDNNError(
                f"flexdnn.lossy_widths are fractions of the backbone width in (0, 1), got {w}"
            )


# ---------------------------------------------------------------------------
# Candidates.
# ---------------------------------------------------------------------------

_BLOCK_END = ("relu", "relu6", "max_pool", "avg_pool", "lrn", "residual", "inception", "mbconv")
_BLOCK_TAIL = ("relu", "relu6", "batch_norm", "max_pool", "avg_pool", "lrn", "dropout")


def block_boundaries(net: Net) -> list[int]:
    """Backbone positions that end a block and output an image-shaped map.

    A block ends after a relu / pool / LRN / composite block that is not
    followed by more of the same block's tail (relu, BN, pooling, LRN,
    dropout): in VGG that is every conv's relu that feeds a conv, and every
    pool; in Inception every inception block. Positions with flat outputs (the
    classifier) are not candidates: an exit there would be the classifier.
    """
    shapes = net.shapes()
    out = []
    for i in range(len(net.layers) - 1):
        if net.layers[i].kind not in _BLOCK_END or len(shapes[i][1]) != 3:
            continue
        if net.layers[i + 1].kind in _BLOCK_TAIL:
            continue
        out.append(i)
    return out


def check_positions(net: Net, positions: Sequence[int]) -> list[int]:
    """The candidate positions to use: ``positions`` (validated) or every block boundary.

    Raises:
      FlexDNNError: a position that is not an image-shaped backbone position.
    """
    if not positions:
        found = block_boundaries(net)
        if not found:
            raise FlexDNNError(f"net '{net.name}' has no block boundary to put an exit at")
        return found
    shapes = net.shapes()
    valid = [i for i in range(len(net.layers) - 1) if len(shapes[i][1]) == 3]
    out = []
    for p in positions:
        if not isinstance(p, (int, np.integer)) or int(p) not in valid:
            raise FlexDNNError(
                f"candidate position {p!r} does not exist in '{net.name}'; valid positions "
                f"(image-shaped outputs): {valid[0]}..{valid[-1]}, block boundaries: "
                f"{block_boundaries(net)}"
            )
        out.append(int(p))
    if sorted(set(out)) != out:
        raise FlexDNNError(f"flexdnn.positions must be strictly increasing, got {list(positions)}")
    return out


def candidate_head(
    in_shape: Sequence[int], num_classes: int, features: int = 64, convs: int = 3
) -> tuple[Layer, ...]:
    """An over-parameterized exit: ``convs`` x (conv 3x3 + relu [+ pool]) + dense.

    A map larger than 8x8 is max-pooled first (an exit must stay cheap next to
    the backbone it hangs off); a 2x2 max pool then follows a conv while the
    map is larger than 4x4 (at most two, as in the exits FlexDNN ends up
    with); the classifier reads the flattened map.
    """
    h = int(in_shape[0])
    layers: list[Layer] = []
    if h > 8:
        layers.append(max_pool(2, padding="SAME"))
        h = -(-h // 2)
    pools = 0
    for _ in range(convs):
        layers += [conv(features, 3), relu()]
        if h > 4 and pools < 2:
            layers.append(max_pool(2, padding="SAME"))
            h, pools = -(-h // 2), pools + 1
    return (*layers, flatten(), dense(num_classes))


def strip_exits(net: Net) -> Net:
    return net.replace(exits=())


def candidate_net(
    backbone: Net, positions: Sequence[int], features: int = 64, convs: int = 3
) -> Net:
    """The backbone (its own exits dropped) with a candidate exit at every position."""
    shapes = backbone.shapes()
    heads = tuple(
        Exit(p, candidate_head(shapes[p][1], backbone.num_classes, features, convs))
        for p in sorted(positions)
    )
    return backbone.replace(exits=heads, name=f"{backbone.name}_flexdnn")


# ---------------------------------------------------------------------------
# A head as a net of its own (what the search prunes and fine-tunes).
# ---------------------------------------------------------------------------


def head_net(net: Net, exit_name: str) -> Net:
    """Exit `exit_name`'s head as a standalone net fed with the activation it reads.

    Parameter names match: the head's ``exit_3/layer_01`` is the head net's
    ``layer_01``, so transforms address it as a backbone site.
    """
    e = net.get_exit(exit_name)
    in_shape = net.shapes()[e.after][1]
    return Net(tuple(in_shape), net.num_classes, e.layers, (), f"{net.name}/{exit_name}")


def head_variables(variables: Mapping[str, Any], exit_name: str) -> dict:
    return {col: tree[exit_name] for col, tree in variables.items() if exit_name in tree}


def with_head(
    net: Net, variables: Mapping[str, Any], exit_name: str, hnet: Net, hvars: Mapping[str, Any]
) -> tuple[Net, dict]:
    """`net` with exit `exit_name`'s head replaced by the (searched) head net."""
    new_exits = tuple(
        dataclasses.replace(e, layers=hnet.layers) if e.name == exit_name else e for e in net.exits
    )
    out = {
        col: {k: v for k, v in tree.items() if k != exit_name} for col, tree in variables.items()
    }
    for col, tree in hvars.items():
        out.setdefault(col, {})[exit_name] = tree
    return net.replace(exits=new_exits), out


def keep_exits(net: Net, variables: Mapping[str, Any], names: Sequence[str]) -> tuple[Net, dict]:
    """`net` with only the side exits in `names` (and their variables)."""
    keep = set(names)
    gone = {e.name for e in net.exits} - keep
    out = {col: {k: v for k, v in tree.items() if k not in gone} for col, tree in variables.items()}
    return net.replace(exits=tuple(e for e in net.exits if e.name in keep)), out


@functools.lru_cache(maxsize=32)
def _features_fn(net: Net, stop: int):
    model = build(net)
    return jax.jit(lambda v, x: model.apply(v, x, False, stop=stop, heads=False)["activation"])


def features(
    net: Net, variables: Mapping[str, Any], position: int, x: np.ndarray, batch: int = 256
) -> np.ndarray:
    """The frozen backbone's activation at `position` (inference mode) for images `x`."""
    fn = _features_fn(strip_exits(net), position + 1)
    outs = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        n = len(xb)
        if n < batch:  # one compiled shape
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
        outs.append(np.asarray(fn(dict(variables), xb))[:n])
    return np.concatenate(outs).astype(np.float32)


# ---------------------------------------------------------------------------
# Exit architecture search.
# ---------------------------------------------------------------------------


def _accuracy(net: Net, variables: Mapping[str, Any], x: np.ndarray, y: np.ndarray) -> float:
    return float((evaluation.predict(net, dict(variables), x)[FINAL].argmax(-1) == y).mean())


def _site_index(site: str) -> int:
    return int(site.rsplit("_", 1)[1])


@dataclasses.dataclass
class SearchResult:
    """A searched exit head: its net, variables, accuracies and every step tried."""

    net: Net
    variables: dict
    reference_accuracy: float
    accuracy: float
    history: list[dict]

    def to_dict(self) -> dict:
        return {
            "reference_accuracy": self.reference_accuracy,
            "accuracy": self.accuracy,
            "layers": [layer.to_dict() for layer in self.net.layers],
            "flops": costs.of(self.net).backbone_flops,
            "history": self.history,
        }


def search_exit(
    hnet: Net,
    hvars: Mapping[str, Any],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    delta: float,
    prune_fraction: float = 0.5,
    min_filters: int = 2,
    finetune_steps: int = 100,
    learning_rate: float = 1e-3,
    max_trials: int = 16,
    batch_size: int = 128,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    prune: Callable[..., tuple[Net, dict]] | None = None,
    sites: Callable[[Net], list[str]] | None = None,
    teacher: np.ndarray | None = None,
    distill_weight: float = 0.5,
    temperature: float = 2.0,
) -> SearchResult:
    """Prunes one exit head (filters, then conv layers) while its accuracy holds.

    Args:
      hnet, hvars: the trained over-parameterized head as a net (`head_net`).
      train, val: ``(activations, labels)`` at the exit's position.
      delta: a step is kept only if the validation accuracy stays
        ``>= reference - delta`` (reference: the head before any pruning).
      prune_fraction: share of a layer's filters removed per pruning step; a
        layer whose step fails is not pruned again.
      max_trials: architectures tried (each fine-tuned) at most; up to a third
        is kept for the layer drops.
      prune, sites: the filter-pruning transform and its sites (default
        `flexjax.transforms.prune_filters` / `prunable_sites`; separable heads
        pass `prune_separable` / `separable_sites`).
      teacher: ``[len(train), classes]`` logits distilled into the head while
        fine-tuning (``distill_weight``, ``temperature``: `flexjax.finetune`).

    Returns:
      The last architecture before the accuracy dropped, with the history of
      every step (action, site, sizes, accuracy, accepted).
    """

    xt, yt = train
    xv, yv = val
    ref = _accuracy(hnet, hvars, xv, yv)
    if max_trials == 0:  # no search: the over-parameterized head as trained
        return SearchResult(hnet, dict(hvars), ref, ref, [
            {"trial": 0, "action": "start", "accuracy": ref, "accepted": True,
             "flops": costs.of(hnet).backbone_flops}
        ])  # fmt: skip

    floor = ref - delta
    cur_net, cur_vars, cur_acc = hnet, dict(hvars), ref
    history = [
        {"trial": 0, "action": "start", "accuracy": ref, "accepted": True,
         "flops": costs.of(hnet).backbone_flops}
    ]  # fmt: skip
    trials = 0
    say = log or (lambda _m: None)

    def attempt(action: str, site: str, make) -> bool:
        nonlocal cur_net, cur_vars, cur_acc, trials
        trials += 1
        try:
            net2, vars2 = make()
        except TransformError as e:
            history.append({"trial": trials, "action": action, "site": site, "error": str(e),
                            "accepted": False})  # fmt: skip
            return False
        if finetune_steps:
            extra = {}
            if teacher is not None:
                extra = {"teacher_logits": teacher, "distill_weight": distill_weight,
                         "temperature": temperature}  # fmt: skip
            vars2 = finetune(
                net2, vars2, xt, yt, steps=finetune_steps, batch_size=min(batch_size, len(xt)),
                learning_rate=learning_rate, seed=seed + trials, **extra,
            )  # fmt: skip
        acc = _accuracy(net2, vars2, xv, yv)
        ok = acc >= floor - 1e-12
        flops = costs.of(net2).backbone_flops
        history.append({"trial": trials, "action": action, "site": site, "accuracy": acc,
                        "accepted": ok, "flops": flops})  # fmt: skip
        say(
            f"  {action} {site}: accuracy {acc:.4f} ({'kept' if ok else 'undone'}), {flops:,} FLOPs"
        )
        if ok:
            cur_net, cur_vars, cur_acc = net2, dict(vars2), acc
        return ok

    # 1. Filters, round robin over the prunable layers until each one's step fails,
    # leaving a share of the budget for trying to drop each conv layer but one.
    n_convs = sum(layer.kind == "conv" for layer in hnet.layers)
    filter_budget = max_trials - min(max(n_convs - 1, 0), max_trials // 3)
    done: set[str] = set()
    while trials < filter_budget:
        progressed = False
        for site in (sites or sites_of)(cur_net):
            if site in done or trials >= filter_budget:
                continue
            if prune is None:
                n = int(np.asarray(filter_norms(cur_net, cur_vars, site)).shape[0])
            else:
                n = int(cur_net.layers[_site_index(site)]["features"])
            keep = max(min_filters, int(round(n * (1.0 - prune_fraction))))
            if keep >= n:
                done.add(site)
                continue
            tag = f"prune {n}->{keep}"
            pruner = prune or prune_filters
            if attempt(tag, site, lambda s=site, k=keep, f=pruner: f(cur_net, cur_vars, s, k)):
                progressed = True
            else:
                done.add(site)
        if not progressed:
            break

    # 2. Whole conv layers, deepest first; restart after every accepted drop.
    rng = jax.random.key(seed)
    changed = True
    tried: set[tuple] = set()
    while changed and trials < max_trials:
        changed = False
        convs = [i for i, layer in enumerate(cur_net.layers) if layer.kind == "conv"]
        if len(convs) <= 1:
            break
        for i in reversed(convs):
            key = (cur_net.layers, i)
            if key in tried or trials >= max_trials:
                continue
            tried.add(key)
            site = f"layer_{i:02d}"
            rng, sub = jax.random.split(rng)
            if attempt("drop", site, lambda s=site, r=sub: drop_layer(cur_net, cur_vars, s, r)):
                changed = True
                break
    return SearchResult(cur_net, cur_vars, ref, cur_acc, history)


# ---------------------------------------------------------------------------
# Measured costs.
# ---------------------------------------------------------------------------


def time_calls(
    fns: Mapping[str, Callable[[], Any]], *, rounds: int = 5, calls: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Median over `rounds` of the mean wall time (ms) of one call of each function.

    Rounds are interleaved (`runtime.timing.interleaved`: every function once
    per round, order rotated) so machine drift hits all of them alike.
    """
    t = timing.interleaved(
        {n: (lambda _, f=f: f()) for n, f in fns.items()}, [None], rounds=rounds,
        warmup=warmup, calls=calls, keep_outputs=False,
    )  # fmt: skip
    return t.median_round_ms()


def signature_times(model, inputs: Mapping[str, np.ndarray], **kw) -> dict[str, float]:
    """Measured ms per call of each signature of a loaded `runtime.lite.Model`.

    Keyword arguments are `time_calls`' (rounds, calls, warmup).
    """
    sigs, xs = {}, {}
    for name, x in inputs.items():
        sig = model.signature(name)
        sigs[name] = sig
        xs[name] = [np.ascontiguousarray(np.asarray(x, sig.input_dtype).reshape(sig.input_shape))]
    kw = {"rounds": 5, "calls": 50, "warmup": 5, **kw}
    return timing.interleaved(sigs, xs, keep_outputs=False, **kw).median_round_ms()


# ---------------------------------------------------------------------------
# R and the insertion plan (pure numpy).
# ---------------------------------------------------------------------------


def passes_matrix(
    logits: Mapping[str, np.ndarray],
    names: Sequence[str],
    thresholds: Mapping[str, float | None],
    criterion: str,
) -> np.ndarray:
    """``[frames, exits]`` bool: whether exit j's confidence passes its threshold.

    A missing or None threshold never passes.
    """
    cols = [criteria.passes(logits[n], criterion, thresholds.get(n)) for n in names]
    if not cols:  # no side exit left
        return np.zeros((len(next(iter(logits.values()))), 0), bool)
    return np.stack(cols, axis=1)


def leave_index(passes: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Per frame, the candidate index it leaves at: the first kept exit that passes.

    Frames that pass no kept exit get ``passes.shape[1]`` (the final exit).
    """
    passes = np.asarray(passes, bool)
    where = np.full(passes.shape[0], passes.shape[1], np.int64)
    for i in sorted(kept, reverse=True):
        where = np.where(passes[:, i], i, where)
    return where


def r_values(
    passes: np.ndarray,
    kept: Sequence[int],
    head_cost: Sequence[float],
    seg_cost: Sequence[float],
) -> dict[int, float]:
    """R of every kept exit (REFERENCE.md).

    Args:
      passes: ``[frames, n]`` bool, exit j's threshold passes on the frame.
      kept: candidate indices still in the model.
      head_cost: ``[n]`` cost of running exit j's head.
      seg_cost: ``[n + 1]`` cost of the backbone between candidate j-1 and j
        (``seg_cost[n]``: from the last candidate to the final logits).

    Returns:
      ``{j: R_j}`` with ``R_j = N_exit(j) C_saved(j) / (N_reach(j) C_exit(j))``,
      ``C_saved(j)`` = every later segment + every later kept head. An exit no
      frame reaches has R = 0; a free exit that saves something has R = inf.
    """
    n = len(head_cost)
    if len(seg_cost) != n + 1 or np.asarray(passes).shape[1] != n:
        raise ValueError(
            f"need {n} head costs, {n + 1} segment costs and [frames, {n}] passes; got "
            f"{len(head_cost)}, {len(seg_cost)}, {np.asarray(passes).shape}"
        )
    where = leave_index(passes, kept)
    out = {}
    for j in kept:
        n_exit = int((where == j).sum())
        n_reach = int((where >= j).sum())
        saved = float(sum(seg_cost[j + 1 :])) + float(sum(head_cost[k] for k in kept if k > j))
        spent = float(head_cost[j])
        if n_reach == 0 or n_exit == 0:
            out[j] = 0.0
        elif spent <= 0:
            out[j] = float("inf")
        else:
            out[j] = n_exit * saved / (n_reach * spent)
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The outcome of the greedy removal: kept exits, removal order, R at each round."""

    kept: tuple[int, ...]
    removed: tuple[int, ...]
    rounds: tuple[dict[int, float], ...]  # R of the exits present at each round


def insertion_plan(
    passes: np.ndarray,
    head_cost: Sequence[float],
    seg_cost: Sequence[float],
    kept: Sequence[int] | None = None,
) -> Plan:
    """Removes the exit with the lowest R <= 1, recomputes every R, until all R > 1.

    Ties go to the earlier exit. The last round holds the R of the exits that
    stay (empty if every exit was removed).
    """
    kept_l = sorted(range(len(head_cost)) if kept is None else kept)
    removed: list[int] = []
    rounds: list[dict[int, float]] = []
    while kept_l:
        r = r_values(passes, kept_l, head_cost, seg_cost)
        rounds.append(r)
        worst = min(kept_l, key=lambda j: (r[j], j))
        if r[worst] > 1.0:
            break
        kept_l.remove(worst)
        removed.append(worst)
    else:
        rounds.append({})
    return Plan(tuple(kept_l), tuple(removed), tuple(rounds))


def exit_costs(
    kept: Sequence[int], head_cost: Sequence[float], seg_cost: Sequence[float], names: Sequence[str]
) -> dict[str, float]:
    """Cost of a frame that leaves at each kept exit (and at `FINAL`).

    Leaving at j ran every segment up to j and every kept head up to j.
    """
    kept = sorted(kept)
    stops = [j + 1 for j in kept] + [len(seg_cost)]
    segments = [float(sum(seg_cost[a:b])) for a, b in zip([0, *stops[:-1]], stops)]
    heads = [float(head_cost[j]) for j in kept] + [0.0]
    return dict(zip([names[j] for j in kept] + [FINAL], criteria.leave_costs(segments, heads)))


@dataclasses.dataclass(frozen=True)
class PlanResult:
    """`plan_exits`' result: the surviving exits, their thresholds and every round."""

    kept: tuple[str, ...]
    removed: tuple[str, ...]  # in removal order
    thresholds: dict[str, float | None]
    calibration: exits_lib.Calibration
    rounds: tuple[dict, ...]  # {"calibration": k, "R": {name: R}, "exit_rates": {name: rate}}


def plan_exits(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    names: Sequence[str],
    head_cost: Sequence[float],
    seg_cost: Sequence[float],
    *,
    criterion: str,
    epsilon: float,
    calibration: Mapping | None = None,
) -> PlanResult:
    """Calibrate thresholds, run the insertion plan, re-calibrate for the survivors, repeat.

    Thresholds are calibrated on (`logits`, `labels`) with the costs of
    `exit_costs`; the plan's R uses the same data. Stops when a round removes
    nothing, so every exit kept has R > 1 under the thresholds it ships with.
    `calibration`: `flexjax.exits.calibrate`'s ``method`` / ``delta`` /
    ``margin`` (a job passes `flexjax.config.calibration_options`); None:
    `calibrate`'s own defaults (the empirical rule).
    """
    opts = dict(calibration or {})
    kept = list(range(len(names)))
    removed: list[int] = []
    rounds: list[dict] = []
    k = 0
    while True:
        order = [names[j] for j in kept] + [FINAL]
        cal = exits_lib.calibrate(
            logits, labels, exit_costs(kept, head_cost, seg_cost, names),
            criterion=criterion, epsilon=epsilon, names=order, **opts,
        )  # fmt: skip
        passes = passes_matrix(logits, names, cal.thresholds, criterion)
        plan = insertion_plan(passes, head_cost, seg_cost, kept)
        for r in plan.rounds:
            where = leave_index(passes, list(r))
            rates = {names[j]: float((where == j).mean()) for j in r}
            rounds.append(
                {"calibration": k, "R": {names[j]: v for j, v in r.items()}, "exit_rates": rates}
            )
        removed += plan.removed
        if not plan.removed or not plan.kept:
            if plan.removed:  # everything went: calibrate the plain backbone
                cal = exits_lib.calibrate(
                    logits, labels, {FINAL: float(sum(seg_cost))}, criterion=criterion,
                    epsilon=epsilon, names=[FINAL], **opts,
                )  # fmt: skip
            kept = list(plan.kept)
            break
        kept = list(plan.kept)
        k += 1
    thresholds = {names[j]: cal.thresholds.get(names[j]) for j in kept}
    return PlanResult(
        tuple(names[j] for j in kept),
        tuple(names[j] for j in removed),
        thresholds,
        cal,
        tuple(rounds),
    )


# ---------------------------------------------------------------------------
# Depthwise-separable exits on a frozen pretrained backbone (issue 13, item 1).
# ---------------------------------------------------------------------------


def separable_head(
    in_shape: Sequence[int],
    num_classes: int,
    features: int = 128,
    blocks: int = 2,
    max_side: int = 14,
) -> tuple[Layer, ...]:
    """An over-parameterized exit of depthwise-separable blocks, as FlexDNN's exits are described.

    ``blocks`` x (depthwise 3x3 -> pointwise 1x1 (``features``) -> relu6), then
    global pool -> dense. A map larger than ``max_side`` is max-pooled (stride
    2, SAME) first, so a head stays cheap next to the backbone stretch it skips.
    The depthwise conv has no activation of its own (MobileNet-v2 style), so
    dropping it leaves a valid head; `prune_separable` follows a pruned
    pointwise conv through the next depthwise conv to its consumer.
    """
    if features < 1 or blocks < 1:
        raise FlexDNNError(f"separable heads need features >= 1 and blocks >= 1; got "
                           f"{features}, {blocks}")  # fmt: skip
    h, c = int(in_shape[0]), int(in_shape[-1])
    layers: list[Layer] = []
    while h > max_side:
        layers.append(max_pool(2, padding="SAME"))
        h = -(-h // 2)
    for _ in range(blocks):
        layers += [conv(c, 3, groups=c), conv(features, 1), relu6()]
        c = features
    return (*layers, global_pool(), dense(num_classes))


def _is_depthwise(layer: Layer) -> bool:
    return layer.kind == "conv" and layer["groups"] > 1 and layer["groups"] == layer["features"]


def separable_sites(net: Net) -> list[str]:
    """Sites of a standalone head net whose filters `prune_separable` can remove.

    Every groups=1 conv or dense whose output reaches a conv / dense consumer
    through activations, pools, global pooling and depthwise convs.
    """
    out = []
    for i, layer in enumerate(net.layers):
        if layer.kind not in ("conv", "dense") or layer.get("groups", 1) != 1:
            continue
        try:
            _separable_edits(net, i)
        except TransformError:
            continue
        out.append(f"layer_{i:02d}")
    return out


_SEP_PASS = ("relu", "relu6", "max_pool", "avg_pool", "global_pool", "dropout")


def _separable_edits(net: Net, index: int) -> tuple[list[tuple[int, str, int]], list[int]]:
    """``(edits, depthwise layers)``: (layer, param, axis) slices that pruning `index` needs."""
    layers = net.layers
    if layers[index].kind not in ("conv", "dense") or layers[index].get("groups", 1) != 1:
        raise TransformError(
            f"layer_{index:02d}: only conv (groups=1) and dense layers have prunable filters"
        )
    edits = [(index, "kernel", -1)]
    if layers[index]["use_bias"]:
        edits.append((index, "bias", 0))
    depthwise = []
    for j in range(index + 1, len(layers)):
        layer = layers[j]
        if layer.kind in _SEP_PASS:
            continue
        if _is_depthwise(layer):
            edits.append((j, "kernel", -1))
            if layer["use_bias"]:
                edits.append((j, "bias", 0))
            depthwise.append(j)
            continue
        if layer.kind == "conv" and layer["groups"] == 1:
            return [*edits, (j, "kernel", 2)], depthwise
        if layer.kind == "dense":
            return [*edits, (j, "kernel", 0)], depthwise
        raise TransformError(f"layer_{index:02d} feeds a '{layer.kind}' it cannot prune through")
    raise TransformError(f"layer_{index:02d} produces the head's output")


def prune_separable(
    net: Net, variables: Mapping[str, Any], site: str, keep: int
) -> tuple[Net, dict]:
    """Keeps the `keep` filters (largest L1 norm) of a head net's conv/dense at `site`.

    Like `flexjax.transforms.prune_filters`, but a depthwise conv between the
    pruned layer and its consumer loses the same channels (its ``features`` and
    ``groups`` shrink with them). For a standalone head net (`head_net`).

    Raises:
      TransformError: a site that is not prunable or a bad `keep`.
    """
    index = _site_index(site)
    if not 0 <= index < len(net.layers):
        raise TransformError(f"site {site} does not exist in {net.name}")
    edits, depthwise = _separable_edits(net, index)
    name = f"layer_{index:02d}"
    kernel = np.asarray(variables["params"][name]["kernel"])
    n = kernel.shape[-1]
    if not 1 <= int(keep) <= n:
        raise TransformError(f"site {site}: keep must be in [1, {n}], got {keep}")
    norms = np.abs(kernel).reshape(-1, n).sum(0)
    idx = np.sort(np.argsort(-norms, kind="stable")[: int(keep)])
    params = {k: dict(v) for k, v in variables["params"].items()}
    for j, what, axis in edits:
        lname = f"layer_{j:02d}"
        params[lname][what] = np.take(np.asarray(params[lname][what]), idx, axis=axis)
    layers = list(net.layers)
    layers[index] = layers[index].replace(features=int(keep))
    for j in depthwise:
        layers[j] = layers[j].replace(features=int(keep), groups=int(keep))
    out = {k: v for k, v in variables.items() if k != "params"}
    out["params"] = params
    return net.replace(layers=tuple(layers)), out
