"""Orbax checkpoints of a model: the net spec is saved next to the weights.

A checkpoint step directory holds two items:

* ``net``: the `Net` as JSON (so a pruned or factorized model round-trips),
* ``state``: the training state pytree (``step``, ``params``,
  ``batch_stats``, ``opt_state``).

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous step intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flexjax.io import write_json_atomic
from flexjax.spec import Net, SpecError


class CheckpointMismatchError(ValueError):
    """A checkpoint that holds a different network than the one requested."""


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    # cleanup_tmp_directories: a save torn by kill -9 leaves a tmp dir; drop it on restart.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, net: Net, state: Any) -> None:
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), net=ocp.args.JsonSave(net.to_dict())
        ),
    )


def latest_step(directory: str) -> int | None:
    if not os.path.isdir(directory):
        return None
    with manager(directory) as mgr:
        return mgr.latest_step()


def restore_net(mgr: ocp.CheckpointManager, step: int | None = None) -> Net:
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    out = mgr.restore(step, args=ocp.args.Composite(net=ocp.args.JsonRestore()))
    try:
        return Net.from_dict(out.net)
    except SpecError as e:
        raise CheckpointMismatchError(
            f"checkpoint {mgr.directory}/{step} holds an invalid net spec: {e}"
        ) from None


def restore_state(mgr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the state pytree shaped like `abstract_state` (arrays or ShapeDtypeStructs)."""
    step = mgr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return out.state


def load(workdir: str, step: int | None = None) -> tuple[Net, dict]:
    """Loads ``(net, variables)`` from a training workdir's checkpoints.

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
    """
    directory = os.path.join(workdir, "checkpoints")
    if latest_step(directory) is None:
        raise FileNotFoundError(
            f"no checkpoint under {directory}; train first with "
            "python -m train.multi_exit --workdir=..."
        )
    with manager(directory) as mgr:
        step = mgr.latest_step() if step is None else step
        net = restore_net(mgr, step)
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = out.state
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    return net, variables


def save_model(
    directory: str,
    net: Net,
    variables: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    json_files: Mapping[str, Any] | None = None,
) -> None:
    """Saves ``(net, variables)`` as a workdir that `load` reads, atomically.

    The workdir (``checkpoints/`` at step 0, ``net.json``, ``config.json`` if
    `config` is given, and one JSON file per `json_files` entry) is what any
    job starts from (``train.init_from``, ``flexdnn.backbone_workdir``). It is
    assembled in a temporary sibling directory and renamed into place, so a
    killed process leaves either the old model or the new one. An existing
    `directory` is replaced.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    try:
        tree = {"step": np.int32(0), "params": variables["params"]}
        if variables.get("batch_stats"):
            tree["batch_stats"] = variables["batch_stats"]
        with manager(os.path.join(tmp, "checkpoints")) as mgr:
            save(mgr, 0, net, tree)
            mgr.wait_until_finished()
        write_json_atomic(os.path.join(tmp, "net.json"), net.to_dict())
        if config is not None:
            write_json_atomic(os.path.join(tmp, "config.json"), dict(config))
        for filename, obj in (json_files or {}).items():
            write_json_atomic(os.path.join(tmp, filename), obj)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_saved(directory: str, net: Net | None = None) -> tuple[Net, dict] | None:
    """``(net, variables)`` saved in `directory` (by `save_model` or training), else None.

    With `net` given, a saved model of another network also gives None.
    """
    if latest_step(os.path.join(directory, "checkpoints")) is None:
        return None
    saved = load(directory)
    if net is not None and saved[0] != net:
        return None
    return saved
