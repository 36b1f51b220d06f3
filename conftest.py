"""Execute the ```python blocks of README.md and docs/ with Sybil, so no example goes stale.

The blocks of one page share a namespace and run top to bottom, as a reader would run them;
each block asserts what its text claims. A block that must not run is preceded by the
comment ``<!-- skip: next -->``. Pytest collects these files when they are among its paths
(``testpaths`` in pyproject.toml, or ``pytest README.md docs``).
"""

import os

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

# The notebooks (run by nbmake in kernels started from this process) and the docs build read
# MINITITANS_FAST: the test suite always uses their fast settings.
os.environ.setdefault("MINITITANS_FAST", "1")

pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), SkipParser()],
    patterns=["README.md", "docs/*.md", "docs/*/*.md"],
).pytest()
