"""Pure structural transforms: `(net, variables, ...) -> (net, variables)`.

FlexDNN's exit architecture search and MCDNN's approximated variants both
need to take a trained network apart: remove the least important filters of a
layer (and the matching input channels of whatever consumes them), or remove a
whole layer. These functions do it on the two halves of a model -- the `Net`
(data) and its variables (a pytree) -- and return new values; nothing is
mutated and no Flax module is involved, so they compose and run under
`jax.eval_shape`.

A *site* names a layer by its parameter path (see `flexjax.models.build`):
``"layer_03"`` is backbone position 3 and ``"exit_3/layer_01"`` is layer 1 of
the head of exit ``exit_3``. Layers inside composite blocks (residual,
inception, mbconv) are not sites: their consumers are not a simple chain.

Filter pruning is exact up to the removed filters: the pruned network computes
the same function as the original with those filters' outputs forced to zero
(bias included) -- except through a cross-channel ``lrn``, whose normalisation
window then sees different neighbours; fine-tuning absorbs that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexjax.models.build import init as init_variables
from flexjax.models.build import layer_name
from flexjax.spec import PARAMETRIC, Exit, Layer, Net, SpecError, infer_shapes

# Layers an activation passes through unchanged channel-wise while pruning is traced.
_PASS = frozenset({"relu", "relu6", "lrn", "dropout", "max_pool", "avg_pool"})
# Layers that consume channels through an input axis of their first kernel.
_CONSUMERS = {"conv": ("kernel", 2), "dense": ("kernel", 0)}
_LOW_RANK_CONSUMERS = {"low_rank_conv": ("u", "kernel", 2), "low_rank_dense": ("u", "kernel", 0)}
# Layers removed together with the parametric layer before them by `drop_layer`.
_TRAILING = frozenset({"relu", "relu6", "batch_norm", "lrn", "dropout"})


class TransformError(ValueError):
    """A transform that cannot be applied (bad site, bad argument)."""


# ---------------------------------------------------------------------------
# Sites.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Site:
    exit: str | None  # None: the backbone
    index: int

    @property
    def prefix(self) -> tuple[str, ...]:
        return () if self.exit is None else (self.exit,)

    def __str__(self) -> str:
        return "/".join((*self.prefix, layer_name(self.index)))


def parse_site(net: Net, site: str) -> Site:
    head, sep, tail = site.rpartition("/")
    if not tail.startswith("layer_") or not tail[6:].isdigit():
        raise TransformError(
            f"site {site!r}: expected 'layer_NN' (backbone) or '<exit>/layer_NN' (exit head)"
        )
    index = int(tail[6:])
    exit_name = head if sep else None
    layers = site_layers(net, exit_name, site)
    if index >= len(layers):
        raise TransformError(f"site {site!r}: the sequence has only {len(layers)} layers")
    return Site(exit_name, index)


def site_layers(net: Net, exit_name: str | None, where: str = "") -> tuple[Layer, ...]:
    if exit_name is None:
        return net.layers
    try:
        return net.get_exit(exit_name).layers
    except KeyError as e:
        raise TransformError(f"site {where!r}: {e.args[0]}") from None


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict:
    """A copy of `tree` with `path` set to `value` (copies only along the path)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = set_path(tree.get(path[0], {}), path[1:], value)
    return out


# ---------------------------------------------------------------------------
# Filter pruning.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Edit:
    """Take `index` along `axis` of the array at variables[collection][path]."""

    collection: str
    path: tuple[str, ...]
    axis: int
    expand: int = 1  # flatten: each kept channel becomes `expand` positions


def _trace(net: Net, site: Site) -> list[_Edit]:
    """The variable edits that follow the pruned filters of `site` to their consumers."""
    layers = site_layers(net, site.exit)
    layer = layers[site.index]
    if layer.kind not in ("conv", "dense") or layer.get("groups", 1) != 1:
        raise TransformError(
            f"site {site}: only conv (groups=1) and dense layers have prunable filters, "
            f"got '{layer.kind}'"
        )
    where = (*site.prefix, layer_name(site.index))
    edits = [_Edit("params", (*where, "kernel"), -1)]
    if layer["use_bias"]:
        edits.append(_Edit("params", (*where, "bias"), 0))
    shapes = infer_shapes(layers, net.input_shape if site.exit is None else _head_input(net, site))
    exits_at = {e.after: e for e in net.exits} if site.exit is None else {}
    edits += _follow(net, layers, site.prefix, site.index, shapes, exits_at, 1, str(site))
    return edits


def _head_input(net: Net, site: Site) -> tuple[int, ...]:
    return net.shapes()[net.exit_position(site.exit)][1]


