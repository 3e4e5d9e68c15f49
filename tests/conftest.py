"""pytest configuration for tests/: the markers its tests use. (The environment every run needs,
notebooks included, is set in the repository root's conftest.py.)"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "book_build: builds the HTML book with jupyter-book (about a minute); part of the default run, "
        "deselect with -m 'not book_build' while iterating",
    )
