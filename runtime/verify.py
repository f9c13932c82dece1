"""Verifies a bundle and prints what it holds.

  python -m runtime.verify BUNDLE [--json]

Checks the manifest digest, schema, every file's size and sha256 and the
flatbuffer's signatures (`Bundle.from_dir`), then prints precision, size,
per-signature FLOPs / GPU-delegate compatibility / operators, the calibrated
thresholds and the test-split results recorded at export. Exit status 1 with
one ``error:`` line if the bundle does not verify.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from runtime.bundle import Bundle, BundleError, summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.verify", description=__doc__.split("\n")[0])
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    args = p.parse_args(argv)
    try:
        bundle = Bundle.from_dir(args.bundle)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(bundle.manifest, indent=1))
    else:
        print(f"{args.bundle}: verified (schema {bundle.manifest['schema_version']})")
        print(summary(bundle.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
