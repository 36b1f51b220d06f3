"""The package's imports run one way: no module, and no subpackage, imports itself back.

Every module of ``minititans/`` is read with ``ast`` (nothing is imported), and every import
in it counts: at the top, inside functions, under ``if``/``try``; relative imports are
resolved against the module's package. Two graphs must be acyclic: the modules, and the
top-level units (``memory``, ``kernels``, ``models``, ... and the single-file modules), so
that for example ``memory`` ↔ ``kernels`` is a cycle even when no single module pair is.
The same walk checks that no function takes more than 12 positional parameters.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minititans"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str, known: set) -> set:
    """The modules of the package that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` also runs a and a.b; keep the deepest module that exists
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict:
    """``{module: set of package modules it imports}`` for every ``.py`` file below ``root``."""
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    known = set(paths)
    graph = {name: _imports(path, name, known) for name, path in paths.items()}
    # a submodule's parent package runs first, but that is not an import *by* the submodule:
    # drop the edges from a module to the packages that contain it
    return {name: {t for t in targets if not name.startswith(t + ".")}
            for name, targets in graph.items()}


def unit_graph(graph: dict) -> dict:
    """The same graph between top-level units (``minititans.memory``, ``minititans.io``, ...)."""
    def unit(name):
        return ".".join(name.split(".")[:2])

    units = {}
    for name, targets in graph.items():
        edges = units.setdefault(unit(name), set())
        edges.update(unit(t) for t in targets if unit(t) != unit(name))
    units.pop("minititans", None)  # the package's __init__ re-exports everything
    for edges in units.values():
        edges.discard("minititans")
    return units


def find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "minititans"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import c\n")
    (pkg / "c.py").write_text("import minititans.sub.a\n")
    graph = import_graph(pkg)
    assert graph["minititans.sub.a"] == {"minititans.b"}
    assert graph["minititans.b"] == {"minititans.c"}
    assert graph["minititans.c"] == {"minititans.sub.a"}
    assert find_cycle(graph) == ["minititans.b", "minititans.c", "minititans.sub.a",
                                 "minititans.b"]
    # a cycle between subpackages with none between modules: sub.a -> e -> sub.d
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from ..e import x\n")
    (pkg / "e.py").write_text("from .sub.d import y\n")
    (pkg / "sub" / "d.py").write_text("")
    graph = import_graph(pkg)
    assert find_cycle(graph) is None
    assert find_cycle(unit_graph(graph)) == ["minititans.e", "minititans.sub", "minititans.e"]


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "minititans.kernels.scan" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    units = unit_graph(import_graph())
    assert {"minititans.memory", "minititans.kernels"} <= set(units)
    cycle = find_cycle(units)
    assert cycle is None, "import cycle between parts of the package: " + " -> ".join(cycle)


@pytest.mark.parametrize("low", ["minititans.kernels", "minititans._checks", "minititans.errors"])
def test_low_level_parts_import_nothing_above_them(low):
    above = {"minititans.memory", "minititans.models", "minititans.attention",
             "minititans.linear_attention", "minititans.layers", "minititans.training"}
    units = unit_graph(import_graph())
    assert not units[low] & above, f"{low} imports {sorted(units[low] & above)}"


def test_no_function_takes_more_than_12_positional_parameters():
    # the kernels group their arguments in named tuples (minititans/kernels/layout.py)
    wide = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                count = len(node.args.posonlyargs) + len(node.args.args)
                if count > 12:
                    wide.append(f"{path.relative_to(PACKAGE)}:{node.lineno} ({count})")
    assert not wide, "functions with more than 12 positional parameters: " + ", ".join(wide)


def test_one_alias_rule_anp_for_autograd_numpy_np_for_numpy():
    """Inside the package ``np`` is always NumPy and ``anp`` always autograd.numpy."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    want = {"numpy": "np", "autograd.numpy": "anp"}.get(alias.name)
                    if want and (alias.asname or alias.name) != want:
                        wrong.append(f"{path.relative_to(PACKAGE)}: import {alias.name} as "
                                     f"{alias.asname}")
    assert not wrong, "\n".join(wrong)