def _follow(net, layers, prefix, index, shapes, exits_at, expand, site) -> list[_Edit]:
    """Edits for the layers after `index` in one sequence, up to the first consumer."""
    edits: list[_Edit] = []
    for j in range(index + 1, len(layers)):
        if j - 1 in exits_at:  # an exit reads the activation entering layer j
            edits += _head_edits(net, exits_at[j - 1], expand, site)
        layer, path = layers[j], (*prefix, layer_name(j))
        if layer.kind in _PASS:
            continue
        if layer.kind == "batch_norm":
            edits += [_Edit("params", (*path, n), 0, expand) for n in ("scale", "bias")]
            edits += [_Edit("batch_stats", (*path, n), 0, expand) for n in ("mean", "var")]
            continue
        if layer.kind == "global_pool":
            continue
        if layer.kind == "flatten":
            h, w, _ = shapes[j][0]
            expand *= h * w
            continue
        if layer.kind in _CONSUMERS and layer.get("groups", 1) == 1:
            name, axis = _CONSUMERS[layer.kind]
            return [*edits, _Edit("params", (*path, name), axis, expand)]
        if layer.kind in _LOW_RANK_CONSUMERS:
            sub, name, axis = _LOW_RANK_CONSUMERS[layer.kind]
            return [*edits, _Edit("params", (*path, sub, name), axis, expand)]
        raise TransformError(
            f"site {site}: its filters feed a '{layer.kind}' layer at {'/'.join(path)} "
            "whose input channels cannot be pruned"
        )
    raise TransformError(f"site {site}: produces the output of its sequence (logits)")


def _head_edits(net: Net, e: Exit, expand: int, site: str) -> list[_Edit]:
    shapes = infer_shapes(e.layers, net.shapes()[e.after][1])
    return _follow(net, e.layers, (e.name,), -1, shapes, {}, expand, site)


def prunable_sites(net: Net) -> list[str]:
    """Every site whose filters `prune_filters` can remove, backbone first."""
    out = []
    for exit_name in (None, *(e.name for e in net.exits)):
        for i in range(len(site_layers(net, exit_name))):
            site = Site(exit_name, i)
            try:
                _trace(net, site)
            except TransformError:
                continue
            out.append(str(site))
    return out


def filter_norms(net: Net, variables: Mapping[str, Any], site: str) -> np.ndarray:
    """L1 norm of each output filter of `site` (kernel only), shape ``[features]``."""
    s = parse_site(net, site)
    _trace(net, s)
    kernel = np.asarray(get_path(variables["params"], (*s.prefix, layer_name(s.index), "kernel")))
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0)


def _keep_indices(net, variables, site, keep) -> tuple[int, jax.Array]:
    features = site_layers(net, site.exit)[site.index]["features"]
    if isinstance(keep, (int, np.integer)):
        n = int(keep)
        if not 1 <= n <= features:
            raise TransformError(f"site {site}: keep must be in [1, {features}], got {n}")
        kernel = get_path(variables["params"], (*site.prefix, layer_name(site.index), "kernel"))
        norms = jnp.abs(jnp.asarray(kernel)).reshape(-1, features).sum(0)
        return n, jnp.sort(jnp.argsort(-norms, stable=True)[:n])
    idx = np.asarray(list(keep), np.int64)
    if idx.ndim != 1 or not len(idx):
        raise TransformError(f"site {site}: keep must be a count or a non-empty list of filters")
    if len(set(idx.tolist())) != len(idx) or idx.min() < 0 or idx.max() >= features:
        raise TransformError(
            f"site {site}: keep indices must be distinct and in [0, {features}), got {idx.tolist()}"
        )
    return len(idx), jnp.asarray(np.sort(idx))


def _take(x: Any, index: jax.Array, axis: int, expand: int) -> jax.Array:
    x = jnp.asarray(x)
    if expand > 1:  # flatten: position p of channel c sits at p * C + c
        c = x.shape[axis] // expand
        index = (jnp.arange(expand)[:, None] * c + index[None, :]).reshape(-1)
    return jnp.take(x, index, axis=axis)


