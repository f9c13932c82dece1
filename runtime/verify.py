"""Verifies a bundle and prints what it holds.

  python -m runtime.verify BUNDLE [--json]

Checks the manifest digest, schema, every file's size and sha256 and the
flatbuffer's signatures (`Bundle.from_dir`), then prints precision, size,
per-signature FLOPs / GPU-delegate compatibility / operators, the calibrated
thresholds and the test-split results recorded at export. Exit status 1 with
one ``error:`` line if the bundle does not verify.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from runtime import args as args_lib
from runtime.bundle import Bundle, summary


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.verify``."""
    p = args_lib.ArgumentParser(prog="python -m runtime.verify", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=args_lib.existing_dir())
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    bundle = Bundle.from_dir(args.bundle)
    if args.json:
        print(json.dumps(bundle.manifest, indent=1))
    else:
        print(f"{args.bundle}: verified (schema {bundle.manifest['schema_version']})")
        print(summary(bundle.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
