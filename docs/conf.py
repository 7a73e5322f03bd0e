"""Sphinx configuration for the zproc documentation.

Build locally (no network needed)::

    pip install sphinx furo
    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# Let autodoc import the package from this checkout, without installing it.
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

try:
    import zproc

    release = getattr(zproc, "__version__", "dev")
except Exception:  # the docs must still build while the package is half written
    release = "dev"
version = release

project = "zproc"
author = "zproc developers"
copyright = "zproc developers, MIT License"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# Docstrings are numpy style (Parameters / Returns / Raises).
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}

nitpicky = False

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"
language = "en"

html_theme = "furo"
html_title = f"zproc {release}"
html_static_path: list[str] = []
