"""What every argparse command shares: declared domains, and failures in one ``error:`` line.

Every numeric argument declares its domain with a converter from here
(`count`, `real`, `probability`, `seed`, `threads`, lists of them), every
file argument its kind (`existing_file`, `text_file`, `json_file`,
`existing_dir`, `existing_path`, `output_file`); a value outside it is
refused while parsing, before any work starts, as one line:

    error: argument --frames: must be an integer in [1, 10000000], got 'nan'

`ArgumentParser.error` prints that line and exits 2; `run` turns the
failures a command expects (files, values, the runtime's own errors, all
`ValueError`, `OSError` or `RuntimeError` subclasses) into one line and
exit status 1. Each converter carries its `Domain` (``conv.domain``), so a
test can derive the bad values of every argument from the parser itself.

Caps (`MAX_COUNT`, `MAX_THREADS`) are where a value sizes an allocation or a
loop: a typo like ``--frames=10**20`` is refused, not allocated.

stdlib only: the runtime, export and the library's commands all use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

MAX_COUNT = 10_000_000  # frames, runs, rounds, steps: more is a typo, not an experiment
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1
# What a command's failure can be (bad file, bad value, a failed stage); the runtime's own
# error classes derive from these (BundleError, PlannerError, TraceError, AmsError: ValueError;
# AdbError, EdgeFailure: RuntimeError; UnicodeDecodeError and JSONDecodeError: ValueError).
EXPECTED: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)


class DomainError(argparse.ArgumentTypeError, ValueError):
    """A value outside its declared domain: argparse reports it as is; elsewhere a ValueError."""


@dataclasses.dataclass(frozen=True)
class Domain:
    """What a converter accepts: the truth a test derives bad values from.

    kind: ``int`` | ``real`` | ``file`` | ``dir`` | ``path`` | ``output``.
    For numbers, [lo, hi] (open at an end where `lo_open`/`hi_open`), inf
    only where `allow_inf`; NaN never. `items`: a comma-separated list of
    such numbers. `content`: for files, ``binary`` (non-empty), ``text``
    (non-empty UTF-8) or ``json:<type>`` (UTF-8 JSON whose top level is a
    dict / list).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    allow_inf: bool = False
    items: bool = False
    content: str = ""
    prefix: str = ""

    def describe(self) -> str:
        if self.kind in ("int", "real"):
            left = "(" if self.lo_open or (self.lo is None and not self.allow_inf) else "["
            right = ")" if self.hi_open or (self.hi is None and not self.allow_inf) else "]"
            lo = "-inf" if self.lo is None else _num(self.lo)
            hi = "inf" if self.hi is None else _num(self.hi)
            what = "integer" if self.kind == "int" else "number"
            if self.items:
                return f"a comma-separated list of {what}s in {left}{lo}, {hi}{right}"
            return f"{'an' if self.kind == 'int' else 'a'} {what} in {left}{lo}, {hi}{right}"
        return {"file": "an existing file", "dir": "an existing directory",
                "path": "an existing file or directory",
                "output": "a path in an existing directory"}[self.kind]  # fmt: skip

    def contains(self, x: float) -> bool:
        if math.isnan(x) or (math.isinf(x) and not self.allow_inf):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _with_domain(fn: Callable[[str], Any], domain: Domain, name: str) -> Callable[[str], Any]:
    fn.domain = domain  # type: ignore[attr-defined]
    fn.__name__ = name  # argparse names the converter in its messages
    return fn


def parse_number(text: str, domain: Domain) -> float:
    """`text` as a number in `domain`; ValueError (one line) otherwise."""
    try:
        if domain.kind == "int":
            x: float = int(text.strip())
        else:
            x = float(text.strip())
    except (ValueError, OverflowError):
        raise DomainError(f"must be {domain.describe()}, got {text!r}") from None
    if not domain.contains(float(x) if domain.kind == "real" else _clip(x)):
        raise DomainError(f"must be {domain.describe()}, got {text!r}")
    return x


def _clip(x: int) -> float:
    """An int as a float for comparing with bounds (10**400 must not overflow)."""
    return float(max(min(x, 10**300), -(10**300)))


