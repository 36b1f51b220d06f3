"""The notebooks are committed clean and open with what they show.

They are *run* by ``pytest --nbmake notebooks/`` (with ``MINITITANS_FAST=1`` for the quick
setting); this file only checks how they are stored: no outputs, no execution counts, and
a first markdown cell saying what you'll see, learn and need, with the part of the paper.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_without_outputs(path):
    code = [c for c in load(path)["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"{path.name}: code cell {i} has outputs"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {i} was executed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_with_see_learn_need_and_the_paper(path):
    first = load(path)["cells"][0]
    assert first["cell_type"] == "markdown", f"{path.name}: the first cell is not markdown"
    text = "".join(first["source"])
    for phrase in ("What you'll see", "What you'll learn", "What you'll need"):
        assert phrase in text, f"{path.name}: the first cell does not say {phrase!r}"
    assert re.search(r"Titans (Eqs?\.|Section|Figure|Fig\.) ?\d", text), (
        f"{path.name}: the first cell cites no Titans section, equation or figure")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_asserts_its_claims_and_draws(path):
    source = "\n".join("".join(c["source"]) for c in load(path)["cells"]
                       if c["cell_type"] == "code")
    assert re.search(r"^\s*assert ", source, re.M), f"{path.name} asserts nothing"
    assert "plt." in source or "plot_" in source, f"{path.name} draws nothing"
