r"""mkdocs hooks: the notebooks (kept in ``notebooks/``, outside ``docs/``) and MathJax on the site.

* ``on_config`` sets ``MINITITANS_FAST=1`` (unless already set), so that mkdocs-jupyter runs
  every notebook in its fast mode at build time, and fills the nav's "Notebooks" section with
  every ``notebooks/*.ipynb``, titled by the notebook's first ``# heading``.
* ``on_files`` (before mkdocs-jupyter's own ``on_files``) adds those notebooks to the site's
  files as if they were in ``docs/notebooks/``; mkdocs-jupyter then converts and executes them.
* ``on_serve`` makes ``mkdocs serve`` reload when a notebook changes.
* ``on_page_content`` drops the Sphinx roles of the docstrings (``:func:`x``` -> ``x``):
  mkdocstrings renders docstrings as Markdown, where the role would show as text. On a
  notebook page it also puts the maths in the form the Markdown pages have (see below),
  removes the two scripts nbconvert adds, which load MathJax 2 and mermaid from CDNs, and
  shows a widget (notebook 4's slider) as the picture it drew, not as a CDN-drawn control.

No symlink and no copy: the notebooks stay where the tests (``pytest --nbmake``) find them.

**Maths, offline.** Every page's maths reaches the browser in one form: the one
``pymdownx.arithmatex`` (generic mode) writes, ``<span class="arithmatex">\(...\)</span>``
inline and ``<div class="arithmatex">\[...\]</div>`` displayed, which
``docs/javascripts/mathjax.js`` tells MathJax to typeset. The notebooks' Markdown cells
arrive from nbconvert with plain ``$...$`` and ``$$...$$``; :func:`math_to_arithmatex`
rewrites them (and the page's table of contents) into that form. MathJax itself is served
with the site: ``on_files`` adds the files of MathJax 3 that the pages use from the
installed ``django-static-mathjax`` wheel (the ``docs`` extra) under
``javascripts/mathjax/``, so opening a page makes no request outside the site.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SECTION = "Notebooks"

MATHJAX_DIR = "javascripts/mathjax"  # where the site serves MathJax (see mkdocs.yml)
# what the pages load from MathJax 3's es5/ folder: the combined TeX component, then what it
# fetches later: TeX extensions (autoload), MathML entities, the CHTML fonts, the menu and
# the accessibility tools the menu can switch on, with their speech rules
MATHJAX_FILES = ("tex-mml-chtml.js", "input/tex/extensions", "input/mml", "output/chtml", "ui",
                 "a11y", "sre")


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


def _mathjax_es5() -> Path:
    spec = importlib.util.find_spec("mathjax")
    root = Path(spec.origin).parent / "static" / "mathjax" if spec and spec.origin else None
    if root is None or not (root / "es5" / "tex-mml-chtml.js").is_file():
        raise PluginError("MathJax 3 is not installed: pip install -e '.[docs]' (it brings "
                          "django-static-mathjax, a wheel of MathJax's files)")
    return root


def _mathjax_files(config) -> list[File]:
    root = _mathjax_es5()
    out = [File.generated(config, f"{MATHJAX_DIR}/LICENSE", abs_src_path=str(root / "LICENSE"))]
    for name in MATHJAX_FILES:
        path = root / "es5" / name
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                rel = f.relative_to(root / "es5").as_posix()
                out.append(File.generated(config, f"{MATHJAX_DIR}/{rel}", abs_src_path=str(f)))
    return out


@event_priority(100)  # before mkdocs-jupyter wraps the .ipynb files
def on_files(files, config, **kwargs):
    for nb in _notebooks():
        files.append(File(f"notebooks/{nb.name}", src_dir=str(NOTEBOOKS.parent),
                          dest_dir=config.site_dir,
                          use_directory_urls=config.use_directory_urls))
    for f in _mathjax_files(config):
        files.append(f)
    return files


def on_serve(server, config, builder, **kwargs):
    if NOTEBOOKS.is_dir():
        server.watch(str(NOTEBOOKS))
    return server


_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):(?=<code>)")

# $$...$$ first (it may span lines), then $...$ on one line; "\$" is a literal dollar
_MATH = re.compile(r"(?<!\\)\$\$(?P<display>.+?)(?<!\\)\$\$"
                   r"|(?<![\\$])\$(?P<inline>[^$\n]+?)(?<!\\)\$", re.S)
# nbconvert's <script> blocks that load MathJax 2 and (when a cell has a diagram) mermaid
# from CDNs; the site has its own MathJax, and no notebook draws a mermaid diagram
_NBCONVERT_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->",
                                re.S)
_NBCONVERT_MERMAID = re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid'
                                r"(?:(?!</script>).)*?</script>", re.S)


def math_to_arithmatex(text: str, *, escape=html.escape) -> str:
    r"""``$a$`` -> ``<span class="arithmatex">\(a\)</span>``, ``$$a$$`` -> ``\[a\]`` likewise.

    ``text`` is plain text (a text node), which comes back escaped for HTML; or, with
    ``escape=str``, text that is HTML already (a table-of-contents title).
    """
    out, pos = [], 0
    for m in _MATH.finditer(text):
        out.append(escape(text[pos:m.start()]))
        if m.group("display") is not None:
            # a <span>, not arithmatex's <div>: the maths may sit inside a <p>; MathJax
            # displays \[...\] as a block all the same
            out.append(f'<span class="arithmatex">\\[{escape(m.group("display"))}\\]</span>')
        else:
            out.append(f'<span class="arithmatex">\\({escape(m.group("inline"))}\\)</span>')
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def _notebook_page(content: str) -> str:
    """Rewrite the maths of a notebook's Markdown cells and make its widgets static."""
    from bs4 import BeautifulSoup, NavigableString

    soup = BeautifulSoup(content, "html.parser")
    _static_widgets(soup)
    for cell in soup.select(".jp-RenderedMarkdown"):
        for node in list(cell.find_all(string=True)):
            # comments and CDATA are subclasses of NavigableString: leave them alone
            if type(node) is not NavigableString or not _MATH.search(node):
                continue
            if node.find_parent(["code", "pre", "script", "style"]) is None:
                node.replace_with(BeautifulSoup(math_to_arithmatex(str(node)), "html.parser"))
    return str(soup)


