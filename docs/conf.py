"""Sphinx configuration for the actorpool docs (Sphinx + MyST).

Build with ``tox -e docs`` or
``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import importlib.metadata

project = "actorpool"
author = "The actorpool developers"
copyright = "the actorpool developers"  # noqa: A001 (Sphinx's name)
try:
    release = importlib.metadata.version("actorpool")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    from actorpool import __version__ as release
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}

# Every cross-reference must resolve (a renamed class breaks the build), but
# the standard library's and pykka's types cannot: there is no network for
# intersphinx in CI. Private names in signatures are not documented on purpose.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(_thread|abc|collections\.abc|enum|os|queue|socket|pykka)\..*"),
    (r"py:.*", r"actorpool\..*\._\w+"),
]

html_theme = "alabaster"
html_title = f"actorpool {release}"
