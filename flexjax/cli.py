"""What every job shares: flag parsing that fails in one clear line, not a traceback."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging

from flexjax import config as config_lib
from runtime.args import MAX_THREADS
from runtime.names import REPORT_FILE

NUMERIC_PARSERS = (flags.IntegerParser, flags.FloatParser)


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` (first line only) to stderr and exits with status 1."""
    print(
        f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}",
        file=sys.stderr,
    )
    sys.exit(1)


class FloatListParser(flags.ListParser):
    """A non-empty comma-separated list of finite floats in [lower_bound, upper_bound]."""

    def __init__(self, lower_bound: float, upper_bound: float):
        super().__init__()
        self.lower_bound, self.upper_bound = lower_bound, upper_bound

    def parse(self, argument: Any) -> list[float]:
        items = super().parse(argument)
        if not items:
            raise ValueError("needs at least one number")
        out = []
        for item in items:
            try:
                x = float(item)
            except (TypeError, ValueError):
                raise ValueError(f"{item!r} is not a number") from None
            if not (math.isfinite(x) and self.lower_bound <= x <= self.upper_bound):
                raise ValueError(
                    f"{item!r} is not a finite number in [{self.lower_bound}, {self.upper_bound}]"
                )
            out.append(x)
        return out

    def flag_type(self) -> str:
        return "list of floats"


def define_float_list(
    name: str, default: Sequence[float], help_text: str, *, lower_bound: float,
    upper_bound: float,
) -> None:  # fmt: skip
    """``--name=a,b,c``: a list of finite floats within bounds (absl has no such flag)."""
    flags.DEFINE(
        FloatListParser(lower_bound, upper_bound), name, ",".join(str(x) for x in default),
        help_text, serializer=flags.CsvListSerializer(","),
    )  # fmt: skip


def define_threads() -> None:
    """``--threads``: CPU threads for JAX/XLA and TensorFlow (0 = every core)."""
    flags.DEFINE_integer(
        "threads", 0, "CPU threads for JAX/XLA and TensorFlow (0 = every core).",
        lower_bound=0, upper_bound=MAX_THREADS,
    )  # fmt: skip


def check_numbers(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Raises ValueError naming the first numeric flag that is NaN or infinite.

    absl checks ``lower_bound`` / ``upper_bound`` itself, but NaN compares
    false with both, and ``1e400`` parses as inf; every number a job takes
    is finite.
    """
    for name in flag_values:
        flag = flag_values[name]
        if not isinstance(flag.parser, (*NUMERIC_PARSERS, FloatListParser)):
            continue
        values = flag.value if isinstance(flag.value, list) else [flag.value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"--{name} must be a finite number, got {v}")


def parse_flags(argv: list[str], schema_fn: Callable[[], Any] = config_lib.defaults) -> list[str]:
    """An `app.run(flags_parser=...)` that checks config paths and override keys first.

    ml_collections reports a missing config file or an unknown ``--config.x``
    override as a multi-screen traceback; these are checked here against the
    job's schema (`schema_fn`: training's, `config_lib.flexdnn_defaults` or
    `config_lib.catalog_defaults`)
    and reported as one line with the valid choices. After parsing, every
    numeric flag must be finite (`check_numbers`; absl enforces the bounds
    every job's numeric flags declare) and the config must validate
    (`check_config`: keys, types, value domains), so a bad value is refused
    before any work starts.
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
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        # config_flags wraps errors raised by get_config(arg); keep the innermost message.
        if "--config" not in str(e):
            fail(str(e))
        inner: BaseException = e
        while (inner.__cause__ or inner.__context__) is not None:
            inner = inner.__cause__ or inner.__context__
        message = str(inner) or str(e)
        for arg in argv[1:]:  # name the override whose value did not parse
            key, eq, value = arg.partition("=")
            if key.startswith("--config.") and eq and repr(value) in message:
                message = f"{key}={value}: {message}"
                break
        fail(message)
    try:
        check_numbers()
        check_config(schema_fn)
    except (ValueError, OSError) as e:
        fail(str(e))
    return rest


def check_config(schema_fn: Callable[[], Any], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Validates ``--config`` (keys, types, `config_lib.DOMAINS`) before the job starts.

    An Edgent job's ``model_config`` (the net's training config) is loaded and
    validated too, so a bad value anywhere is one line before JAX loads.

    Raises:
      ValueError / OSError: the first bad key or value, or an unreadable model_config.
    """
    if "config" not in flag_values or not isinstance(
        flag_values["config"].value, ml_collections.ConfigDict
    ):
        return
    config = config_lib.validate(flag_values["config"].value, schema_fn)
    if "base" in config:  # a catalog: its training config has the training schema
        config_lib.validate(config.base, config_lib.defaults)
    if "model_config" in config and not config.get("distill", {}).get("backbone"):
        config_lib.validate(config_lib.load(config.model_config))


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


def start_job(argv: Sequence[str], threads: int | None = None) -> None:
    """What every absl job does first, before JAX loads.

    Refuses stray positional arguments, quiets INFO logging unless --verbosity
    was given (orbax logs every step at INFO) and, when `threads` is given,
    applies it (`limit_cpu_threads`; a bad value is one error line).
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if threads is not None:
        try:
            limit_cpu_threads(threads)
        except ValueError as e:
            fail(str(e))


def limit_cpu_threads(threads: int) -> None:
    """Caps the CPU threads JAX (XLA) and TensorFlow use, before either is imported.

    The same ``--threads`` the runtime commands take: 0 keeps the default
    (every core). Must run before the first ``import jax``; entry points call
    it right after parsing flags.

    Raises:
      ValueError: a negative count.
    """
    if not 0 <= threads <= MAX_THREADS:
        raise ValueError(f"--threads must be in [0, {MAX_THREADS}] (0 = every core), got {threads}")
    if not threads:
        return
    xla = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{xla} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={threads}"
    ).strip()
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
