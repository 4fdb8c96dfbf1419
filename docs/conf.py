"""Sphinx configuration of the spatlas documentation (no network access at build time)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "spatlas"
author = "spatlas developers"
copyright = "spatlas developers"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "spatlas_docs",  # writes reference/config.md and api/*.md from the code
]

# docstrings are numpy style
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autosummary_generate = False  # the API pages list every name themselves (spatlas_docs)
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"

# tutorials: MyST markdown notebooks, executed at every build
nb_execution_mode = "force"
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
# stderr (log lines, library warnings such as tqdm's IProgress notice) is not part of the pages
nb_output_stderr = "remove"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
suppress_warnings = ["mystnb.unknown_mime_type"]

html_theme = "furo"
html_title = "spatlas"
