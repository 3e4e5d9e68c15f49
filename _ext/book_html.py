"""Fixes to the HTML pages of the book: a local Sphinx extension (``sphinx.local_extensions`` in
_config.yml).

Every inline script once. Sphinx 7.4, the last line that Jupyter Book 1.x can use, writes an
inline ``<script>`` that an extension adds after the builder has started twice (sphinx-doc/sphinx
pull request 13402 fixed it later: the builder compares ``None`` with ``''``). sphinx-thebe's
``const THEBE_JS_URL = ...`` declared twice is a SyntaxError in the console of every page.
"""

from __future__ import annotations

from typing import Any


def _key(script: Any) -> tuple:
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return (str(filename), tuple(sorted((name, str(value)) for name, value in attributes.items())))


def unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", unique_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
