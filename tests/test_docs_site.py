"""The docs site builds with ``mkdocs build --strict`` and reads offline, as built.

The build also executes every notebook (mkdocs-jupyter, ``MINITITANS_FAST=1``), so a notebook
that fails, or a docstring that mkdocstrings cannot render, fails these tests. The site is
built once (the ``site`` fixture) and then read page by page:

* no page or stylesheet makes the browser fetch anything from outside the site (no web
  fonts, no CDN script, style or font): the maths must render with the network off;
* every formula is in the one form the bundled MathJax typesets (``docs/javascripts/
  mathjax.js``: an element of class ``arithmatex`` holding ``\\(...\\)`` or ``\\[...\\]``),
  notebooks and tables of contents included; no ``$...$`` is left in the text;
* no page shows a Python warning, a traceback, a notebook's stderr, or a path of the machine
  that built it.

The Python examples of the pages themselves are run separately, one test per block (Sybil,
see the root ``conftest.py``).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocs_jupyter", reason="the docs extra is not installed")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")
bs4 = pytest.importorskip("bs4", reason="the docs extra is not installed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # the build executes every notebook

MATHJAX = "javascripts/mathjax/tex-mml-chtml.js"
MATHJAX_CONFIG = "javascripts/mathjax.js"
# elements that load what their attribute names as the page opens (an <a href> does not)
FETCHED = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src",
           "audio": "src", "video": "src", "embed": "src", "object": "data", "track": "src",
           "image": "href", "use": "href"}
EXTERNAL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.I)  # http://, https://, //host
CSS_URL = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:[a-z][a-z0-9+.-]*:)?//[^'")\s]+)""",
                     re.I)
SCRIPT_URL = re.compile(r"""['"`]((?:https?:)?//[^'"`\s]+)""")  # a URL literal in a script
# maths MathJax would not see: dollars (nbconvert's form) or bare TeX delimiters outside
# an .arithmatex element
RAW_MATH = re.compile(r"\$[^$\n]+\$|\\[()\[\]]")
# what a warning or an error prints: "file.py:21: TqdmWarning: ...", a traceback
SHOWN_WARNING = re.compile(r":\d+: \w*(?:Warning|Error)\b|Traceback \(most recent call last\)")
# text not shown to a reader, or shown as code (MathJax skips code too)
NOT_PROSE = ("script", "style", "code", "pre", "kbd", "samp", "textarea")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", MINITITANS_FAST="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=880,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return out


