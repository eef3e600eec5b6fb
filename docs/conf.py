"""Sphinx configuration for cekd-losses."""

import cekd_losses

project = "cekd-losses"
author = "cekd-losses developers"
copyright = "2026, cekd-losses developers"
release = cekd_losses.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"cekd-losses {release}"
