"""Every command refuses every bad number and file in ONE ``error:`` line, before any work.

The cases are generated, not listed: each argparse command's parser is built
(``build_parser()``) and its actions walked; each numeric argument's declared
domain (`runtime.args.Domain`) yields the values outside it, plus the
always-bad ones (NaN, non-numbers, empty); each file argument gets missing /
directory / empty / non-UTF-8 / wrong-JSON-type files. absl jobs are driven in
one subprocess per job (absl flags are global) where a driver walks the
flags the job's module defines and every numeric key of its config schema
(``--config.KEY=VALUE``). One real subprocess per command family proves the
entry points themselves behave.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from flexjax import config as config_lib
from runtime import args as args_lib
from runtime import benchmark_model_host

from conftest import ROOT


def _commands_with_parsers() -> tuple[str, ...]:
    """Every module in runtime/, export/, train/, pipelines/ and flexjax/ that defines
    ``build_parser()`` at top level: a new argparse command is covered without being listed."""
    found = []
    for top in ("runtime", "export", "train", "pipelines", "flexjax"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    if "\ndef build_parser(" not in fh.read():
                        continue
                rel = os.path.relpath(os.path.join(dirpath, f[:-3]), ROOT)
                found.append(rel.replace(os.sep, "."))
    return tuple(sorted(found))


ARGPARSE_COMMANDS = _commands_with_parsers()


def test_every_argparse_command_is_discovered():
    # A command that builds its parser inline (no build_parser) would escape the cases.
    must = {"runtime.bench", "runtime.verify", "runtime.ams.cli", "runtime.fuzz_bundle",
            "export.sweep", "export.batched_exit_bench", "flexjax.data.__main__"}  # fmt: skip
    assert must <= set(ARGPARSE_COMMANDS)
    for top in ("runtime", "export", "flexjax", "pipelines"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    if "argparse.ArgumentParser(" in text and f != "args.py":
                        raise AssertionError(f"{dirpath}/{f} builds a bare argparse parser")


ALWAYS_BAD = ("nan", "NaN", "-nan", "abc", "", " ", "1e400", "-1e400", str(10**20), "0x10")
SECONDS_PER_CASE = 5.0  # refused while parsing: milliseconds, unless it started real work


def _in_domain(text: str, d: args_lib.Domain) -> bool:
    """Whether `text` is a value of `d`, computed here (independently of runtime.args)."""
    try:
        x = int(text) if d.kind == "int" else float(text)
    except ValueError:
        return False
    x = float(max(min(x, 10**300), -(10**300)))
    if math.isnan(x) or (math.isinf(x) and not d.allow_inf):
        return False
    if d.lo is not None and (x < d.lo or (d.lo_open and x == d.lo)):
        return False
    return not (d.hi is not None and (x > d.hi or (d.hi_open and x == d.hi)))


def bad_numbers(d: args_lib.Domain) -> list[str]:
    """The always-bad values plus those just outside `d`'s bounds (never one inside)."""
    cands = list(ALWAYS_BAD) + ["inf", "-inf", "-1", "0", "1.5"]
    for bound, sign in ((d.lo, -1), (d.hi, 1)):
        if bound is None:
            continue
        near = int(bound) + sign if d.kind == "int" else bound + sign * max(abs(bound) * 1e-6, 1e-9)
        cands += [repr(bound), repr(near), repr(bound * 10 + sign)]
    bad = {c for c in cands if not _in_domain(c, d)}
    if d.items:  # a list: each bad item alone and after a good one, and empty items
        good = next(v for v in ("1", "0.5", "0", repr(d.lo), repr(d.hi)) if _in_domain(v, d))
        bad |= {f"{good},", f",{good}", f"{good},,{good}"}
        bad |= {f"{good},{c}" for c in cands if not _in_domain(c, d) and c.strip()}
    return sorted(bad)


