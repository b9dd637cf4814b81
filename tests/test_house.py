"""The house rules of `surgery/`, read from the source with `ast` (nothing is run).

- no import cycle among surgery's modules, counting imports inside functions;
- no private name (`_x`) taken from another module, by `from m import _x` or
  as an attribute `m._x` of an imported module;
- no module over `MAX_LINES` lines and no folder over `MAX_MODULES` modules;
- nothing at run time imports the test fixtures in `surgery/testing/`;
- imports go one way down `LAYERS` (docs/layout.md): a subpackage imports
  only from those after it in the line.

The checks are plain functions of a source tree, so the tests at the end can
show each one catching what it is meant to catch on a small made-up package.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
MAX_MODULES = 12  # per folder, not counting its __init__.py
# Subpackages from the command down to the numbers; `errors` and `validate`
# (top-level modules) sit below them all.
LAYERS = (
    "cli",
    "editing",
    "pruning",
    "verbs",
    "engines",
    "data",
    "files",
    "graph",
    "numerics",
    "runtime",
)
BOTTOM = {"surgery.errors", "surgery.validate"}
# `surgery.synthetic` is the name users' code has for surgery.testing.synthetic
MAY_IMPORT_TESTING = {"surgery.synthetic"}


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "surgery.files.models"
    path: Path
    tree: ast.Module
    lines: int

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"


def read_modules(root: Path, package: str = "surgery") -> dict[str, Module]:
    """Every `.py` file under `root/package`, parsed, by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, ast.parse(text), len(text.splitlines()))
    return modules


def _source(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Module]) -> str | None:
    """`name` if it is a module, else the longest module prefix of it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: Module, modules: dict[str, Module]) -> set[str]:
    """The surgery modules `module` imports, at the top or in any function.

    `from pkg import mod` counts as an import of `pkg.mod`, `from pkg import
    name` as one of `pkg` (its `__init__`). The parent packages Python runs
    on the way are not counted: they hold no code that imports back.
    """
    found = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            found |= {_owner(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = _source(module, node)
            for alias in node.names:
                found.add(_owner(f"{source}.{alias.name}", modules))
    return found - {None, module.name}


def import_cycles(modules: dict[str, Module]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (Tarjan)."""
    edges = {name: imported_modules(m, modules) for name, m in modules.items()}
    index, low, stack, cycles = {}, {}, [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return cycles


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(modules: dict[str, Module]) -> list[str]:
    """Private names one module takes from another, one line each."""
    found = []
    for module in modules.values():
        bound = {}  # local name -> the surgery module it stands for
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name not in modules:
                        continue
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:  # `import a.b.c` binds `a`
                        top = alias.name.partition(".")[0]
                        bound[top] = top
            elif isinstance(node, ast.ImportFrom):
                source = _source(module, node)
                if source not in modules:
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:
                        bound[alias.asname or alias.name] = full
                    elif _is_private(alias.name) and source != module.name:
                        found.append(f"{module.name} imports {full}")
        found += _private_attributes(module, bound, modules)
    return found


def _private_attributes(module, bound, modules) -> list[str]:
    """`m._x` where `m` is a surgery module bound by an import in `module`."""

    def module_of(expr):
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            parent = module_of(expr.value)
            if parent and f"{parent}.{expr.attr}" in modules:
                return f"{parent}.{expr.attr}"
        return None

    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = module_of(node.value)
            if owner and owner != module.name:
                found.append(f"{module.name} uses {owner}.{node.attr}")
    return found


def long_modules(modules: dict[str, Module]) -> list[str]:
    return [
        f"{m.name}: {m.lines} lines" for m in modules.values() if m.lines > MAX_LINES
    ]


def crowded_folders(modules: dict[str, Module], root: Path) -> list[str]:
    folders = {}
    for m in modules.values():
        if not m.is_package:
            folders.setdefault(m.path.parent.relative_to(root), []).append(m.name)
    return [
        f"{folder}/: {len(names)} modules"
        for folder, names in sorted(folders.items())
        if len(names) > MAX_MODULES
    ]


def fixture_imports(modules: dict[str, Module], package: str = "surgery") -> list[str]:
    """Modules outside `package.testing` that import the test fixtures."""
    testing = f"{package}.testing"
    return [
        f"{name} imports {target}"
        for name, m in modules.items()
        if not (name == testing or name.startswith(testing + "."))
        and name not in MAY_IMPORT_TESTING
        for target in sorted(imported_modules(m, modules))
        if target == testing or target.startswith(testing + ".")
    ]


# The rules, on surgery/ itself

MODULES = read_modules(ROOT)


def layer_breaches(modules: dict[str, Module], package: str = "surgery") -> list[str]:
    """Imports that go up `LAYERS`, or from `BOTTOM` into any subpackage."""

    def rank(name: str) -> int | None:
        parts = name.split(".")
        if name in {f"{package}.{b.split('.', 1)[1]}" for b in BOTTOM}:
            return len(LAYERS)
        if len(parts) > 2 and parts[1] in LAYERS:
            return LAYERS.index(parts[1])
        return None

    found = []
    for name, module in sorted(modules.items()):
        mine = rank(name)
        if mine is None:
            continue
        for target in sorted(imported_modules(module, modules)):
            theirs = rank(target)
            if theirs is not None and theirs < mine:
                found.append(f"{name} imports {target}, a layer above it")
    return found


def no_findings(findings: list) -> bool:
    """True when empty; else prints one finding a line for the failure report."""
    print(*findings, sep="\n")
    return not findings


def test_no_import_cycle():
    assert no_findings([" <-> ".join(c) for c in import_cycles(MODULES)])


def test_no_private_name_taken_from_another_module():
    assert no_findings(private_imports(MODULES))


def test_no_module_over_the_line_limit():
    assert no_findings(long_modules(MODULES))


def test_no_crowded_folder():
    assert no_findings(crowded_folders(MODULES, ROOT))


def test_run_time_code_does_not_import_the_test_fixtures():
    assert no_findings(fixture_imports(MODULES))


def test_imports_go_down_the_layers():
    assert no_findings(layer_breaches(MODULES))


def test_layer_check_catches_an_import_up_the_line(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/errors.py": "from pkg.graph import spots\n",
            "pkg/graph/__init__.py": "",
            "pkg/graph/spots.py": "def f():\n    from pkg.verbs import insert\n",
            "pkg/verbs/__init__.py": "",
            "pkg/verbs/insert.py": "from pkg.graph import spots\n",
        },
    )
    assert layer_breaches(modules, "pkg") == [
        "pkg.errors imports pkg.graph.spots, a layer above it",
        "pkg.graph.spots imports pkg.verbs.insert, a layer above it",
    ]


