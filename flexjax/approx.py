"""MCDNN approximations as pure transforms ``(net, variables, ...) -> (net, variables)``.

The catalog (`train/catalog.py`) builds its variants from these:

* **low-rank factorization** (`factorize_dense`, `factorize_conv`,
  `factorize`): a dense kernel ``W [in, out]`` becomes ``U [in, r] @ V [r, out]``
  by truncated SVD (the ``low_rank_dense`` kind); a conv kernel
  ``K [kh, kw, C, N]`` is read as a ``[kh*kw*C, N]`` matrix and split into a
  ``kh x kw`` conv ``C -> r`` followed by a 1x1 conv ``r -> N`` (the
  ``low_rank_conv`` kind). The singular values are split evenly
  (``sqrt(s)`` on both sides) so fine-tuning sees balanced factors. The rank is
  given per layer or chosen as the smallest one keeping a fraction of the
  spectral energy ``sum(s_i^2)``.
* **unstructured magnitude pruning** (`magnitude_prune`): the smallest-|w|
  kernel entries are zeroed, either with one global threshold or per layer.
  The net is unchanged; export with ``sparsity=True`` stores the zeros
  compressed.
* **architecture changes** (`width_multiplier`, `shrink_dense`, `drop_layers`),
  built on `flexjax.transforms.prune_filters` / `drop_layer`, which really
  shrink shapes.
* `compose` chains transforms; `apply_recipe` applies a list of named steps
  from a config (``{"technique": "low_rank", "energy": 0.9}``).

Sites are named by parameter path (the contract of `flexjax.models.build`):
``"layer_07"`` is backbone position 7, ``"exit_3/layer_01"`` layer 1 of
exit_3's head. Every transform uses `jax.numpy` only, so it runs under
`jax.eval_shape` -- except choosing a rank by energy fraction, which needs the
singular values and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexjax import transforms
from flexjax.models.build import layer_name
from flexjax.spec import Layer, Net
from flexjax.transforms import (
    TransformError,
    get_path,
    parse_site,
    replace_layer,
    set_path,
    site_layers,
)

Transform = Callable[[Net, dict], tuple[Net, dict]]


class ApproxError(TransformError):
    """A bad approximation request (unknown site, rank too large, sparsity out of range)."""


# ---------------------------------------------------------------------------
# Sites (parsing and tree paths are `flexjax.transforms`').
# ---------------------------------------------------------------------------


def _block_site(net: Net, site: str) -> tuple[int, int, int] | None:
    """``(position, branch, index)`` for a site inside a composite block, else None.

    A block-internal site is ``"layer_NN/branch_B/layer_MM"``: layer MM of
    branch B of the composite block (mbconv, residual, inception) at backbone
    position NN -- exactly its parameter path.

    Raises:
      ApproxError: the site has that shape but names no layer of `net`.
    """
    parts = site.split("/")
    if len(parts) != 3 or not parts[1].startswith("branch_"):
        return None
    nums = []
    for part, prefix in zip(parts, ("layer_", "branch_", "layer_")):
        if not part.startswith(prefix) or not part[len(prefix) :].isdigit():
            raise ApproxError(f"site {site!r}: expected 'layer_NN/branch_B/layer_MM'")
        nums.append(int(part[len(prefix) :]))
    pos, branch, index = nums
    if pos >= len(net.layers):
        raise ApproxError(
            f"site {site!r}: no layer {parts[0]}; the backbone has {len(net.layers)} positions"
        )
    block = net.layers[pos]
    if branch >= len(block.branches):
        raise ApproxError(
            f"site {site!r}: {parts[0]} is a '{block.kind}' layer with "
            f"{len(block.branches)} branches, not a block with {parts[1]}"
        )
    if index >= len(block.branches[branch]):
        raise ApproxError(
            f"site {site!r}: {parts[0]}/{parts[1]} has only {len(block.branches[branch])} layers"
        )
    return pos, branch, index


def site_layer(net: Net, site: str) -> Layer:
    """The `Layer` at a site (backbone, exit head, or inside a block: `_block_site`)."""
    nested = _block_site(net, site)
    if nested is not None:
        pos, branch, index = nested
        return net.layers[pos].branches[branch][index]
    s = parse_site(net, site)
    return site_layers(net, s.exit, site)[s.index]


def _with_layer(net: Net, site: str, layer: Layer) -> Net:
    nested = _block_site(net, site)
    if nested is None:
        return replace_layer(net, parse_site(net, site), layer)
    pos, branch, index = nested
    block = net.layers[pos]
    body = list(block.branches[branch])
    body[index] = layer
    branches = list(block.branches)
    branches[branch] = tuple(body)
    layers = list(net.layers)
    layers[pos] = dataclasses.replace(block, branches=tuple(branches))
    return net.replace(layers=tuple(layers))


def _path(site: str) -> tuple[str, ...]:
    return tuple(site.split("/"))


def sites_of_kind(net: Net, kinds: Sequence[str]) -> list[str]:
    """Sites (backbone then exit heads) whose layer kind is one of `kinds`."""
    out = [layer_name(i) for i, lay in enumerate(net.layers) if lay.kind in kinds]
    for e in net.exits:
        out += [f"{e.name}/{layer_name(j)}" for j, lay in enumerate(e.layers) if lay.kind in kinds]
    return out


def logits_sites(net: Net) -> set[str]:
    """The sites producing an exit's logits (the last layer of the backbone and of each head)."""
    out = {layer_name(len(net.layers) - 1)}
    out |= {f"{e.name}/{layer_name(len(e.layers) - 1)}" for e in net.exits}
    return out