def _pages(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 30, "the site has fewer pages than the nav"
    for page in pages:
        yield page.relative_to(site).as_posix(), bs4.BeautifulSoup(page.read_text(), "html.parser")


def _texts(soup, skip=()):
    """The text nodes of ``soup`` (comments and CDATA left out) not inside ``skip``."""
    for node in soup.find_all(string=True):
        if type(node) is not bs4.NavigableString:
            continue
        if skip and node.find_parent(skip) is not None:
            continue
        yield node


def test_docs_site_builds_strict(site):
    for page in ("index.html", "tutorial/06-chunked/index.html", "api/memory/index.html",
                 "equations/index.html", "errata/index.html", "guide/own-data/index.html",
                 "guide/save-load/index.html", "api/io/index.html"):
        assert (site / page).is_file(), page
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        assert (site / "notebooks" / nb.stem / "index.html").is_file(), nb.name
    # the API pages were generated from the docstrings, with their maths
    api = (site / "api" / "memory" / "index.html").read_text()
    assert 'id="minititans.memory.scan.memory_scan"' in api and 'class="arithmatex"' in api


def test_no_page_or_stylesheet_fetches_from_outside_the_site(site):
    problems = []
    for name, soup in _pages(site):
        for tag, attr in FETCHED.items():
            for el in soup.find_all(tag):
                for value in (el.get(attr), el.get("xlink:href"), el.get("srcset")):
                    if value and EXTERNAL.match(value):
                        problems.append(f"{name}: <{tag} {attr}={value!r}>")
        for el in soup.find_all("style"):
            problems += [f"{name}: <style> {u}" for u in CSS_URL.findall(el.get_text())]
        for el in soup.find_all(style=True):
            problems += [f"{name}: style= {u}" for u in CSS_URL.findall(el["style"])]
        for el in soup.find_all("script", src=False):
            problems += [f"{name}: inline <script> {u}" for u in SCRIPT_URL.findall(el.get_text())]
        # material's bundle loads mermaid from a CDN when a page has a diagram: none may
        if soup.select(".mermaid, pre.mermaid"):
            problems.append(f"{name}: a mermaid diagram (rendered from a CDN)")
    for css in sorted(site.rglob("*.css")):
        problems += [f"{css.relative_to(site)}: {u}" for u in CSS_URL.findall(css.read_text())]
    assert not problems, "\n".join(problems[:40])


def test_every_formula_is_in_the_form_the_bundled_mathjax_typesets(site):
    assert (site / MATHJAX).is_file(), "MathJax is not copied into the site"
    assert (site / "javascripts/mathjax/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff"
            ).is_file(), "MathJax's fonts are not copied into the site"
    config = (site / MATHJAX_CONFIG).read_text()
    assert 'processHtmlClass: "arithmatex"' in config
    assert 'inlineMath: [["\\\\(", "\\\\)"]]' in config
    assert 'displayMath: [["\\\\[", "\\\\]"]]' in config

    problems, with_math = [], 0
    for name, soup in _pages(site):
        formulas = soup.select(".arithmatex")
        for el in formulas:
            tex = el.get_text().strip()
            if not (tex.startswith("\\(") and tex.endswith("\\)")
                    or tex.startswith("\\[") and tex.endswith("\\]")):
                problems.append(f"{name}: .arithmatex without \\( \\) or \\[ \\]: {tex[:60]!r}")
        for node in _texts(soup, NOT_PROSE):
            if node.find_parent(class_=["arithmatex", "clipboard-copy-txt"]) is not None:
                continue  # typeset, or the hidden text a notebook's copy button copies
            for m in RAW_MATH.finditer(node):
                problems.append(f"{name}: raw TeX {node[max(0, m.start() - 30):m.end() + 30]!r}")
        if formulas:
            with_math += 1
            scripts = [s.get("src", "") for s in soup.find_all("script")]
            loaded = [i for i, s in enumerate(scripts)
                      if s.endswith(MATHJAX_CONFIG) or s.endswith(MATHJAX)]
            if [scripts[i].endswith(MATHJAX) for i in loaded] != [False, True]:
                problems.append(f"{name}: does not load {MATHJAX_CONFIG} then {MATHJAX}")
    assert with_math > 20, f"only {with_math} pages have maths: the check saw no notebooks?"
    assert not problems, "\n".join(problems[:40])


def test_no_page_shows_a_warning_or_a_path_of_the_build_machine(site):
    local = re.compile("|".join([re.escape(str(ROOT)), re.escape(sys.prefix), r"site-packages",
                                 r"(?<![\w.~-])/(?:home|root|tmp|Users|private/var)/",
                                 r"\b[A-Z]:\\Users\\"]))
    problems = []
    for name, soup in _pages(site):
        for el in soup.select('[data-mime-type="application/vnd.jupyter.stderr"]'):
            problems.append(f"{name}: a notebook cell printed to stderr: {el.get_text()[:120]!r}")
        for node in _texts(soup, ("script", "style")):
            for pattern in (SHOWN_WARNING, local):
                if m := pattern.search(node):
                    problems.append(f"{name}: {node[max(0, m.start() - 60):m.end() + 60]!r}")
        for el in soup.find_all(href=True) + soup.find_all(src=True):
            if local.search(el.get("href", "") + el.get("src", "")):
                problems.append(f"{name}: <{el.name}> links to a local path")
    assert not problems, "\n".join(problems[:40])


def test_api_pages_list_the_public_api_and_no_private_name(site):
    """Each API page lists its modules' public members by name (docs/api/*.md): keep the
    lists whole — every name of ``minititans.__all__`` has an entry — and free of helpers."""
    import minititans

    ids, problems = set(), []
    for name, soup in _pages(site):
        if not name.startswith("api/"):
            continue
        for heading in soup.select(".doc-heading[id]"):
            ids.add(heading["id"])
            label = heading.select_one(".doc-object-name:not(.doc-module-name)")
            if label is not None and label.get_text(strip=True).startswith("_"):
                problems.append(f"{name}: private {heading['id']}")
    for public in sorted(minititans.__all__):
        obj = getattr(minititans, public)
        if callable(obj) and hasattr(obj, "__qualname__"):  # functions and classes
            found = f"{obj.__module__}.{obj.__qualname__}" in ids
        else:  # constants
            found = any(i.endswith(f".{public}") for i in ids)
        if not found:
            problems.append(f"minititans.{public} has no entry on the API pages")
    for io_name in ("save_memory_state", "load_memory_state"):
        if f"minititans.io.{io_name}" not in ids:
            problems.append(f"minititans.io.{io_name} has no entry on the API pages")
    assert not problems, "\n".join(problems)