def count(lo: int = 0, hi: int = MAX_COUNT) -> Callable[[str], int]:
    """An integer in [lo, hi]."""
    domain = Domain("int", lo, hi)
    return _with_domain(lambda s: int(parse_number(s, domain)), domain, "count")


def threads(lo: int = 1) -> Callable[[str], int]:
    """A thread count in [lo, MAX_THREADS] (``lo=0`` where 0 means every core)."""
    return count(lo, MAX_THREADS)


def seed() -> Callable[[str], int]:
    """A random seed in [0, 2**32 - 1]."""
    return count(0, MAX_SEED)


def real(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    hi_open: bool = False, allow_inf: bool = False,
) -> Callable[[str], float]:  # fmt: skip
    """A number in [lo, hi] (open where asked); NaN always refused, inf unless `allow_inf`."""
    domain = Domain("real", lo, hi, lo_open, hi_open, allow_inf)
    return _with_domain(lambda s: float(parse_number(s, domain)), domain, "real")


def positive(hi: float | None = None) -> Callable[[str], float]:
    """A finite number > 0 (and <= hi)."""
    return real(0.0, hi, lo_open=True)


def probability() -> Callable[[str], float]:
    """A number in [0, 1]."""
    return real(0.0, 1.0)


def number_list(of: Callable[[str], Any]) -> Callable[[str], list]:
    """A non-empty comma-separated list, each item in the domain of `of` (a converter here)."""
    item: Domain = of.domain  # type: ignore[attr-defined]
    domain = dataclasses.replace(item, items=True)

    def convert(text: str) -> list:
        parts = [p for p in text.split(",")]
        if not text.strip() or any(not p.strip() for p in parts):
            raise DomainError(f"must be {domain.describe()}, got {text!r}")
        return [of(p) for p in parts]

    return _with_domain(convert, domain, "list")


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def read_text(path: str, what: str = "file") -> str:
    """The contents of a UTF-8 text file, strictly decoded.

    Raises:
      ValueError: not UTF-8 (one line naming the file and the byte offset).
      OSError: missing or unreadable.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


JSON_TYPES = {"dict": dict, "list": list}


def read_json(path: str, kind: str = "dict", what: str = "file") -> Any:
    """A UTF-8 JSON file whose top level is a `kind` (``dict`` or ``list``).

    Raises:
      ValueError: empty, not UTF-8, not JSON, or another top-level type.
      OSError: missing or unreadable.
    """
    text = read_text(path, what)
    if not text.strip():
        raise ValueError(f"{what} {path} is empty (expected a JSON {_json_name(kind)})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, JSON_TYPES[kind]):
        raise ValueError(
            f"{what} {path} must hold a JSON {_json_name(kind)}, got {_json_name(data)}"
        )
    return data


def _json_name(x: Any) -> str:
    """How JSON calls a `JSON_TYPES` kind (``"dict"``) or the type of a parsed value."""
    if isinstance(x, str) and x in JSON_TYPES:
        x = JSON_TYPES[x]()
    for t, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"),
                    ((int, float), "number"), (type(None), "null")):  # fmt: skip
        if isinstance(x, t):
            return name
    return type(x).__name__


def _file(content: str) -> Callable[[str], str]:
    domain = Domain("file", content=content)

    def convert(path: str) -> str:
        try:
            if not path:
                raise ValueError("must name an existing file, got ''")
            if os.path.isdir(path):
                raise ValueError(f"{path} is a directory, expected a file")
            if not os.path.isfile(path):
                raise ValueError(f"{path} does not exist")
            if content.startswith("json:"):
                read_json(path, content.split(":", 1)[1])
            elif content == "text":
                if not read_text(path).strip():
                    raise ValueError(f"file {path} is empty")
            elif os.path.getsize(path) == 0:
                raise ValueError(f"file {path} is empty")
            elif not os.access(path, os.R_OK):
                raise ValueError(f"file {path} is not readable")
        except OSError as e:
            raise DomainError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise DomainError(str(e)) from None
        return path

    return _with_domain(convert, domain, "file")


def prefixed_file(prefix: str, content: str = "binary") -> Callable[[str], str]:
    """An argument that names a file as ``PREFIX+PATH`` (``npz:PATH``) or something else.

    Only the ``PREFIX+PATH`` form is checked here (as `existing_file` /
    `text_file` / `json_file`); other forms are returned for the command.
    """
    check = _file(content)
    domain = dataclasses.replace(check.domain, prefix=prefix)  # type: ignore[attr-defined]

    def convert(text: str) -> str:
        if text.startswith(prefix):
            check(text[len(prefix) :])
        return text

    return _with_domain(convert, domain, "file")


def number_or_file(number: Callable[[str], Any], content: str = "text") -> Callable[[str], Any]:
    """A number in the domain of `number` (a converter here), or else a file (`content`).

    What looks like a number is checked as one (``nan`` is a bad number, not
    a file name); anything else must be a file, returned as its path.
    """
    check = _file(content)
    domain = dataclasses.replace(number.domain, content=content)  # type: ignore[attr-defined]

    def convert(text: str) -> Any:
        try:
            float(text)
        except ValueError:
            return check(text)
        return number(text)

    return _with_domain(convert, domain, "number or file")


def existing_file() -> Callable[[str], str]:
    """A readable, non-empty file (binary content: a model, a certificate, an executable)."""
    return _file("binary")


def text_file() -> Callable[[str], str]:
    """A non-empty UTF-8 text file."""
    return _file("text")


def json_file(kind: str = "dict") -> Callable[[str], str]:
    """A UTF-8 JSON file whose top level is a `kind` (``dict`` or ``list``); returns the path.

    The file is read again by the command; checking it here refuses a bad
    file before any work starts.
    """
    if kind not in JSON_TYPES:
        raise ValueError(f"json_file kind must be one of {list(JSON_TYPES)}, got {kind!r}")
    return _file(f"json:{kind}")


def existing_dir() -> Callable[[str], str]:
    """An existing directory (a bundle, a workdir)."""
    domain = Domain("dir")

    def convert(path: str) -> str:
        if not path:
            raise DomainError("must name an existing directory, got ''")
        if os.path.isfile(path):
            raise DomainError(f"{path} is a file, expected a directory")
        if not os.path.isdir(path):
            raise DomainError(f"{path} does not exist")
        return path

    return _with_domain(convert, domain, "directory")


def existing_path() -> Callable[[str], str]:
    """An existing file or directory."""
    domain = Domain("path")

    def convert(path: str) -> str:
        if not path or not os.path.exists(path):
            raise DomainError(f"{path!r} does not exist")
        return path

    return _with_domain(convert, domain, "path")


def output_file() -> Callable[[str], str]:
    """A file to write, in a directory that exists (it is written at the end, atomically)."""
    domain = Domain("output")

    def convert(path: str) -> str:
        if not path or os.path.isdir(path):
            raise DomainError(f"must be a file path to write, got {path!r}")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise DomainError(f"directory of {path} does not exist")
        return path

    return _with_domain(convert, domain, "output")


# ---------------------------------------------------------------------------
# Parser and entry point.
# ---------------------------------------------------------------------------


def error_line(e: BaseException | str) -> str:
    """``error: <first line>`` of an exception or message (never empty)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and e.args:
        text = f"missing key {e.args[0]!r}"
    first = text.splitlines()[0] if text else type(e).__name__
    return f"error: {first}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is ONE ``error:`` line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{error_line(message)} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def run(
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Parses `argv` with `parser` and runs `body(args)`; the one ``main`` of every command.

    A bad argument exits 2 (the parser's one line); an expected failure
    (`EXPECTED` or `errors`) prints one ``error:`` line and returns 1.
    Anything else is a bug and keeps its traceback.
    """
    args = parser.parse_args(argv)
    try:
        status = body(args)
    except (*EXPECTED, *errors) as e:
        print(error_line(e), file=sys.stderr, flush=True)
        return 1
    return 0 if status is None else int(status)
