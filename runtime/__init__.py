"""flexjax runtime: executes exported bundles with numpy and the LiteRT interpreter only.

This package never imports JAX or TensorFlow (DESIGN.md): it is what ships to
a phone test rig, a Raspberry Pi or an edge box. `tests/test_runtime.py`
proves the boundary by running it where importing either fails.

Its numpy-only modules (`runtime.criteria`, `runtime.latency_model`,
`runtime.names`, `runtime.timing`) are the definitions the JAX library shares
with it, so importing one of them must not load LiteRT: the public classes
below are resolved on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "SCHEMA_VERSION": "runtime.bundle",
    "Bundle": "runtime.bundle",
    "BundleError": "runtime.bundle",
    "EarlyExitExecutor": "runtime.executor",
    "ExitResult": "runtime.executor",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
