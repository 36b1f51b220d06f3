"""The docs site builds with ``mkdocs build --strict``: no broken link, anchor or API page.

The build also executes every notebook (mkdocs-jupyter, ``MINITITANS_FAST=1``), so a notebook
that fails, or a docstring that mkdocstrings cannot render, fails this test. The Python
examples of the pages themselves are run separately, one test per block (Sybil, see the
root ``conftest.py``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocs_jupyter", reason="the docs extra is not installed")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")


@pytest.mark.slow
@pytest.mark.timeout(900)  # it executes every notebook
def test_docs_site_builds_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", MINITITANS_FAST="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=880,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    site = tmp_path / "site"
    for page in ("index.html", "tutorial/06-chunked/index.html", "api/memory/index.html",
                 "equations/index.html", "errata/index.html"):
        assert (site / page).is_file(), page
    # the API pages were generated from the docstrings, with their maths
    api = (site / "api" / "memory" / "index.html").read_text()
    assert 'id="minititans.memory.scan.memory_scan"' in api and 'class="arithmatex"' in api