# The checks themselves, on a made-up package that breaks every rule once


def write_package(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return read_modules(root, "pkg")


def test_checks_catch_each_breach(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import B\nA = 1\n",
            # the import back sits in a function: still a cycle
            "pkg/b.py": "B = 2\ndef f():\n    from pkg import a\n    return a.A\n",
            "pkg/c.py": "from .a import _hidden\nimport pkg.b as bee\nx = bee._y\n",
            "pkg/d.py": "import pkg.sub.e\nx = pkg.sub.e._z\ny = pkg.sub.e.__name__\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/e.py": "import pkg.testing.f\n" + "\n" * MAX_LINES,
            "pkg/testing/__init__.py": "",
            "pkg/testing/f.py": "from pkg.a import A\n",
            **{f"pkg/many/m{i}.py": "" for i in range(MAX_MODULES + 1)},
        },
    )
    assert import_cycles(modules) == [["pkg.a", "pkg.b"]]
    assert sorted(private_imports(modules)) == [
        "pkg.c imports pkg.a._hidden",
        "pkg.c uses pkg.b._y",
        "pkg.d uses pkg.sub.e._z",
    ]
    assert long_modules(modules) == [f"pkg.sub.e: {MAX_LINES + 1} lines"]
    assert crowded_folders(modules, tmp_path) == [
        f"pkg/many/: {MAX_MODULES + 1} modules"
    ]
    assert fixture_imports(modules, "pkg") == ["pkg.sub.e imports pkg.testing.f"]


def test_checks_pass_a_tidy_package(tmp_path):
    modules = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def _own():\n    return 1\nx = _own()\n",
            "pkg/b.py": "from pkg import a\nfrom pkg.a import x\ny = a.x + x\n",
            "pkg/testing/f.py": "from pkg.b import y\n",
        },
    )
    assert import_cycles(modules) == []
    assert private_imports(modules) == []
    assert long_modules(modules) == []
    assert crowded_folders(modules, tmp_path) == []
    assert fixture_imports(modules, "pkg") == []
