"""What every job shares: flag parsing that fails in one clear line, not a traceback."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from absl import flags

from flexjax import config as config_lib


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` (first line only) to stderr and exits with status 1."""
    print(
        f"error: {message.strip().splitlines()[0] if message.strip() else 'failed'}",
        file=sys.stderr,
    )
    sys.exit(1)


def parse_flags(argv: list[str], check_keys: bool = True) -> list[str]:
    """An `app.run(flags_parser=...)` that checks config paths and override keys first.

    ml_collections reports a missing config file or an unknown ``--config.x``
    override as a multi-screen traceback; these are checked here and reported
    as one line with the valid choices. Jobs whose config is not a training
    config (e.g. ``train.catalog``) pass ``check_keys=False``.
    """

    for arg in argv[1:]:
        if arg.startswith("--config=") or arg.startswith("--config_file="):
            path = arg.split("=", 1)[1].partition(":")[0]
            if not os.path.exists(path):
                fail(f"config file {path} does not exist")
        elif arg.startswith("--config.") and check_keys:
            key = arg[len("--config.") :].split("=", 1)[0]
            try:
                config_lib.check_key(key)
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
