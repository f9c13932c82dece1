"""Shared fixtures: a tiny trained workdir, and a helper to run the CLI jobs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_thread_per_worker() -> None:
    """With as many xdist workers as cores (`make test`: -n 2 on 2 cores), each worker and the
    jobs it starts use one CPU thread for XLA and TensorFlow (`flexjax.cli.limit_cpu_threads`,
    inherited through the environment): two workers each spreading over both cores only
    contend (measured on 4 of the slowest files: 192 s vs 223 s wall). Before JAX loads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" in os.environ and workers >= (os.cpu_count() or 1):
        from flexjax.cli import limit_cpu_threads

        limit_cpu_threads(1)


_one_thread_per_worker()
SMOKE = os.path.join(ROOT, "configs", "mnist_lenet_branchy.py") + ":smoke"


def run_job(
    module: str, *args: str, env: dict | None = None, timeout: int = 300, check: bool = False
) -> subprocess.CompletedProcess:
    """Runs ``python -m <module> args`` from the repo root and captures its output."""
    full_env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> str:
    """A workdir trained once with the smoke config (shared by several tests)."""
    workdir = str(tmp_path_factory.mktemp("smoke") / "lenet")
    run_job("train.multi_exit", f"--config={SMOKE}", f"--workdir={workdir}", check=True)
    return workdir


@pytest.fixture(scope="session")
def smoke_bundle(smoke_workdir, tmp_path_factory) -> str:
    """The smoke workdir exported (fp32) once through the CLI."""
    out = str(tmp_path_factory.mktemp("bundles") / "lenet_fp32")
    run_job("export.bundle", f"--workdir={smoke_workdir}", f"--out={out}", check=True)
    return out
