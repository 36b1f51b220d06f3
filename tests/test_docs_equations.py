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


def _covered(cell: str):
    """The equation numbers a row's first cell names: "9–10" covers 9 and 10."""
    nums = set()
    for lo, hi in re.findall(r"(\d+)(?:\s*[–-]\s*(\d+))?", cell):
        nums.update(range(int(lo), int(hi or lo) + 1))
    return nums


def test_equation_map_covers_every_equation_1_to_31():
    covered = set().union(*(_covered(row[0]) for row in _rows() if row[0][:1].isdigit()))
    missing = sorted(set(range(1, 32)) - covered)
    assert not missing, f"docs/equations.md has no row for Eqs. {missing}"


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


# --- one citation style ------------------------------------------------------------------------

# the one style: "Eq. 16", "Eqs. 13–14" (an en dash), "Eqs. 27 and 31"; these are the others
_OFF_STYLE = [
    (re.compile(r"\bEqs?\.?\s*\(\d"), "parenthesised number, write Eq. 16"),
    (re.compile(r"\bEqs?\s+\d"), "no period, write Eq. 16"),
    (re.compile(r"\bEqs\.\s*\d+\s*-\s*\d"), "hyphen in a range, write Eqs. 13–14"),
    (re.compile(r"\bEquations?\s+\(?\d"), "spelled out, write Eq. 16"),
]
_CITING = [*sorted((ROOT / "minititans").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py")),
           *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "notebooks").glob("*.ipynb")),
           ROOT / "README.md"]


def test_equations_are_cited_in_one_greppable_style():
    """``grep "Eq. 16"`` finds every place that implements or explains Eq. 16."""
    bad = []
    for path in _CITING:
        if path.name == "test_docs_equations.py":
            continue  # the patterns above
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in _OFF_STYLE:
                for m in pattern.finditer(line):
                    bad.append(f"{path.relative_to(ROOT)}:{i}: {m.group(0)!r} ({why})")
    assert not bad, f"{len(bad)} citations off the style:\n" + "\n".join(bad[:40])
