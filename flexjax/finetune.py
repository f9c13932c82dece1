"""Brief fine-tuning of an in-memory model: after pruning, factorizing, dropping layers.

FlexDNN fine-tunes an exit after every pruning step and MCDNN fine-tunes each
approximated variant (optionally distilled from the original). Both need the
same small loop over ``(net, variables, x, y)`` without a workdir, checkpoints
or configs -- `finetune` is that loop. Full training jobs use
`flexjax.training.train_and_evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from flexjax.models import build
from flexjax.spec import FINAL, Net
from flexjax.training import exit_weights as default_exit_weights
from flexjax.training import make_optimizer, random_shift


def _paths(tree: Mapping[str, Any], prefix: str = "") -> dict:
    """The same nesting as `tree` with each leaf replaced by its ``a/b/c`` path."""
    return {
        k: _paths(v, f"{prefix}{k}/") if isinstance(v, Mapping) else f"{prefix}{k}"
        for k, v in tree.items()
    }


def trainable_mask(params: Mapping[str, Any], trainable: Callable[[str], bool] | None) -> Any:
    """`trainable(path)` for every parameter leaf (all True when `trainable` is None)."""
    return jax.tree.map(lambda p: trainable is None or bool(trainable(p)), _paths(params))


def finetune(
    net: Net,
    variables: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    trainable: Callable[[str], bool] | None = None,
    teacher_logits: np.ndarray | None = None,
    distill_weight: float = 0.5,
    temperature: float = 4.0,
    exit_weights: Sequence[float] | None = None,
    seed: int = 0,
    augment_shift: int = 0,
) -> dict:
    """Fine-tunes `variables` of `net` on ``(x, y)`` for `steps` Adam steps.

    Args:
      trainable: predicate on parameter paths such as ``"exit_3/layer_01/kernel"``;
        other parameters (and the batch-norm statistics of layers whose
        parameters are frozen) stay bit-exact. When no backbone parameter is
        trainable the backbone also runs in inference mode (no dropout, running
        statistics), as in exits-only training.
      teacher_logits: ``[len(x), classes]`` logits of a teacher (e.g. the
        original model) distilled into the final exit: its loss becomes
        ``(1 - w) * CE + w * T^2 * KL(teacher_T || student_T)``.
      exit_weights: loss weight per exit in execution order (default:
        BranchyNet's 1.0 ... 0.3, see `flexjax.training.exit_weights`).

    Returns:
      New variables (numpy); the inputs are not modified.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"need matching, non-empty x and y, got {len(x)} and {len(y)} examples")
    if teacher_logits is not None:
        teacher_logits = np.asarray(teacher_logits, np.float32)
        if teacher_logits.shape != (len(x), net.num_classes):
            raise ValueError(
                f"teacher_logits must be [{len(x)}, {net.num_classes}], "
                f"got {list(teacher_logits.shape)}"
            )
    if not 0.0 <= distill_weight <= 1.0:
        raise ValueError(f"distill_weight must be in [0, 1], got {distill_weight}")
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    mask = trainable_mask(params, trainable)
    # A layer's statistics move only if some of its parameters are trainable.
    moving = {k: _any(mask.get(k)) for k in batch_stats}
    stats_mask = {k: jax.tree.map(lambda _, t=moving[k]: t, v) for k, v in batch_stats.items()}
    backbone_frozen = not any(
        _any(m) for k, m in mask.items() if k not in {e.name for e in net.exits}
    )
    weights = jnp.asarray(default_exit_weights(net, tuple(exit_weights or ())))
    tcfg = ml_collections.ConfigDict(
        {"optimizer": "adam", "learning_rate": learning_rate, "schedule": "constant",
         "warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.9}
    )  # fmt: skip
    tx = make_optimizer(tcfg, steps, mask)
    step = jax.jit(
        _make_step(net, tx, weights, backbone_frozen, augment_shift, distill_weight, temperature)
    )
    state = (params, batch_stats, tx.init(params))
    rng = np.random.default_rng(seed)
    bs = min(batch_size, len(x))
    order, pos = rng.permutation(len(x)), 0
    key = jax.random.PRNGKey(seed)
    for i in range(steps):
        if pos + bs > len(x):
            order, pos = rng.permutation(len(x)), 0
        idx = order[pos : pos + bs]
        pos += bs
        t = teacher_logits[idx] if teacher_logits is not None else np.zeros((bs, 0), np.float32)
        state = step(state, x[idx], y[idx], t, jax.random.fold_in(key, i))
    new_params, new_stats, _ = jax.device_get(state)
    new_stats = jax.tree.map(
        lambda keep_new, new, old: new if keep_new else old, stats_mask, new_stats, batch_stats
    )
    out = {"params": new_params}
    if batch_stats:
        out["batch_stats"] = jax.tree.map(np.asarray, new_stats)
    return out


def _any(mask: Any) -> bool:
    return mask is not None and any(jax.tree.leaves(mask))


def _make_step(net, tx, weights, backbone_frozen, augment_shift, distill_weight, temperature):
    model = build(net)
    names = net.exit_names
    final = names.index(FINAL)

    def loss_fn(params, batch_stats, x, y, teacher, rng):
        v = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        out, updates = model.apply(
            v, x, train=True, freeze_backbone=backbone_frozen,
            rngs={"dropout": rng}, mutable=["batch_stats"],
        )  # fmt: skip
        losses = []
        for j, n in enumerate(names):
            logits = out[n].astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if j == final and teacher.shape[-1]:
                t = temperature
                kl = optax.kl_divergence(
                    jax.nn.log_softmax(logits / t), jax.nn.softmax(teacher / t)
                ).mean()
                ce = (1.0 - distill_weight) * ce + distill_weight * t * t * kl
            losses.append(ce)
        return jnp.sum(weights * jnp.stack(losses)), updates.get("batch_stats", {})

    def step(state, x, y, teacher, rng):
        params, batch_stats, opt_state = state
        rng_aug, rng_drop = jax.random.split(rng)
        if augment_shift:
            x = random_shift(x, rng_aug, augment_shift)
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y, teacher, rng_drop
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats or batch_stats, opt_state

    return step
