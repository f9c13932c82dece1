"""What every job shares: flag parsing that fails in one clear line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags

from flexjax import config as config_lib
from runtime.names import REPORT_FILE


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` (first line only) to stderr and exits with status 1."""
    print(
        f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}",
        file=sys.stderr,
    )
    sys.exit(1)


def parse_flags(argv: list[str], schema_fn: Callable[[], Any] = config_lib.defaults) -> list[str]:
    """An `app.run(flags_parser=...)` that checks config paths and override keys first.

    ml_collections reports a missing config file or an unknown ``--config.x``
    override as a multi-screen traceback; these are checked here against the
    job's schema (`schema_fn`: training's, `config_lib.flexdnn_defaults` or
    `config_lib.catalog_defaults`)
    and reported as one line with the valid choices.
    """
    for arg in argv[1:]:
        if arg.startswith("--config=") or arg.startswith("--config_file="):
            path = arg.split("=", 1)[1].partition(":")[0]
            if not os.path.exists(path):
                fail(f"config file {path} does not exist")
        elif arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            try:
                config_lib.check_key(key, schema_fn)
            except ValueError as e:
                fail(str(e))
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # config_flags wraps errors raised by get_config(arg); keep the innermost message.
        if "--config" not in str(e):
            fail(str(e))
        inner: BaseException = e
        while (inner.__cause__ or inner.__context__) is not None:
            inner = inner.__cause__ or inner.__context__
        fail(str(inner) or str(e))


def note_if_finished(workdir: str, marker: str = REPORT_FILE) -> bool:
    """Says on stderr when `workdir` already holds a finished job, and how to start over.

    Re-running a job resumes after its last finished stage; for a finished
    one that means re-checking every stage and re-writing the report, which
    is easy to mistake for a fresh run. `marker` is the file the job's last
    stage writes. Returns whether it was finished.
    """
    if not os.path.exists(os.path.join(workdir, marker)):
        return False
    print(
        f"note: {workdir} holds a finished run ({marker}); its finished stages are "
        f"kept and the report is written again. To start over, remove it (rm -rf {workdir}) "
        "or pass another --workdir.",
        file=sys.stderr,
        flush=True,
    )
    return True


def limit_cpu_threads(threads: int) -> None:
    """Caps the CPU threads JAX (XLA) and TensorFlow use, before either is imported.

    The same ``--threads`` the runtime commands take: 0 keeps the default
    (every core). Must run before the first ``import jax``; entry points call
    it right after parsing flags.

    Raises:
      ValueError: a negative count.
    """
    if threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = every core), got {threads}")
    if not threads:
        return
    xla = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{xla} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
    ).strip()
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