# ---------------------------------------------------------------------------
# Low-rank factorization.
# ---------------------------------------------------------------------------


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer) and not isinstance(x, jax.ShapeDtypeStruct)


def rank_for_energy(singular_values: np.ndarray, energy: float) -> int:
    """The smallest rank whose singular values keep `energy` of ``sum(s**2)``.

    Raises:
      ApproxError: `energy` not in (0, 1].
    """
    if not 0.0 < energy <= 1.0:
        raise ApproxError(f"energy fraction must be in (0, 1], got {energy}")
    s2 = np.asarray(singular_values, np.float64) ** 2
    if s2.sum() == 0:
        return 1
    kept = np.cumsum(s2) / s2.sum()
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, len(s2)))


def _truncated_svd(
    w: jax.Array, rank: int | None, energy: float | None, site: str
) -> tuple[jax.Array, jax.Array, int]:
    """``(u [m, r], v [r, n], r)`` with ``u @ v`` the best rank-r approximation of `w`."""
    m, n = w.shape
    full = min(m, n)
    if (rank is None) == (energy is None):
        raise ApproxError(f"{site}: give exactly one of rank or energy")
    if rank is not None and not (isinstance(rank, int) and 1 <= rank <= full):
        raise ApproxError(
            f"{site}: rank {rank!r} is larger than the layer allows; "
            f"a {m}x{n} kernel has rank at most {full}"
        )
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    if energy is not None:
        if not _is_concrete(s):
            raise ApproxError(
                f"{site}: choosing a rank by energy fraction needs concrete weights; "
                "pass an explicit rank under jax.eval_shape / jit"
            )
        rank = rank_for_energy(np.asarray(s), energy)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank], int(rank)


def factorize_dense(
    net: Net, variables: dict, site: str, *, rank: int | None = None, energy: float | None = None
) -> tuple[Net, dict]:
    """Replaces the dense layer at `site` by ``U [in, r] @ V [r, out]`` (truncated SVD).

    Raises:
      ApproxError: the site is not a dense layer, the rank is not in
        ``[1, min(in, out)]`` or the energy fraction not in (0, 1].
    """
    layer = site_layer(net, site)
    if layer.kind != "dense":
        raise ApproxError(f"{site} is a '{layer.kind}' layer; factorize_dense needs 'dense'")
    p = get_path(variables["params"], _path(site))
    u, v, r = _truncated_svd(p["kernel"], rank, energy, site)
    new = {"u": {"kernel": u}, "v": {"kernel": v}}
    if layer["use_bias"]:
        new["v"]["bias"] = p["bias"]
    lr = Layer.make(
        "low_rank_dense", features=layer["features"], rank=r, use_bias=layer["use_bias"]
    )
    variables = {**variables, "params": set_path(variables["params"], _path(site), new)}
    return _with_layer(net, site, lr), variables


