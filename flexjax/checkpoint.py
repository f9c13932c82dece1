"""Orbax checkpoints of a model: the net spec is saved next to the weights.

A checkpoint step directory holds two items:

* ``net``: the `Net` as JSON (so a pruned or factorized model round-trips),
* ``state``: the training state pytree (``step``, ``params``,
  ``batch_stats``, ``opt_state``).

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous step intact (the writer's
`manager` removes such ``N.orbax-checkpoint-tmp-*`` directories). A step
can still be damaged: a process killed while orbax deletes an old step
(``max_to_keep``) leaves part of it, and disks lose files. So a step counts
only if it restores: readers (`latest_step`, `load`, `restore_net`) skip a
damaged step for the newest one that restores, and the trainer removes the
damaged ones (`repair`) before it resumes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from flexjax.io import replace_dir, write_json_atomic
from flexjax.spec import Net, SpecError

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # a save in progress, or torn by kill -9


class CheckpointMismatchError(ValueError):
    """A checkpoint that holds a different network than the one requested."""


def manager(directory: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """The writer's manager of `directory` (created if missing).

    Only the process that saves into `directory` should open it this way: it
    removes the tmp directories that a killed save left (another process's
    save in progress looks the same).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _reader(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads `directory` (safe beside a training run)."""
    options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mgr: ocp.CheckpointManager, step: int, net: Net, state: Any) -> None:
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), net=ocp.args.JsonSave(net.to_dict())
        ),
    )


def _is_abandoned_read(u: Any) -> bool:
    return u.exc_type is RuntimeError and str(u.exc_value) == "Event loop is closed"


def _quiet_abandoned_reads() -> None:
    """Drops the late callbacks of a restore that failed part-way (installed once).

    When one read of a torn step fails, orbax's restore returns at once and closes its
    event loop; tensorstore's other reads of that step finish later and report
    ``RuntimeError: Event loop is closed`` through `sys.unraisablehook`, a traceback on
    stderr for an error that was already handled. Only exactly that case is dropped;
    every other unraisable exception reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_flexjax_quiet", False):
        return

    def hook(u: Any) -> None:
        if not _is_abandoned_read(u):
            previous(u)

    hook._flexjax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _damage(mgr: ocp.CheckpointManager, step: int) -> str | None:
    """Why `step` does not restore as saved (net and state), or None when it does."""
    _quiet_abandoned_reads()
    try:
        out = mgr.restore(
            step,
            args=ocp.args.Composite(net=ocp.args.JsonRestore(), state=ocp.args.StandardRestore()),
        )
        Net.from_dict(out.net)
    except Exception as e:  # orbax/tensorstore raise many types for missing or torn files
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def _newest_good(mgr: ocp.CheckpointManager) -> tuple[int | None, dict[int, str]]:
    """The newest step that restores, and the damaged steps newer than it (with why)."""
    damaged = {}
    for step in sorted(mgr.all_steps(), reverse=True):
        why = _damage(mgr, step)
        if why is None:
            return step, damaged
        damaged[step] = why
    return None, damaged


def latest_step(directory: str) -> int | None:
    """The newest step in `directory` that restores; None if there is none.

    A damaged newer step (torn by kill -9, partly deleted) is skipped with a
    warning and left in place (`repair` removes it).
    """
    if not os.path.isdir(directory):
        return None
    with _reader(directory) as mgr:
        step, damaged = _newest_good(mgr)
    for bad, why in damaged.items():
        logging.warning("skipping damaged checkpoint %s/%d (%s)", directory, bad, why)
    return step


def saved_net(directory: str) -> Net | None:
    """The net of the newest step in `directory` that restores; None if there is none."""
    step = latest_step(directory)
    if step is None:
        return None
    with _reader(directory) as mgr:
        return restore_net(mgr, step)


def repair(directory: str) -> tuple[int | None, dict[int, str]]:
    """Removes the damaged steps newer than the newest step that restores.

    For the process that is about to save into `directory` (a trainer
    resuming); it also removes the orbax tmp directories of killed saves
    (``N.orbax-checkpoint-tmp*``, as `manager` does, but before returning).

    Returns:
      ``(step, removed)``: the newest step that restores (None if none) and
      the removed steps with why each did not restore.
    """
    if not os.path.isdir(directory):
        return None, {}
    for name in os.listdir(directory):
        if _TMP_SUFFIX in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    with _reader(directory) as mgr:
        step, damaged = _newest_good(mgr)
    for bad in damaged:  # a kill mid-removal leaves it damaged: removed next time
        shutil.rmtree(os.path.join(os.path.abspath(directory), str(bad)))
    return step, damaged


def restore_net(mgr: ocp.CheckpointManager, step: int | None = None) -> Net:
    """The net spec saved at `step` (default: the newest step that restores)."""
    step = _newest_good(mgr)[0] if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {mgr.directory}")
    out = mgr.restore(step, args=ocp.args.Composite(net=ocp.args.JsonRestore()))
    try:
        return Net.from_dict(out.net)
    except SpecError as e:
        raise CheckpointMismatchError(
            f"checkpoint {mgr.directory}/{step} holds an invalid net spec: {e}"
        ) from None


def restore_state(mgr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None) -> Any:
    """Restores the state pytree shaped like `abstract_state` (arrays or ShapeDtypeStructs).

    Raises:
      FileNotFoundError: no step restores.
      CheckpointMismatchError: the step holds a state of another structure or
        shape (e.g. a changed optimizer), or it is damaged.
    """
    step = _newest_good(mgr)[0] if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {mgr.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    _quiet_abandoned_reads()
    try:
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # orbax raises many types; say which case this is
        why = _damage(mgr, step)
        if why is not None:
            raise CheckpointMismatchError(
                f"checkpoint {mgr.directory}/{step} is damaged ({why}); remove it to resume "
                "from an earlier step"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(
            f"checkpoint {mgr.directory}/{step} holds a training state that does not fit this "
            f"config (changed optimizer or model settings?): {first}; use a new --workdir"
        ) from None
    return out.state


def load(workdir: str, step: int | None = None) -> tuple[Net, dict]:
    """Loads ``(net, variables)`` from a training workdir's checkpoints.

    Without `step`, the newest step that restores (a damaged newer one is
    skipped with a warning).

    Raises:
      FileNotFoundError: the workdir has no checkpoint that restores.
    """
    directory = os.path.join(workdir, "checkpoints")
    newest = latest_step(directory)
    if newest is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {directory}; train first with "
            "python -m train.multi_exit --workdir=..."
        )
    with _reader(directory) as mgr:
        step = newest if step is None else step
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
    assembled in a temporary sibling directory and swapped into place
    (`flexjax.io.replace_dir`), so a killed process leaves either the old
    model or the new one (and perhaps a ``.NAME.tmp-*`` sibling). An existing
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
        replace_dir(tmp, directory)  # atomic swap where the OS allows it
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