def _static_widgets(soup) -> None:
    """Replace each Jupyter widget by what its Output widgets hold, and drop the widget JS.

    A static page has no kernel, so a slider (``ipywidgets.interact``) cannot move; the
    html-manager that would draw it comes from a CDN. The picture the notebook drew at the
    slider's initial value is in the saved widget state: show that, with the slider values.
    """
    state = soup.find("script", type="application/vnd.jupyter.widget-state+json")
    models = json.loads(state.get_text())["state"] if state else {}
    for script in soup.find_all("script"):
        if "addWidgetsRenderer" in script.get_text():
            script.decompose()
    for view in soup.find_all("script", type="application/vnd.jupyter.widget-view+json"):
        out = soup.new_tag("div", attrs={"class": "widget-static"})
        settings, stack = [], [json.loads(view.get_text())["model_id"]]
        while stack:
            model = models.get(stack.pop(0), {})
            fields = model.get("state", {})
            if "description" in fields and "value" in fields:
                settings.append(f"{fields['description']} = {fields['value']}")
            for output in fields.get("outputs", []):
                data = output.get("data", {})
                if "image/png" in data:
                    out.append(soup.new_tag("img", src="data:image/png;base64,"
                                            + data["image/png"].replace("\n", "")))
                elif "text/plain" in data or "text" in output:
                    pre = soup.new_tag("pre")
                    pre.string = data.get("text/plain", output.get("text", ""))
                    out.append(pre)
            stack += [c.removeprefix("IPY_MODEL_") for c in fields.get("children", [])]
        note = soup.new_tag("p")
        note.string = ("A slider in Jupyter; here, the picture at "
                       + (", ".join(settings) or "its initial setting") + ".")
        out.insert(0, note)
        view.replace_with(out)
    if state:
        state.decompose()


def _toc_math(items) -> None:
    for item in items:
        item.title = math_to_arithmatex(item.title, escape=str)
        _toc_math(item.children)


def on_page_content(content, page, config, files, **kwargs):
    content = _ROLE.sub("", content)
    if page.file.src_uri.endswith(".ipynb"):
        content = _NBCONVERT_MERMAID.sub("", _NBCONVERT_MATHJAX.sub("", content))
        content = _notebook_page(content)
        _toc_math(page.toc)
    return content