def factorize_conv(
    net: Net, variables: dict, site: str, *, rank: int | None = None, energy: float | None = None
) -> tuple[Net, dict]:
    """Replaces the conv at `site` (k x k, C -> N) by k x k C -> r then 1x1 r -> N.

    The kernel ``[kh, kw, C, N]`` is factorized as a ``[kh*kw*C, N]`` matrix,
    so the first conv keeps the original window, stride and padding.

    Raises:
      ApproxError: not a conv (or a grouped conv), rank not in
        ``[1, min(kh*kw*C, N)]``, energy not in (0, 1].
    """
    layer = site_layer(net, site)
    if layer.kind != "conv" or layer["groups"] != 1:
        raise ApproxError(
            f"{site} is a '{layer.kind}' layer"
            + (f" with groups={layer['groups']}" if layer.kind == "conv" else "")
            + "; factorize_conv needs an ungrouped 'conv'"
        )
    p = get_path(variables["params"], _path(site))
    kh, kw, c, n = p["kernel"].shape
    u, v, r = _truncated_svd(p["kernel"].reshape(kh * kw * c, n), rank, energy, site)
    new = {"u": {"kernel": u.reshape(kh, kw, c, r)}, "v": {"kernel": v.reshape(1, 1, r, n)}}
    if layer["use_bias"]:
        new["v"]["bias"] = p["bias"]
    lr = Layer.make(
        "low_rank_conv",
        features=layer["features"],
        rank=r,
        kernel=layer["kernel"],
        stride=layer["stride"],
        padding=layer["padding"],
        use_bias=layer["use_bias"],
    )
    variables = {**variables, "params": set_path(variables["params"], _path(site), new)}
    return _with_layer(net, site, lr), variables


def factorize(
    net: Net,
    variables: dict,
    *,
    ranks: Mapping[str, int] | None = None,
    energy: float | None = None,
    fraction: float | None = None,
    sites: Sequence[str] | None = None,
) -> tuple[Net, dict]:
    """Factorizes several dense/conv layers.

    Args:
      ranks: site -> rank (per-layer choice).
      energy: keep this fraction of spectral energy in every chosen layer.
      fraction: rank = ``max(1, round(fraction * full_rank))`` (MCDNN's n/2 ... n/8).
      sites: the layers for `energy` / `fraction` (default: every conv and
        dense that is not a logits layer).
    """
    given = [x is not None for x in (ranks, energy, fraction)]
    if sum(given) != 1:
        raise ApproxError("give exactly one of ranks, energy or fraction")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ApproxError(f"rank fraction must be in (0, 1], got {fraction}")
    if ranks is not None:
        plan = {s: {"rank": r} for s, r in ranks.items()}
    else:
        chosen = sites
        if chosen is None:
            last = logits_sites(net)
            chosen = [s for s in sites_of_kind(net, ("conv", "dense")) if s not in last]
        plan = {}
        for s in chosen:
            if energy is not None:
                plan[s] = {"energy": energy}
            else:
                plan[s] = {"rank": max(1, round(fraction * _full_rank(net, variables, s)))}
    for s, kw in plan.items():
        kind = site_layer(net, s).kind
        fn = factorize_dense if kind == "dense" else factorize_conv
        net, variables = fn(net, variables, s, **kw)
    return net, variables


def _full_rank(net: Net, variables: dict, site: str) -> int:
    k = get_path(variables["params"], _path(site))["kernel"]
    return min(math.prod(k.shape[:-1]), k.shape[-1])


# ---------------------------------------------------------------------------
# Magnitude pruning.
# ---------------------------------------------------------------------------


def _kernel_paths(variables: dict, chosen: Sequence[str] | None) -> list[tuple[str, ...]]:
    """Paths (under params) of every kernel leaf, optionally only inside `chosen` sites."""
    paths = []

    def visit(tree: Mapping, prefix: tuple[str, ...]) -> None:
        for k, v in tree.items():
            if isinstance(v, Mapping):
                visit(v, (*prefix, k))
            elif k == "kernel":
                paths.append((*prefix, k))

    visit(variables["params"], ())
    if chosen is not None:
        want = [_path(s) for s in chosen]
        paths = [p for p in paths if any(p[: len(w)] == w for w in want)]
    return paths


def _keep_mask(mags: jax.Array, sparsity: float) -> jax.Array:
    """True for the entries that survive: all but the ``floor(sparsity * n)`` smallest."""
    flat = mags.reshape(-1)
    k = int(math.floor(sparsity * flat.size))
    order = jnp.argsort(flat, stable=True)
    ranks = jnp.zeros(flat.size, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks >= k).reshape(mags.shape)