def bad_files(d: args_lib.Domain, tmp: str) -> list[str]:
    """Paths that are not what a file/dir argument of kind `d` accepts."""

    def write(name: str, data: bytes) -> str:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    missing = os.path.join(tmp, "missing", "x.json")
    if d.kind == "dir":
        return [missing, write("a_file", b"x"), ""]
    if d.kind == "path":
        return [missing, ""]
    if d.kind == "output":
        return [missing, tmp, ""]
    out = [missing, tmp, "", write("empty", b"")]
    if d.content != "binary":
        out += [write("latin1", b"caf\xe9\xff\xfe"), write("blank", b"  \n\t\n")]
    if d.content.startswith("json:"):
        wrong = b"[1, 2]" if d.content == "json:dict" else b'{"a": 1}'
        out += [write("wrong_type.json", wrong), write("bad.json", b'{"a": '),
                write("scalar.json", b"3"), write("nan.json", b"NaN")]  # fmt: skip
    return [d.prefix + p for p in out]


def _actions(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(argv prefix, action) for every argument, walking into subcommands."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, (*prefix, name))
        else:
            yield prefix, a


def _argv(prefix: tuple[str, ...], action: argparse.Action, value: str) -> list[str]:
    if action.option_strings:
        return [*prefix, f"{action.option_strings[0]}={value}"]
    return [*prefix, value]


def _run_main(module, argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = module.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def _check(label: str, code, stderr: str, seconds: float, prefix: str = "error:") -> list[str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if not code:
        problems.append("accepted")
    if "Traceback" in stderr or len(lines) != 1 or not lines[0].lower().startswith(prefix):
        problems.append(f"stderr {stderr[-300:]!r}")
    if seconds > SECONDS_PER_CASE:
        problems.append(f"took {seconds:.1f} s")
    return [f"{label}: {'; '.join(problems)}"] if problems else []


def argparse_cases(module_name: str, tmp: str):
    parser = importlib.import_module(module_name).build_parser()
    for prefix, action in _actions(parser):
        d = getattr(action.type, "domain", None)
        if d is None:
            continue
        if d.kind in ("int", "real"):
            for v in bad_numbers(d):
                yield _argv(prefix, action, v)
        if d.kind in ("file", "dir", "path", "output") or d.content:
            for v in bad_files(d, tmp):
                yield _argv(prefix, action, v)


@pytest.mark.parametrize("module_name", sorted(ARGPARSE_COMMANDS))
def test_argparse_command_every_declared_argument_refuses_bad_values_in_one_line(
    module_name, tmp_path
):
    module = importlib.import_module(module_name)
    parser = module.build_parser()
    untyped = [
        a.option_strings[0] for _, a in _actions(parser)
        if a.type in (int, float) or (a.type is not None and not hasattr(a.type, "domain")
                                      and a.dest != "target")
    ]  # fmt: skip
    assert not untyped, f"{module_name}: arguments without a declared domain: {untyped}"
    problems, n = [], 0
    for argv in argparse_cases(module_name, str(tmp_path)):
        t0 = time.perf_counter()
        code, err = _run_main(module, argv)
        problems += _check(f"{module_name} {argv}", code, err, time.perf_counter() - t0)
        n += 1
    assert n >= 3, f"{module_name}: only {n} generated cases"
    assert not problems, "\n".join(problems)


def test_benchmark_model_host_every_numeric_flag_refuses_bad_values_in_one_line():
    problems, n = [], 0
    for name, (kind, _, _) in benchmark_model_host.FLAGS.items():
        d = getattr(kind, "domain", None)
        if kind in (int, float):
            problems.append(f"--{name}: no declared domain")
        if d is None:
            continue
        for v in bad_numbers(d):
            code, err = _run_main(benchmark_model_host, [f"--{name}={v}"])
            problems += _check(f"--{name}={v}", code, err, 0.0, prefix="error:")
            n += 1
    assert n > 30 and not problems, "\n".join(problems)


def test_profile_target_options_refuse_bad_numbers(tmp_path):
    from runtime import profile

    for opt in ("threads=nan", "threads=0", "threads=100000", "slowdown=nan", "slowdown=inf",
                "slowdown=0.5", "slowdown=1e400", "threads=", "bogus=1"):  # fmt: skip
        code, err = _run_main(profile, [f"--target=local:{opt}"])
        assert not _check(opt, code, err, 0.0), err


# --- absl jobs: one subprocess per job, a driver loops over its flags and config keys -------

ABSL_JOBS = {
    # module: (argv that parses, schema of its --config or None)
    "train.multi_exit": (["--config=configs/mnist_lenet_branchy.py:smoke", "--workdir=W"],
                         "defaults"),
    "train.flexdnn": (["--config=configs/mnist_flexdnn.py:smoke", "--workdir=W"],
                      "flexdnn_defaults"),
    "train.catalog": (["--config=configs/mnist_catalog.py:smoke", "--workdir=W"],
                      "catalog_defaults"),
    "train.edgent": (["--config=configs/mnist_edgent.py:smoke", "--workdir=W"],
                     "edgent_defaults"),
    "train.throughput": (["--config=configs/mnist_lenet_branchy.py:smoke"], None),
    "train.throughput_vs_torch": (["--config=configs/mnist_lenet_branchy.py:smoke"], None),
    "train.profile_train_step": (["--config=configs/mnist_lenet_branchy.py:smoke"], None),
    "train.time_to_accuracy": (["--config=configs/mnist_lenet_branchy.py:smoke"], None),
    "train.pretrained": (["--model=efficientnet_lite0", "--workdir=W"], None),
    "train.lite_catalog": (["--config=configs/clips_lite_catalog.py:smoke", "--workdir=W"],
                           "lite_catalog_defaults"),
    "export.bundle": (["--workdir=W", "--out=O"], None),
    "train.lite_mcdnn": (["--config=configs/clips_lite_mcdnn.py:smoke", "--workdir=W"],
                         "lite_mcdnn_defaults"),
}  # fmt: skip

DRIVER = r"""
import contextlib, io, json, math, sys, time
from absl import flags
from flexjax import cli, config as config_lib
from runtime.args import Domain
from test_bad_values import bad_numbers, _check

module_name, base, schema = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
module = __import__(module_name, fromlist=["_"])
if hasattr(module, "_define_flags"):
    module._define_flags()
F = flags.FLAGS
schema_fn = getattr(config_lib, schema) if schema != "None" else config_lib.defaults
problems, cases, unbounded = [], 0, []


def attempt(extra):
    global cases
    if extra.endswith("=0x10"):  # absl reads hex integers on purpose: 16 may be in range
        return
    argv = ["prog", *base, extra]
    sys.argv = argv  # ml_collections registers --config.KEY overrides from sys.argv
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            cli.parse_flags(argv, schema_fn)
            code = 0
        except SystemExit as e:
            code = e.code
    problems.extend(_check(extra, code, err.getvalue(), time.perf_counter() - t0))
    F.unparse_flags()
    for name in [n for n in F if n.startswith("config.")]:
        delattr(F, name)
    cases += 1


# The parse that must succeed (so a refusal below is the bad value's, not the base argv's).
sys.argv = ["prog", *base]
cli.parse_flags(sys.argv, schema_fn)
F.unparse_flags()
for name in [n for n in F if n.startswith("config.")]:
    delattr(F, name)

by_module = F.flags_by_module_dict()  # the job's own flags and the shared ones (--threads)
for flag in by_module.get(module_name, []) + by_module.get("flexjax.cli", []):
    if isinstance(flag.parser, (flags.IntegerParser, flags.FloatParser, cli.FloatListParser)):
        lo, hi = flag.parser.lower_bound, flag.parser.upper_bound
        if lo is None or hi is None:
            unbounded.append(flag.name)
            continue
        kind = "int" if isinstance(flag.parser, flags.IntegerParser) else "real"
        items = isinstance(flag.parser, cli.FloatListParser)
        for v in bad_numbers(Domain(kind, lo, hi, items=items)):
            attempt(f"--{flag.name}={v}")
n_flags = cases
if schema != "None":
    for key, default in config_lib._flat(schema_fn()).items():
        d = config_lib.domain_of(key)
        if d is None or d.items:  # tuples are checked by validate() in-process
            continue
        for v in bad_numbers(d):
            attempt(f"--config.{key}={v}")
print(json.dumps({"problems": problems, "cases": cases, "flag_cases": n_flags,
                  "unbounded": unbounded}))
"""


@pytest.mark.parametrize("module_name", sorted(ABSL_JOBS))
def test_absl_job_every_numeric_flag_and_config_key_refuses_bad_values_in_one_line(module_name):
    base, schema = ABSL_JOBS[module_name]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, module_name, json.dumps(base), str(schema)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not rep["unbounded"], f"numeric flags without bounds: {rep['unbounded']}"
    assert not rep["problems"], "\n".join(rep["problems"][:40])
    if schema:
        assert rep["cases"] - rep["flag_cases"] > 50, rep["cases"]


# --- config values through validate(): every numeric key of every schema ---------------------

SCHEMAS = (
    "defaults", "flexdnn_defaults", "catalog_defaults", "edgent_defaults", "lite_catalog_defaults",
    "lite_mcdnn_defaults", "flexdnn_lite_defaults",
)  # fmt: skip


def _bad_values(d: args_lib.Domain) -> list:
    """Python values outside `d` (what a config file could hold)."""
    out: list = [math.nan, math.inf, -math.inf, "abc", None, True]
    for bound, is_open, sign in ((d.lo, d.lo_open, -1), (d.hi, d.hi_open, 1)):
        if bound is not None:
            out.append(bound + sign if d.kind == "int" else bound + sign * max(abs(bound), 1e-9))
            if is_open:
                out.append(bound)
    if d.kind == "int":
        out += [1.5, 10**20]
    return out


@pytest.mark.parametrize("schema", SCHEMAS)
def test_config_every_numeric_key_has_a_domain_and_validate_refuses_values_outside(schema):
    schema_fn = getattr(config_lib, schema)
    flat = config_lib._flat(schema_fn())
    numeric = [k for k, v in flat.items()
               if (isinstance(v, (int, float)) and not isinstance(v, bool))
               or (isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)
                   and not k.endswith(("tasks", "policies")))]  # fmt: skip
    missing = [k for k in numeric if config_lib.domain_of(k) is None]
    assert not missing, f"{schema}: numeric keys without a domain in DOMAINS: {missing}"
    n = 0
    for key in numeric:
        d = config_lib.domain_of(key)
        assert all(_in_domain(repr(x), d) for x in (flat[key] if d.items else [flat[key]])), key
        for bad in _bad_values(d):
            value = [bad] if d.items else bad
            config = ml_collections.ConfigDict(_nested(key, value))
            with pytest.raises(ValueError, match=f"config key '{key}'|{key}"):
                config_lib.validate(config, schema_fn)
            n += 1
    assert n > 20 * len(numeric) // 3


def _nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


# --- end to end: the real entry points ------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["runtime.traces", "--apps=a", "--out=/tmp/never.json", "--hours=nan"],
        ["runtime.ams", "--bundle=.", "--trace=configs", "--memory-mb=inf"],
        ["export.latency_fit", "--bundle=.", "--device=README.md", "--edge=README.md"],
        ["flexjax.data", "clips", "--fps=nan"],
        ["train.multi_exit", "--config=configs/mnist_lenet_branchy.py:smoke", "--workdir=/tmp/w",
         "--config.train.learning_rate=nan"],
        ["export.bundle", "--workdir=/tmp/w", "--out=/tmp/o", "--epsilons=0.01,nan"],
    ],
    ids=lambda a: a[0],
)  # fmt: skip
def test_entry_point_bad_value_is_one_error_line_and_nonzero_exit(argv):
    proc = subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
