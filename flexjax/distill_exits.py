"""BranchyNet-style exit heads distilled from a frozen backbone, on cached features.

A pretrained backbone (e.g. EfficientNet-Lite0) gets light exit heads at
chosen positions; each head learns to reproduce the backbone's own final
output (soft targets at temperature T, Hinton et al.), reading only the
backbone's cached activation at its position (`flexjax.feature_cache`), so
training never re-runs the backbone. These are BranchyNet-style heads at
fixed positions, not FlexDNN-searched exits.

Heads (`HEADS`):

* ``pool_dense``: global average pool -> dense(num_classes);
* ``conv_pool_dense``: conv 1x1 (``features``) -> relu6 -> global pool -> dense;
* ``mimic``: the backbone's own head on the exit's activation: conv 1x1 to the
  width of the backbone's classifier input -> relu6 -> global pool -> the
  backbone's classifier, copied and frozen. Only the conv learns, to reproduce
  the backbone's pooled features (mean squared error, `DistillSettings.feature_weight`)
  as well as its softmax: a per-frame target of hundreds of values instead of
  one class distribution, and one classifier for every exit, so a head trained
  on a few scenes still speaks about the classes those scenes never show.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flexjax import spec
from flexjax.feature_cache import FeatureCache
from flexjax.models.build import apply_layer, head_apply, init, layer_name
from flexjax.spec import Exit, Net

HEADS = ("pool_dense", "conv_pool_dense", "mimic")


def head_layers(kind: str, num_classes: int, features: int = 128) -> tuple[spec.Layer, ...]:
    """The layers of one exit head of `kind` (`HEADS`).

    Raises:
      ValueError: an unknown kind (valid ones listed) or features < 1.
    """
    if kind == "pool_dense":
        return (spec.global_pool(), spec.dense(num_classes))
    if kind in ("conv_pool_dense", "mimic"):
        if features < 1:
            raise ValueError(f"head features must be >= 1; got {features}")
        return (
            spec.conv(features, kernel=1, use_bias=True),
            spec.relu6(),
            spec.global_pool(),
            spec.dense(num_classes),
        )
    raise ValueError(f"unknown exit head {kind!r}; valid: {', '.join(HEADS)}")


def attach(net: Net, positions: Sequence[int], head: Sequence[spec.Layer]) -> Net:
    """`net` with one head after each position (named ``exit_<position>``), old exits dropped."""
    exits = tuple(Exit(int(p), tuple(head)) for p in sorted(positions))
    return Net(net.input_shape, net.num_classes, net.layers, exits, net.name)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """How the heads are trained (plain data)."""

    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 3e-3
    temperature: float = 2.0
    seed: int = 0
    feature_weight: float = 1.0  # mimic heads: weight of the pooled-feature error


def group_balanced(groups: np.ndarray) -> np.ndarray:
    """Per-frame weights drawing every group (e.g. clip) equally often, whatever its size."""
    groups = np.asarray(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


def classifier(net: Net) -> tuple[int, int]:
    """``(pool position, classifier position)`` of a backbone ending in pool [-> dropout] -> dense.

    Raises:
      ValueError: the backbone does not end that way (no classifier to share).
    """
    kinds = [layer.kind for layer in net.layers]
    if kinds[-1] != "dense" or "global_pool" not in kinds:
        raise ValueError(f"{net.name or 'the net'} does not end in global_pool ... dense")
    pool = len(kinds) - 1 - kinds[::-1].index("global_pool")
    if any(k not in ("dropout",) for k in kinds[pool + 1 : -1]):
        raise ValueError(f"{net.name or 'the net'}: only dropout may sit between pool and dense")
    return pool, len(kinds) - 1


def _is_mimic(net: Net, e: Exit) -> bool:
    """A head that ends in relu6 -> pool -> a dense as wide as the backbone's classifier."""
    kinds = [layer.kind for layer in e.layers]
    last = net.layers[-1]
    return (
        kinds[-4:] == ["conv", "relu6", "global_pool", "dense"]
        and e.layers[-4]["features"] == _classifier_width(net)
        and e.layers[-1] == last
    )


def _classifier_width(net: Net) -> int:
    return int(net.shapes()[-1][0][-1])


class _Head(nn.Module):
    """An exit head returning ``(input of its last layer, logits)`` (names as `_Stack`'s)."""

    layers: tuple[spec.Layer, ...]

    @nn.compact
    def __call__(self, x):
        for j, layer in enumerate(self.layers[:-1]):
            x = apply_layer(layer, x, train=False, name=layer_name(j))
        j = len(self.layers) - 1
        return x, apply_layer(self.layers[-1], x, train=False, name=layer_name(j))