def magnitude_prune(
    net: Net,
    variables: dict,
    sparsity: float | Mapping[str, float],
    *,
    scope: str = "global",
    sites: Sequence[str] | None = None,
) -> tuple[Net, dict]:
    """Zeroes the smallest-magnitude kernel entries (biases and BatchNorm are kept).

    Args:
      sparsity: fraction of entries to zero, in [0, 1); or (``scope="layer"``)
        a mapping site -> fraction.
      scope: ``"global"`` (one threshold over every chosen kernel, so layers
        with many small weights lose more) or ``"layer"`` (each kernel loses
        the same fraction).
      sites: restrict to these sites (default: every kernel).

    Returns:
      The same net and variables with exactly ``floor(sparsity * n)`` zeros
      added in each pruned group (ties broken by position).
    """
    if scope not in ("global", "layer"):
        raise ApproxError(f"unknown pruning scope {scope!r}; valid: global, layer")
    per_site = isinstance(sparsity, Mapping)
    if per_site and scope != "layer":
        raise ApproxError("a per-site sparsity mapping needs scope='layer'")
    values = dict(sparsity) if per_site else {"*": sparsity}
    for key, s in values.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ApproxError(f"sparsity must be a fraction in [0, 1), got {s!r} for {key}")
    if per_site:
        for s in values:
            site_layer(net, s)
        sites = list(values)
    paths = _kernel_paths(variables, sites)
    if not paths:
        raise ApproxError(f"no kernels to prune at sites {sites}")
    params = variables["params"]
    if scope == "global":
        leaves = [get_path(params, p) for p in paths]
        mags = jnp.concatenate([jnp.abs(x).reshape(-1) for x in leaves])
        keep = _keep_mask(mags, float(sparsity))
        offset = 0
        for p, x in zip(paths, leaves):
            m = keep[offset : offset + x.size].reshape(x.shape)
            offset += x.size
            params = set_path(params, p, jnp.where(m, x, 0.0).astype(x.dtype))
    else:
        for p in paths:
            s = _sparsity_for(values, p) if per_site else float(values["*"])
            x = get_path(params, p)
            params = set_path(
                params, p, jnp.where(_keep_mask(jnp.abs(x), s), x, 0.0).astype(x.dtype)
            )
    return net, {**variables, "params": params}


def _sparsity_for(values: Mapping[str, float], path: tuple[str, ...]) -> float:
    for s, v in values.items():
        w = _path(s)
        if path[: len(w)] == w:
            return float(v)
    raise ApproxError(f"no sparsity for kernel {'/'.join(path)}")  # pragma: no cover


def zero_fraction(variables: dict) -> float:
    """Fraction of kernel entries that are exactly zero."""
    leaves = [np.asarray(get_path(variables["params"], p)) for p in _kernel_paths(variables, None)]
    n = sum(x.size for x in leaves)
    return float(sum((x == 0).sum() for x in leaves) / max(n, 1))


# ---------------------------------------------------------------------------
# Architecture changes (structured, on flexjax.transforms).
# ---------------------------------------------------------------------------


def width_multiplier(
    net: Net, variables: dict, multiplier: float, *, sites: Sequence[str] | None = None
) -> tuple[Net, dict]:
    """Keeps ``round(multiplier * features)`` filters (largest L1) of every prunable layer.

    `sites` defaults to `flexjax.transforms.prunable_sites` (every conv/dense
    whose consumers can be traced, logits layers excluded); the consumers'
    input axes shrink with them, so the exported model is really smaller.
    """
    if not 0.0 < multiplier <= 1.0:
        raise ApproxError(f"width multiplier must be in (0, 1], got {multiplier}")
    for site in transforms.prunable_sites(net) if sites is None else sites:
        features = site_layer(net, site)["features"]
        keep = max(1, round(multiplier * features))
        if keep < features:
            net, variables = transforms.prune_filters(net, variables, site, keep)
    return net, variables


def shrink_dense(net: Net, variables: dict, features: Mapping[str, int]) -> tuple[Net, dict]:
    """Smaller dense layers: site -> new width (the largest-L1 units are kept)."""
    for site, n in features.items():
        layer = site_layer(net, site)
        if layer.kind != "dense":
            raise ApproxError(f"{site} is a '{layer.kind}' layer; shrink_dense needs 'dense'")
        if not isinstance(n, int) or not 1 <= n <= layer["features"]:
            raise ApproxError(f"{site}: new width must be in [1, {layer['features']}], got {n!r}")
        net, variables = transforms.prune_filters(net, variables, site, n)
    return net, variables


