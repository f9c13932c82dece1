"""MCDNN specialization and task derivation: relabeled tasks, retargeting, cascades.

* **Tasks by relabeling** (`relabel`): from one dataset, several
  classification problems -- ``digit`` (the 10 classes), ``parity`` (odd /
  even), ``ge5`` (< 5 / >= 5) -- the way MCDNN derives gender / age / race
  from one face dataset. Such tasks can share a stem (`train/catalog.py`).
* **Retargeting** (`retarget_head` + `retarget`): when the recent stream is
  (n, p)-dominated (`runtime.skew`), the last layer is replaced by one with
  ``n + 1`` outputs (the dominant classes plus "other") and only that layer is
  retrained. With **pre-forwarding** the penultimate features of the training
  set are computed once and the layer is fitted on the cached features, so a
  retarget costs one forward pass plus a tiny softmax regression.
* **Cascade** (`cascade`): the specialized (often also approximated, cheap)
  model runs first; on "other" the general model runs.

`retrain_times` measures the analogue of MCDNN's Table 3: full retrain /
retarget / retarget with pre-forwarding, same steps and batch size.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexjax import models
from flexjax.finetune import finetune
from flexjax.spec import Net, dense

TASKS = {"digit": 10, "parity": 2, "ge5": 2}


class SpecializeError(ValueError):
    """Bad task, class set or network for specialization."""


def relabel(y: np.ndarray, task: str) -> np.ndarray:
    """Labels of `task` derived from digit labels (``digit`` | ``parity`` | ``ge5``)."""
    y = np.asarray(y)
    if task == "digit":
        return y.astype(np.int32)
    if task == "parity":
        return (y % 2).astype(np.int32)
    if task == "ge5":
        return (y >= 5).astype(np.int32)
    raise SpecializeError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def _check_classes(net: Net, classes: Sequence[int]) -> tuple[int, ...]:
    cl = tuple(sorted({int(c) for c in classes}))
    if len(cl) != len(tuple(classes)) or not cl:
        raise SpecializeError(f"classes must be distinct, got {list(classes)}")
    if cl[0] < 0 or cl[-1] >= net.num_classes:
        raise SpecializeError(f"classes {list(cl)} out of range for {net.num_classes} classes")
    if len(cl) >= net.num_classes:
        raise SpecializeError("a specialized model needs fewer classes than the general one")
    if net.layers[-1].kind != "dense":
        raise SpecializeError(
            f"the last layer is '{net.layers[-1].kind}'; retargeting needs a dense logits layer"
        )
    return cl


def specialized_labels(y: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Maps labels to ``0..n-1`` for `classes` (sorted) and ``n`` ("other") otherwise."""
    cl = sorted(int(c) for c in classes)
    lut = np.full(max(int(np.max(y)) + 1, max(cl) + 1), len(cl), np.int32)
    lut[cl] = np.arange(len(cl), dtype=np.int32)
    return lut[np.asarray(y)]


def retarget_head(net: Net, variables: dict, classes: Sequence[int]) -> tuple[Net, dict]:
    """Pure transform: the logits layer keeps the rows of `classes` and gains an "other" row.

    The "other" row starts as the mean of the dropped classes' rows (a
    sensible prior before the layer is retrained).
    """
    cl = _check_classes(net, classes)
    last = models.layer_name(len(net.layers) - 1)
    p = variables["params"][last]
    idx = jnp.asarray(cl)
    rest = jnp.asarray([c for c in range(net.num_classes) if c not in cl])
    kernel = jnp.concatenate([p["kernel"][:, idx], p["kernel"][:, rest].mean(1, keepdims=True)], 1)
    new = {"kernel": kernel}
    if net.layers[-1]["use_bias"]:
        new["bias"] = jnp.concatenate([p["bias"][idx], p["bias"][rest].mean(keepdims=True)])
    layers = (*net.layers[:-1], dense(len(cl) + 1, use_bias=net.layers[-1]["use_bias"]))
    spec_net = net.replace(
        layers=layers, num_classes=len(cl) + 1, exits=(), name=f"{net.name}_spec"
    )
    params = {k: v for k, v in variables["params"].items() if k not in {e.name for e in net.exits}}
    params[last] = new
    return spec_net, {**variables, "params": params}