def distill_loss(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    t = jax.nn.log_softmax(teacher / temperature)
    s = jax.nn.log_softmax(student / temperature)
    kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return temperature**2 * jnp.mean(kl)


def train_heads(
    net: Net,
    backbone_variables: Mapping[str, Any],
    cache: FeatureCache,
    settings: DistillSettings,
    *,
    split: str = "train",
    log: Callable[[str], None] = print,
    weights: np.ndarray | None = None,
) -> tuple[dict, dict]:
    """Trains every exit head of `net` on `cache`; returns ``(variables, losses)``.

    Args:
      net: the backbone with its exit heads (`attach`); every exit position must be cached.
      backbone_variables: the frozen backbone's variables (kept as they are).
      cache: the backbone's cached activations and final logits.
      settings: steps, batch size, learning rate (adam, cosine decay), temperature.
      weights: optional per-frame sampling weights of the split (e.g. `group_balanced`:
        every clip drawn as often); None draws every frame alike.

    Returns:
      The multi-exit variables (backbone + trained heads) and, per exit, the
      distillation loss at the first and last step.

    Raises:
      ValueError: an exit position that is not in the cache, or an empty split.
    """
    mimic = any(_is_mimic(net, e) for e in net.exits)
    pool_pos, dense_pos = classifier(net) if mimic else (None, None)
    need = [e.after for e in net.exits] + ([pool_pos] if mimic else [])
    missing = [p for p in need if p not in cache.positions]
    if missing:
        raise ValueError(
            f"positions {missing} are not in the feature cache (cached: {list(cache.positions)})"
        )
    teacher = cache.logits(split)
    n = len(teacher)
    if n == 0:
        raise ValueError(f"the {split} split has no frames to distill on")
    prob = None
    if weights is not None:
        weights = np.asarray(weights, np.float64)
        if weights.shape != (n,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(f"weights must be {n} finite values >= 0; got shape {weights.shape}")
        if np.count_nonzero(weights) < min(settings.batch_size, n):
            raise ValueError("weights leave fewer frames than a batch")
        prob = weights / weights.sum()
    shapes = net.shapes()
    params = dict(backbone_variables["params"])
    losses = {}
    rng = np.random.default_rng(settings.seed)
    schedule = optax.cosine_decay_schedule(settings.learning_rate, max(1, settings.steps))
    opt = optax.adam(schedule)
    temperature = float(settings.temperature)
    pooled = np.asarray(cache.features(split, pool_pos)) if mimic else np.zeros((n, 1))
    w = float(settings.feature_weight)
    for e in net.exits:
        feats = np.asarray(cache.features(split, e.after))
        # A head alone, as a net on its input: its params are named as the exit's are.
        head_net = Net(shapes[e.after][1], net.num_classes, e.layers)
        p = init(head_net, jax.random.key(settings.seed + e.after))["params"]
        frozen = {}
        if _is_mimic(net, e):  # the backbone's classifier, shared and kept as it is
            last = layer_name(len(e.layers) - 1)
            frozen = {last: backbone_variables["params"][layer_name(dense_pos)]}
            p = {k: v for k, v in p.items() if k != last}
        state = opt.init(p)
        head = _Head(e.layers)

        def loss_fn(p, h, t, f, e=e, frozen=frozen, head=head):
            feat, student = head.apply({"params": {**p, **frozen}}, h)
            loss = distill_loss(student, t, temperature)
            if frozen:
                loss = loss + w * jnp.mean(jnp.square(feat - f))
            return loss

        @jax.jit
        def step(p, state, h, t, f, loss_fn=loss_fn):
            loss, g = jax.value_and_grad(loss_fn)(p, h, t, f)
            updates, state = opt.update(g, state, p)
            return optax.apply_updates(p, updates), state, loss

        first = last = None
        bs = min(settings.batch_size, n)
        for i in range(settings.steps):
            idx = rng.choice(n, size=bs, replace=False, p=prob)
            p, state, loss = step(p, state, feats[idx], teacher[idx], pooled[idx])
            last = float(loss)
            first = last if first is None else first
            if not np.isfinite(last):
                raise FloatingPointError(f"{e.name}: distillation loss is {last} at step {i}")
        params[e.name] = {**p, **frozen}
        losses[e.name] = {"first": first, "last": last}
        log(f"distilled {e.name} (after position {e.after}): loss {first:.3f} -> {last:.3f}")
    variables = {k: v for k, v in backbone_variables.items() if k != "params"}
    variables["params"] = params
    return variables, losses


def exit_logits(
    net: Net, variables: Mapping[str, Any], cache: FeatureCache, split: str, batch: int = 256
) -> dict[str, np.ndarray]:
    """``{exit name: logits}`` of every exit on `split`'s cached features (final: cached)."""
    out = {}
    for e in net.exits:
        feats = cache.features(split, e.after)
        fn = jax.jit(lambda h, e=e: head_apply(net, dict(variables), e.name, h))
        parts = [np.asarray(fn(np.asarray(feats[i : i + batch])))
                 for i in range(0, len(feats), batch)]  # fmt: skip
        out[e.name] = np.concatenate(parts) if parts else np.zeros((0, net.num_classes), np.float32)
    out[spec.FINAL] = cache.logits(split)
    return out


def agreement(logits: Mapping[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Top-1 agreement of each exit's logits with `labels` (NaN on an empty split)."""
    return {
        n: float((v.argmax(-1) == labels).mean()) if len(labels) else float("nan")
        for n, v in logits.items()
    }
