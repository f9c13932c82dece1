"""Imports run one way (README "Architecture"): parsed from the source, not imported.

Every first-party module's imports are read with `ast`, at the top of the
module and inside functions, and checked against the layers:

    train/      thin entry points            may import everything below
    pipelines/  end-to-end orchestration     library + export + runtime together
    export/     (net, variables) -> bundle   library + runtime
    flexjax/    the JAX library              runtime's numpy-only shared definitions
    runtime/    numpy + LiteRT (+ grpcio)    flexjax's numpy-only modules (data, io, spec)
    configs/    plain data                   flexjax.config

"numpy-only" is computed, not listed: a module qualifies when nothing it
imports, transitively, needs JAX, TensorFlow, LiteRT or gRPC.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("runtime", "flexjax", "export", "pipelines", "train", "configs")
RANK = {"runtime": 0, "configs": 1, "flexjax": 1, "export": 2, "pipelines": 3, "train": 4}
# Third-party roots that need JAX or TensorFlow (what runtime/ must never reach).
JAX_OR_TF = {"jax", "jaxlib", "flax", "optax", "orbax", "chex", "tensorflow", "tf_keras", "keras"}
# What only the runtime's install brings (the library may not need it for its shared imports).
RUNTIME_ONLY = {"ai_edge_litert", "grpc"}
# A function-level import says why it is not at the top of the module.
LAZY_REASON = re.compile(r"#\s*lazy:\s*\S")


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # absolute dotted name of what is imported (a module where it is one)
    names: tuple[str, ...]  # names taken from it ("from X import a, b"), () for "import X"
    line: int
    in_function: bool
    has_reason: bool


def _module_files() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "__pycache__"))]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[: -len(".py")]
                    name = rel.replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES.get(name, "").endswith("__init__.py")


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    path = MODULES[module]
    with open(path) as f:
        source = f.read()
    lines = source.splitlines()
    out: list[Import] = []

    def reason(first: int, last: int) -> bool:
        # A run of imports may share one reason on the line above it.
        return any(LAZY_REASON.search(lines[i - 1]) for i in range(max(first - 1, 1), last + 1))

    def visit(node: ast.AST, in_function: bool) -> None:
        run: list[ast.stmt] = []  # the consecutive import statements `child` belongs to
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.Import, ast.ImportFrom)):
                run = []
            else:
                run.append(child)
                why = reason(run[0].lineno, child.end_lineno or child.lineno)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append(Import(module, alias.name, (), child.lineno, in_function, why))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target, names = (sub, ()) if sub in MODULES else (base, (alias.name,))
                    out.append(Import(module, target, names, child.lineno, in_function, why))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(ast.parse(source), False)
    return tuple(out)


def _first_party(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def _loaded(target: str) -> list[str]:
    """The first-party modules that importing `target` runs (its packages' __init__ too)."""
    parts = target.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


@functools.cache
def third_party_closure(module: str) -> frozenset[str]:
    """Root names of every third-party package that importing `module` can reach."""
    seen: set[str] = set()
    roots: set[str] = set()
    stack = [module]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        for imp in imports_of(m):
            if _first_party(imp.target):
                stack.extend(_loaded(imp.target))
            else:
                roots.add(imp.target.split(".")[0])
    return frozenset(roots)


def _numpy_only(module: str) -> bool:
    return not third_party_closure(module) & (JAX_OR_TF | RUNTIME_ONLY)


def _layer(module: str) -> str:
    return module.split(".")[0]


def _all_imports() -> list[Import]:
    return [imp for m in sorted(MODULES) for imp in imports_of(m)]


def _fmt(bad: list[str]) -> str:
    return "\n  " + "\n  ".join(bad)


def test_layers_every_package_is_known():
    assert {_layer(m) for m in MODULES} == set(PACKAGES)


def test_layers_runtime_never_reaches_jax_or_tensorflow():
    bad = [
        f"{m}: reaches {sorted(third_party_closure(m) & JAX_OR_TF)}"
        for m in MODULES
        if _layer(m) == "runtime" and third_party_closure(m) & JAX_OR_TF
    ]
    assert not bad, "runtime/ must run without JAX and TensorFlow:" + _fmt(bad)


def test_layers_imports_point_down_only():
    bad = []
    for imp in _all_imports():
        if not _first_party(imp.target):
            continue
        src, dst = _layer(imp.module), _layer(imp.target)
        where = f"{imp.module}:{imp.line} imports {imp.target}"
        if src == dst:
            continue
        if src == "runtime":
            # Upward, allowed only into the library's numpy-only modules (data, io, spec).
            if dst != "flexjax" or not all(_numpy_only(t) for t in _loaded(imp.target)):
                bad.append(f"{where} (runtime/ may import only numpy-only flexjax modules)")
        elif src == "flexjax" and dst == "runtime":
            if not _numpy_only(imp.target):
                bad.append(f"{where} (the library may import only numpy-only runtime modules)")
        elif src == "configs" and dst != "flexjax":
            bad.append(f"{where} (configs import only flexjax.config)")
        elif RANK[dst] > RANK[src] or dst == "configs":
            bad.append(f"{where} ({src}/ is below {dst}/)")
    assert not bad, "imports against the layers:" + _fmt(bad)


def test_layers_no_import_cycles_between_modules():
    graph = {
        m: sorted({imp.target for imp in imports_of(m) if imp.target in MODULES} - {m})
        for m in MODULES
    }
    cycles, state = [], {}

    def dfs(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n) :] + [m, n]))
            elif n not in state:
                dfs(n, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m, [])
    assert not cycles, "module import cycles:" + _fmt(cycles)


def test_layers_no_private_names_cross_modules():
    bad = []
    for m in sorted(MODULES):
        bound: dict[str, str] = {}  # local name -> first-party module it is bound to
        for imp in imports_of(m):
            if not _first_party(imp.target):
                continue
            last = imp.target.split(".")[-1]
            if imp.target != m and last.startswith("_") and not last.startswith("__"):
                bad.append(f"{m}:{imp.line} imports private module {imp.target}")
            for name in imp.names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{m}:{imp.line} imports {imp.target}.{name}")
            if not imp.names:
                bound[last] = imp.target
        with open(MODULES[m]) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{m}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not bad, "what modules share must be public:" + _fmt(sorted(set(bad)))


def test_layers_function_level_imports_say_why():
    bad = [
        f"{imp.module}:{imp.line} imports {imp.target} inside a function"
        for imp in _all_imports()
        if imp.in_function and not imp.has_reason
    ]
    assert not bad, (
        "an import inside a function needs a `# lazy: <reason>` comment on its line or the "
        "line above (an optional or slow dependency); otherwise import at the top:" + _fmt(bad)
    )


@pytest.mark.parametrize(
    ("module", "expected"),
    [("runtime.criteria", True), ("runtime.latency_model", True), ("flexjax.data", True),
     ("flexjax.training", False), ("runtime.lite", False)],
)  # fmt: skip
def test_layers_numpy_only_is_computed_from_imports(module, expected):
    assert _numpy_only(module) is expected