def penultimate(net: Net, variables: dict, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Inputs of the logits layer (the output of position ``L-2``) for images `x`."""
    fn = _penultimate_fn(net)
    out = [np.asarray(fn(variables, x[i : i + batch])) for i in range(0, len(x), batch)]
    return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _penultimate_fn(net: Net):
    model = models.build(net)
    stop = len(net.layers) - 1
    return jax.jit(lambda v, xb: model.apply(v, xb, False, stop=stop, heads=False)["activation"])


@functools.partial(jax.jit, static_argnames=("steps", "batch_size", "lr"))
def _fit_softmax(kernel, bias, feats, labels, key, *, steps, batch_size, lr):
    tx = optax.adam(lr)
    params = (kernel, bias)
    opt = tx.init(params)

    def loss(params, xb, yb):
        logits = xb @ params[0] + params[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def body(i, carry):
        params, opt = carry
        idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, feats.shape[0])
        g = jax.grad(loss)(params, feats[idx], labels[idx])
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt))
    return params


def fit_last_layer(
    net: Net,
    variables: dict,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> dict:
    """Retrains only the logits layer on cached penultimate `features` (pre-forwarding)."""
    last = models.layer_name(len(net.layers) - 1)
    p = variables["params"][last]
    bias = p.get("bias", jnp.zeros(p["kernel"].shape[1]))
    k, b = _fit_softmax(
        p["kernel"], bias, jnp.asarray(features), jnp.asarray(labels), jax.random.PRNGKey(seed),
        steps=int(steps), batch_size=int(batch_size), lr=float(learning_rate),
    )  # fmt: skip
    new = {"kernel": k, **({"bias": b} if "bias" in p else {})}
    return {**variables, "params": {**variables["params"], last: new}}


def balance_other(y_spec: np.ndarray, other_fraction: float, seed: int = 0) -> np.ndarray:
    """Indices keeping every in-class example and "other" ones as `other_fraction` of the total.

    A specialized model sees mostly its dominant classes; training it on the
    full label distribution (80% "other" for 2 of 10 digits) would bias it
    towards "other".
    """
    if not 0.0 < other_fraction < 1.0:
        raise SpecializeError(f"other_fraction must be in (0, 1), got {other_fraction}")
    other = int(y_spec.max())
    rng = np.random.default_rng(seed)
    inside = np.flatnonzero(y_spec != other)
    outside = np.flatnonzero(y_spec == other)
    want = int(round(len(inside) * other_fraction / (1 - other_fraction)))
    keep = rng.choice(outside, size=min(want, len(outside)), replace=False)
    return np.sort(np.concatenate([inside, keep]))


class Cascade(NamedTuple):
    predictions: np.ndarray  # general-class ids
    fallback: np.ndarray  # bool: the general model ran
    accuracy: float
    fallback_rate: float


def cascade(
    spec_logits: np.ndarray,
    general_logits: np.ndarray,
    classes: Sequence[int],
    labels: np.ndarray,
) -> Cascade:
    """Specialized model first; on "other" (its last output) the general model's answer."""
    cl = np.asarray(sorted(int(c) for c in classes))
    s = np.asarray(spec_logits).argmax(-1)
    fallback = s == len(cl)
    pred = np.where(fallback, np.asarray(general_logits).argmax(-1), cl[np.minimum(s, len(cl) - 1)])
    return Cascade(
        pred, fallback, float((pred == np.asarray(labels)).mean()), float(fallback.mean())
    )


def skewed_stream(
    y: np.ndarray, classes: Sequence[int], p: float, n: int, seed: int = 0
) -> np.ndarray:
    """Indices of an `n`-frame stream where a fraction `p` of frames show `classes`."""
    rng = np.random.default_rng(seed)
    inside = np.flatnonzero(np.isin(y, classes))
    outside = np.flatnonzero(~np.isin(y, classes))
    k = int(round(p * n))
    idx = np.concatenate([rng.choice(inside, k), rng.choice(outside, n - k)])
    return rng.permutation(idx)


def retrain_times(
    net: Net,
    variables: dict,
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[int],
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    other_fraction: float = 0.2,
    seed: int = 0,
) -> dict:
    """MCDNN Table 3 analogue: seconds to specialize by full retrain / retarget / + pre-forward.

    All three use the same data (balanced with `balance_other`), steps and
    batch size; JIT compilation is included (it is part of what a phone
    would pay). Returns the times and the specialized variables of each.
    """

    y_spec = specialized_labels(y, classes)
    keep = balance_other(y_spec, other_fraction, seed)
    xs, ys = x[keep], y_spec[keep]
    spec_net, spec_vars = retarget_head(net, variables, classes)
    last = models.layer_name(len(net.layers) - 1)
    out: dict = {"examples": int(len(keep)), "steps": int(steps), "batch_size": int(batch_size)}

    t0 = time.perf_counter()
    fresh = models.init(spec_net, jax.random.PRNGKey(seed))
    full = finetune(
        spec_net, fresh, xs, ys, steps=steps, batch_size=batch_size, learning_rate=1e-3, seed=seed
    )
    jax.block_until_ready(full)
    out["full_retrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ret = finetune(
        spec_net, spec_vars, xs, ys, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, trainable=lambda path: path.startswith(last), seed=seed,
    )  # fmt: skip
    jax.block_until_ready(ret)
    out["retarget_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats = penultimate(spec_net, spec_vars, xs)
    pre = fit_last_layer(
        spec_net, spec_vars, feats, ys, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed,
    )  # fmt: skip
    jax.block_until_ready(pre)
    out["retarget_preforward_s"] = time.perf_counter() - t0
    return out, spec_net, {"full_retrain": full, "retarget": ret, "retarget_preforward": pre}