def drop_layers(
    net: Net, variables: dict, sites: Sequence[str], rng: jax.Array
) -> tuple[Net, dict]:
    """Removes several layers (`flexjax.transforms.drop_layer`), deepest first.

    Dropping deepest-first keeps the shallower sites' names valid (a backbone
    drop shifts the positions after it).
    """
    parsed = sorted(((parse_site(net, s), s) for s in sites), key=lambda p: -p[0].index)
    for i, (_, site) in enumerate(parsed):
        net, variables = transforms.drop_layer(net, variables, site, jax.random.fold_in(rng, i))
    return net, variables


# ---------------------------------------------------------------------------
# MBConv networks (EfficientNet-Lite): the 1x1 convolutions and the expansion.
# ---------------------------------------------------------------------------

LITE_PARTS = ("expand", "project", "head", "classifier")


def _is_1x1(layer: Layer) -> bool:
    return layer.kind == "conv" and layer["groups"] == 1 and tuple(layer["kernel"]) == (1, 1)


def expand_layout(block: Layer) -> bool:
    """An MBConv body ``conv 1x1, BN, relu6, depthwise conv, BN, relu6, conv 1x1, BN``."""
    if block.kind != "mbconv" or len(block.branches) != 1:
        return False
    body = block.branches[0]
    kinds = [x.kind for x in body]
    if kinds != ["conv", "batch_norm", "relu6", "conv", "batch_norm", "relu6", "conv",
                 "batch_norm"]:  # fmt: skip
        return False
    dw = body[3]
    return _is_1x1(body[0]) and dw["groups"] == dw["features"] == body[0]["features"]


def lite_sites(net: Net, parts: Sequence[str] = LITE_PARTS) -> list[str]:
    """The sites of an MBConv net's 1x1 convolutions and classifier, by part.

    ``expand``: each block's first 1x1 conv (its output is the expanded
    channels); ``project``: each block's last 1x1 conv; ``head``: 1x1 convs of
    the backbone outside blocks (Lite's 1280-wide head conv); ``classifier``:
    the backbone's last dense layer.

    Raises:
      ApproxError: an unknown part.
    """
    bad = [p for p in parts if p not in LITE_PARTS]
    if bad:
        raise ApproxError(f"unknown parts {bad}; valid: {', '.join(LITE_PARTS)}")
    out = []
    for i, lay in enumerate(net.layers):
        if lay.kind == "mbconv":
            body = lay.branches[0]
            convs = [j for j, x in enumerate(body) if _is_1x1(x)]
            for j in convs:
                part = "project" if j == convs[-1] else "expand"
                if part in parts:
                    out.append(f"{layer_name(i)}/branch_0/{layer_name(j)}")
        elif "head" in parts and _is_1x1(lay):
            out.append(layer_name(i))
    dense = [i for i, lay in enumerate(net.layers) if lay.kind == "dense"]
    if "classifier" in parts and dense:
        out.append(layer_name(dense[-1]))
    return out


