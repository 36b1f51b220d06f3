"""docs/equations.md maps equations to functions and tests: every name there must exist."""

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "docs" / "equations.md"


def _rows():
    rows = []
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and "`" in cells[2]:
            rows.append(cells)
    return rows


def _resolve(dotted: str):
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _test_names(path: Path):
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_equation_map_has_rows_for_the_memory_equations():
    eqs = {row[0] for row in _rows()}
    for eq in ("2", "3", "4", "5", "8", "9–10", "12", "13", "14", "15", "16", "17", "18"):
        assert eq in eqs, f"docs/equations.md has no row for Eq. {eq}"


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"Eq{r[0]}:{r[1][:30]}")
def test_every_function_and_test_named_in_the_equation_map_exists(row):
    _, _, functions, tests = row
    for name in re.findall(r"`([^`]+)`", functions):
        assert callable(_resolve(name)), name
    named_tests = re.findall(r"`([^`]+)`", tests)
    assert named_tests, f"no test named for {row[0]}"
    for ref in named_tests:
        file, _, func = ref.partition("::")
        path = ROOT / file
        assert path.exists(), ref
        assert func in _test_names(path), ref
