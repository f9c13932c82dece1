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


def site_layer(net: Net, site: str) -> Layer:
    """The `Layer` at a site."""
    s = parse_site(net, site)
    return site_layers(net, s.exit, site)[s.index]


def _with_layer(net: Net, site: str, layer: Layer) -> Net:
    return replace_layer(net, parse_site(net, site), layer)


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


def technique(name: str) -> Callable[..., tuple[Net, dict]]:
    """The transform registered under `name` (raises listing the valid names)."""
    if name not in TECHNIQUES:
        raise ApproxError(f"unknown technique {name!r}; valid: {', '.join(sorted(TECHNIQUES))}")
    return TECHNIQUES[name]


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
