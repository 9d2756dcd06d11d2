"""Sphinx configuration of the API reference: ``make docs`` builds docs/_build/html."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "at_jax"
author = "at_jax developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"  # what to call first, as each module's __all__ lists it
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # Flax modules' inherited docs would drown ours
napoleon_google_docstring = True
napoleon_numpy_docstring = False
myst_heading_anchors = 3
html_theme = "alabaster"
html_static_path: list[str] = []
nitpicky = False