def prune_filters(
    net: Net, variables: Mapping[str, Any], site: str, keep: int | Sequence[int]
) -> tuple[Net, dict]:
    """Removes output filters of a conv/dense layer and the matching consumer inputs.

    Args:
      net, variables: the model.
      site: ``"layer_NN"`` or ``"<exit>/layer_NN"`` (see `prunable_sites`).
      keep: how many filters to keep (those with the largest L1 norm, in their
        original order) or the indices of the filters to keep.

    Returns:
      ``(net, variables)`` with the layer's ``features`` reduced; the kernel and
      bias, a following batch_norm's parameters and statistics, and the input
      axis of every consumer (the next conv/dense of the sequence, through
      activations, pooling and flatten; for a backbone site also the first
      conv/dense of every exit reading an activation in between) are sliced.
    """
    s = parse_site(net, site)
    edits = _trace(net, s)
    n, index = _keep_indices(net, variables, s, keep)
    out = dict(variables)
    for ed in edits:
        out[ed.collection] = set_path(
            out[ed.collection],
            ed.path,
            _take(get_path(out[ed.collection], ed.path), index, ed.axis, ed.expand),
        )
    layer = site_layers(net, s.exit)[s.index].replace(features=n)
    return replace_layer(net, s, layer), out


def replace_layer(net: Net, site: Site, layer: Layer) -> Net:
    if site.exit is None:
        layers = list(net.layers)
        layers[site.index] = layer
        return net.replace(layers=tuple(layers))
    exits = []
    for e in net.exits:
        if e.name == site.exit:
            head = list(e.layers)
            head[site.index] = layer
            e = Exit(e.after, tuple(head), e.name)
        exits.append(e)
    return net.replace(exits=tuple(exits))


# ---------------------------------------------------------------------------
# Layer removal.
# ---------------------------------------------------------------------------


def drop_layer(
    net: Net, variables: Mapping[str, Any], site: str, rng: jax.Array
) -> tuple[Net, dict]:
    """Removes a parametric layer plus the relu/batch_norm/lrn/dropout right after it.

    Every other layer keeps its trained variables, except a layer whose input
    shape changes (e.g. the conv after a dropped channel-changing conv), which
    is re-initialized from `rng`. Removing backbone layers shifts later
    positions: their parameters move to the new ``layer_NN`` names and exits
    hanging off later positions move with them, keeping their names.
    """
    s = parse_site(net, site)
    layers = site_layers(net, s.exit)
    layer = layers[s.index]
    if layer.kind not in PARAMETRIC:
        raise TransformError(
            f"site {site}: only parametric layers are dropped (with the activations "
            f"after them), got '{layer.kind}'"
        )
    stop = s.index + 1
    while stop < len(layers) and layers[stop].kind in _TRAILING:
        stop += 1
    if stop == len(layers):
        raise TransformError(f"site {site}: the last layer of a sequence produces its output")
    removed = range(s.index, stop)
    keep = [i for i in range(len(layers)) if i not in removed]
    new_pos = {old: new for new, old in enumerate(keep)}
    try:
        if s.exit is None:
            exits = []
            for e in net.exits:
                if e.after in removed:
                    raise TransformError(
                        f"site {site}: exit '{e.name}' hangs off position {e.after}, "
                        "which would be removed; drop or move the exit first"
                    )
                exits.append(Exit(new_pos[e.after], e.layers, e.name))
            new_net = net.replace(layers=tuple(layers[i] for i in keep), exits=tuple(exits))
        else:
            e = net.get_exit(s.exit)
            new_net = net.replace(
                exits=tuple(
                    Exit(x.after, tuple(x.layers[i] for i in keep), x.name) if x is e else x
                    for x in net.exits
                )
            )
    except SpecError as err:
        raise TransformError(f"site {site}: the network without it is invalid: {err}") from None
    fresh = init_variables(new_net, rng)
    return new_net, _carry_over(net, new_net, variables, fresh, s.exit, new_pos)


def _carry_over(old, new, variables, fresh, dropped_in, new_pos) -> dict:
    """`fresh` with every layer whose input shape is unchanged taking its old variables."""
    out = {col: dict(tree) for col, tree in fresh.items()}
    for exit_name in (None, *(e.name for e in new.exits)):
        old_layers, new_layers = site_layers(old, exit_name), site_layers(new, exit_name)
        old_in = _sequence_inputs(old, exit_name)
        new_in = _sequence_inputs(new, exit_name)
        prefix = () if exit_name is None else (exit_name,)
        moved = new_pos if exit_name == dropped_in else {i: i for i in range(len(old_layers))}
        for o, n in moved.items():
            if old_layers[o].kind not in PARAMETRIC or old_in[o] != new_in[n]:
                continue
            for col in out:
                try:
                    value = get_path(variables[col], (*prefix, layer_name(o)))
                except KeyError:
                    continue
                out[col] = set_path(out[col], (*prefix, layer_name(n)), value)
            assert new_layers[n] == old_layers[o]
    return out


def _sequence_inputs(net: Net, exit_name: str | None) -> list[tuple[int, ...]]:
    if exit_name is None:
        return [i for i, _ in net.shapes()]
    e = net.get_exit(exit_name)
    return [i for i, _ in infer_shapes(e.layers, net.shapes()[e.after][1])]