def low_rank_1x1(
    net: Net,
    variables: dict,
    *,
    energy: float | None = None,
    fraction: float | None = None,
    ranks: Mapping[str, int] | None = None,
    parts: Sequence[str] = LITE_PARTS,
    only_if_smaller: bool = True,
    rank_multiple: int = 1,
) -> tuple[Net, dict]:
    """Low-rank factorization of an MBConv net's 1x1 convolutions and classifier.

    Each chosen layer ``W [m, n]`` becomes ``U [m, r] V [r, n]`` (`factorize_conv`
    / `factorize_dense`: two 1x1 convs, or two dense layers). The rank is chosen
    per layer: the smallest keeping `energy` of ``sum(s_i^2)``
    (`rank_for_energy`), or ``round(fraction * min(m, n))``, or given per site
    in `ranks` (any site, checked against the layer's full rank).

    With `only_if_smaller` (energy / fraction only), a layer whose factors
    would not have fewer parameters than ``W`` (``r (m + n) >= m n``) is left
    as it is -- the rule that decides where factorization pays. `rank_multiple`
    rounds a chosen rank up (capped at full rank) so a factor's input dimension
    fits blockwise weight quantization (blocks of 32 need a multiple of 32).

    Raises:
      ApproxError: not exactly one of energy / fraction / ranks, an energy or
        fraction outside (0, 1], an unknown part, a site that names no layer,
        a rank above the layer's full rank.
    """
    if sum(x is not None for x in (energy, fraction, ranks)) != 1:
        raise ApproxError("low_rank_1x1: give exactly one of energy, fraction or ranks")
    if ranks is not None:
        for site, r in ranks.items():
            net, variables = _factorize_1x1(net, variables, site, r)
        return net, variables
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ApproxError(f"rank fraction must be in (0, 1], got {fraction}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ApproxError(f"energy fraction must be in (0, 1], got {energy}")
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise ApproxError(f"rank_multiple must be an int >= 1, got {rank_multiple!r}")
    for site in lite_sites(net, parts):
        kernel = get_path(variables["params"], _path(site))["kernel"]
        m, n = math.prod(kernel.shape[:-1]), kernel.shape[-1]
        if energy is not None:
            s = np.linalg.svd(np.asarray(kernel, np.float64).reshape(m, n), compute_uv=False)
            r = rank_for_energy(s, energy)
        else:
            r = max(1, round(fraction * min(m, n)))
        r = min(-(-r // rank_multiple) * rank_multiple, min(m, n))
        if only_if_smaller and r * (m + n) >= m * n:
            continue
        net, variables = _factorize_1x1(net, variables, site, r)
    return net, variables


def _factorize_1x1(net: Net, variables: dict, site: str, rank: Any) -> tuple[Net, dict]:
    """`factorize_dense` / `factorize_conv` of a dense or 1x1 conv, SVD in numpy.

    Concrete weights only (the catalog's case): numpy's SVD avoids compiling
    one XLA program per kernel shape, which `jnp.linalg.svd` does.
    """
    layer = site_layer(net, site)
    if layer.kind not in ("dense", "conv") or (layer.kind == "conv" and not _is_1x1(layer)):
        raise ApproxError(
            f"{site} is a '{layer.kind}' layer"
            + (
                f" ({tuple(layer['kernel'])} kernel, groups={layer['groups']})"
                if layer.kind == "conv"
                else ""
            )  # fmt: skip
            + "; low_rank_1x1 factorizes dense layers and ungrouped 1x1 convs"
        )
    p = get_path(variables["params"], _path(site))
    k = np.asarray(p["kernel"])
    m, n = math.prod(k.shape[:-1]), k.shape[-1]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ApproxError(
            f"{site}: rank {rank!r} is larger than the layer allows; "
            f"a {m}x{n} kernel has rank at most {min(m, n)}"
        )
    u, s, vt = np.linalg.svd(k.reshape(m, n).astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    u = (u[:, :rank] * root[None, :]).astype(k.dtype)
    v = (root[:, None] * vt[:rank]).astype(k.dtype)
    if layer.kind == "conv":
        u, v = u.reshape(1, 1, m, rank), v.reshape(1, 1, rank, n)
        lr = Layer.make("low_rank_conv", features=layer["features"], rank=rank, kernel=(1, 1),
                        stride=layer["stride"], padding=layer["padding"],
                        use_bias=layer["use_bias"])  # fmt: skip
    else:
        lr = Layer.make(
            "low_rank_dense", features=layer["features"], rank=rank, use_bias=layer["use_bias"]
        )
    new = {"u": {"kernel": jnp.asarray(u)}, "v": {"kernel": jnp.asarray(v)}}
    if layer["use_bias"]:
        new["v"]["bias"] = p["bias"]
    variables = {**variables, "params": set_path(variables["params"], _path(site), new)}
    return _with_layer(net, site, lr), variables


def lite_ranks(net: Net) -> dict[str, int]:
    """site -> rank of every factorized layer (backbone and inside blocks)."""
    out = {}
    for i, lay in enumerate(net.layers):
        if lay.kind.startswith("low_rank_"):
            out[layer_name(i)] = int(lay["rank"])
        for b, branch in enumerate(lay.branches):
            for j, sub in enumerate(branch):
                if sub.kind.startswith("low_rank_"):
                    out[f"{layer_name(i)}/branch_{b}/{layer_name(j)}"] = int(sub["rank"])
    return out


_HERMITE = np.polynomial.hermite_e.hermegauss(48)


def mean_relu6(beta: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """``E[relu6(z)]`` for ``z ~ N(beta, gamma^2)`` (Gauss-Hermite quadrature)."""
    nodes, weights = _HERMITE
    z = beta[:, None] + np.abs(gamma)[:, None] * nodes[None, :]
    return (np.clip(z, 0.0, 6.0) * weights[None, :]).sum(1) / weights.sum()


def expansion_scores(net: Net, variables: dict, position: int) -> np.ndarray:
    """How much each expanded channel of the MBConv block at `position` feeds its output.

    ``E[relu6(BN_dw(x))_c] * ||P[c, :]||_2``: the mean activation of channel c
    after the depthwise conv's BatchNorm and ReLU6 (BN output taken as
    ``N(beta, gamma^2)``), times the L2 norm of the projection 1x1's input
    row for c. Data-free; a channel whose activation is always ~0 or whose
    projection weights are ~0 scores ~0.
    """
    name = layer_name(position)
    body = get_path(variables["params"], (name, "branch_0"))
    bn = body[layer_name(4)]
    proj = np.asarray(body[layer_name(6)]["kernel"], np.float64)[0, 0]  # [mid, out]
    act = mean_relu6(np.asarray(bn["bias"], np.float64), np.asarray(bn["scale"], np.float64))
    return act * np.linalg.norm(proj, axis=1)


def prune_expansion(
    net: Net,
    variables: dict,
    keep: float,
    *,
    multiple: int = 8,
    sites: Sequence[str] | None = None,
) -> tuple[Net, dict]:
    """Structured pruning of MBConv expansion channels: shapes really shrink.

    In every chosen block (default: every MBConv with an expansion 1x1 conv)
    the ``ceil(keep * mid / multiple) * multiple`` best expanded channels by
    `expansion_scores` are kept: the expansion conv's output channels, its
    BatchNorm, the depthwise conv (features = groups) and its BatchNorm, and
    the projection conv's input channels shrink together. The mean
    contribution of the dropped channels (``E[a_c] P[c, :]``) is folded into
    the projection BatchNorm's running mean, so their constant part is kept.

    Raises:
      ApproxError: `keep` not in (0, 1], `multiple` < 1, a site that is not an
        MBConv block with an expansion conv (e.g. an already factorized one).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ApproxError(f"expansion keep fraction must be in (0, 1], got {keep!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ApproxError(f"channel multiple must be an int >= 1, got {multiple!r}")
    if sites is None:
        positions = [i for i, lay in enumerate(net.layers) if expand_layout(lay)]
    else:
        positions = []
        for site in sites:
            s = parse_site(net, site)
            if s.exit is not None or not expand_layout(net.layers[s.index]):
                raise ApproxError(
                    f"site {site!r} is not an MBConv block with an expansion 1x1 conv "
                    "(prune the expansion before factorizing it)"
                )
            positions.append(s.index)
    params, stats = variables["params"], variables.get("batch_stats", {})
    layers = list(net.layers)
    for pos in positions:
        block = layers[pos]
        body = list(block.branches[0])
        mid = body[0]["features"]
        n = min(mid, max(multiple, math.ceil(keep * mid / multiple) * multiple))
        if n >= mid:
            continue
        scores = expansion_scores(net, {"params": params}, pos)
        kept = np.sort(np.argsort(-scores, kind="stable")[:n])
        dropped = np.setdiff1d(np.arange(mid), kept)
        idx = jnp.asarray(kept)
        name = layer_name(pos)
        pre = (name, "branch_0")
        for j in (0, 3):  # expansion conv and depthwise conv: output channels
            path = (*pre, layer_name(j), "kernel")
            params = set_path(params, path, jnp.take(get_path(params, path), idx, axis=-1))
        for j in (1, 4):  # their BatchNorms
            for tree_name in ("params", "batch_stats"):
                tree = params if tree_name == "params" else stats
                for leaf, x in get_path(tree, (*pre, layer_name(j))).items():
                    tree = set_path(tree, (*pre, layer_name(j), leaf), jnp.take(x, idx, axis=-1))
                if tree_name == "params":
                    params = tree
                else:
                    stats = tree
        bn4 = get_path(variables["params"], (*pre, layer_name(4)))
        proj_path = (*pre, layer_name(6), "kernel")
        proj = get_path(params, proj_path)
        act = mean_relu6(np.asarray(bn4["bias"], np.float64), np.asarray(bn4["scale"], np.float64))
        lost = act[dropped] @ np.asarray(proj, np.float64)[0, 0][dropped]  # [out]
        params = set_path(params, proj_path, jnp.take(proj, idx, axis=2))
        mean_path = (*pre, layer_name(7), "mean")
        mean = get_path(stats, mean_path)
        stats = set_path(stats, mean_path, (mean - lost).astype(mean.dtype))
        body[0] = body[0].replace(features=n)
        body[3] = body[3].replace(features=n, groups=n)
        layers[pos] = dataclasses.replace(block, branches=(tuple(body),))
        net = net.replace(layers=tuple(layers))
    out = {**variables, "params": params}
    if "batch_stats" in variables:
        out["batch_stats"] = stats
    return net, out


def magnitude_prune_parts(
    net: Net, variables: dict, sparsity: float, *, parts: Sequence[str] = LITE_PARTS
) -> tuple[Net, dict]:
    """`magnitude_prune` (per layer, each kernel loses `sparsity`) of the `lite_sites` parts."""
    sites = lite_sites(net, parts)
    if not sites:
        raise ApproxError(f"no layers of parts {list(parts)} in {net.name or 'the net'}")
    return magnitude_prune(net, variables, {s: sparsity for s in sites}, scope="layer")


# ---------------------------------------------------------------------------
# Composition and named recipes.
# ---------------------------------------------------------------------------


def compose(*steps: Transform) -> Transform:
    """``compose(f, g)(net, variables) == g(*f(net, variables))``."""

    def run(net: Net, variables: dict) -> tuple[Net, dict]:
        for step in steps:
            net, variables = step(net, variables)
        return net, variables

    return run


def _low_rank_step(net: Net, variables: dict, **kw: Any) -> tuple[Net, dict]:
    return factorize(net, variables, **kw)


def _prune_step(net: Net, variables: dict, **kw: Any) -> tuple[Net, dict]:
    return magnitude_prune(net, variables, **kw)


TECHNIQUES: dict[str, Callable[..., tuple[Net, dict]]] = {
    "low_rank": _low_rank_step,
    "magnitude_prune": _prune_step,
    "width_multiplier": width_multiplier,
    "shrink_dense": shrink_dense,
    "drop_layers": drop_layers,
}
# MBConv-only steps (EfficientNet-Lite; concrete weights: numpy SVD and channel scores),
# kept apart from the generic, jax-traceable TECHNIQUES; `technique` finds both.
LITE_TECHNIQUES: dict[str, Callable[..., tuple[Net, dict]]] = {
    "low_rank_1x1": low_rank_1x1,
    "prune_expansion": prune_expansion,
    "magnitude_prune_parts": magnitude_prune_parts,
}


def technique(name: str) -> Callable[..., tuple[Net, dict]]:
    """The transform registered under `name` (raises listing the valid names)."""
    table = {**TECHNIQUES, **LITE_TECHNIQUES}
    if name not in table:
        raise ApproxError(f"unknown technique {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def apply_recipe(
    net: Net, variables: dict, recipe: Sequence[Mapping[str, Any]], *, seed: int = 0
) -> tuple[Net, dict]:
    """Applies named steps in order: ``[{"technique": "low_rank", "fraction": 0.25}, ...]``.

    Steps that need randomness (re-initialising a layer after a drop) get
    `seed` as ``rng``.
    """
    steps = []
    for i, step in enumerate(recipe):
        if not isinstance(step, Mapping) or "technique" not in step:
            raise ApproxError(f"recipe step {i} must be a mapping with a 'technique', got {step!r}")
        kw = {k: plain(v) for k, v in step.items() if k != "technique"}
        fn = technique(step["technique"])
        if step["technique"] in _NEEDS_RNG:
            kw["rng"] = jax.random.PRNGKey(seed + i)
        steps.append(functools.partial(fn, **kw))
    return compose(*steps)(net, variables)


_NEEDS_RNG = {"drop_layers"}


def plain(v: Any) -> Any:
    """Config values (ConfigDicts, tuples) as plain dicts and lists, e.g. recipe arguments."""
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if isinstance(v, Mapping):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v
