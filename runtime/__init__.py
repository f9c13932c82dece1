"""flexjax runtime: executes exported bundles with numpy and the LiteRT interpreter only.

This package never imports JAX or TensorFlow (DESIGN.md): it is what ships to
a phone test rig, a Raspberry Pi or an edge box. `tests/test_runtime.py`
proves the boundary by running it where importing either fails.
"""

from runtime.bundle import SCHEMA_VERSION, Bundle, BundleError
from runtime.executor import EarlyExitExecutor, ExitResult

__all__ = ["SCHEMA_VERSION", "Bundle", "BundleError", "EarlyExitExecutor", "ExitResult"]
