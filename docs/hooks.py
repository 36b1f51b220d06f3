"""mkdocs hooks: put the notebooks (which live in ``notebooks/``, outside ``docs/``) on the site.

* ``on_config`` sets ``MINITITANS_FAST=1`` (unless already set), so that mkdocs-jupyter runs
  every notebook in its fast mode at build time, and fills the nav's "Notebooks" section with
  every ``notebooks/*.ipynb``, titled by the notebook's first ``# heading``.
* ``on_files`` (before mkdocs-jupyter's own ``on_files``) adds those notebooks to the site's
  files as if they were in ``docs/notebooks/``; mkdocs-jupyter then converts and executes them.
* ``on_serve`` makes ``mkdocs serve`` reload when a notebook changes.
* ``on_page_content`` drops the Sphinx roles of the docstrings (``:func:`x``` -> ``x``):
  mkdocstrings renders docstrings as Markdown, where the role would show as text.

No symlink and no copy: the notebooks stay where the tests (``pytest --nbmake``) find them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SECTION = "Notebooks"


def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb")) if NOTEBOOKS.is_dir() else []


def _title(path: Path) -> str:
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return path.stem
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            for line in "".join(cell.get("source", [])).splitlines():
                if line.startswith("# "):
                    return line.lstrip("# ").strip() or path.stem
    return path.stem


def on_config(config, **kwargs):
    os.environ.setdefault("MINITITANS_FAST", "1")
    entries = [{_title(nb): f"notebooks/{nb.name}"} for nb in _notebooks()]
    nav = config.nav or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and SECTION in item:
            if entries:
                nav[i] = {SECTION: entries}
            else:
                del nav[i]
            break
    return config


@event_priority(100)  # before mkdocs-jupyter wraps the .ipynb files
def on_files(files, config, **kwargs):
    for nb in _notebooks():
        files.append(File(f"notebooks/{nb.name}", src_dir=str(NOTEBOOKS.parent),
                          dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    return files


def on_serve(server, config, builder, **kwargs):
    if NOTEBOOKS.is_dir():
        server.watch(str(NOTEBOOKS))
    return server


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")


def on_page_content(html, page, config, files, **kwargs):
    return _ROLE.sub("", html)
