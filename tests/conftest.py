"""pytest configuration for tests/: markers and shared fixtures. (The environment every run needs,
notebooks included, is set in the repository root's conftest.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "book_build: builds the HTML book with jupyter-book (about a minute); part of the default run, "
        "deselect with -m 'not book_build' while iterating",
    )
    config.addinivalue_line(
        "markers",
        "colab_sim: runs every chapter in a simulated Colab (tools/colab_sim.py: minutes); part of the "
        "default run, deselect with -m 'not colab_sim' while iterating",
    )
    config.addinivalue_line(
        "markers",
        "browser: opens the built book in headless Chromium (tests/test_browser.py: a few minutes); part "
        "of the default run, deselect with -m 'not browser' while iterating",
    )


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: for small tensors that is much faster than two, and on a
    busy 2-core machine it avoids threads spinning against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_book(out: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Build the HTML book from the repository into ``out`` (outside the repository), as CI does:
    warnings are errors (-W), and --keep-going reports all of them. Returns the finished process
    and the folder of the HTML pages."""
    command = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(REPO),
        "-W",
        "-n",
        "--keep-going",
        "--path-output",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    return result, out / "_build" / "html"


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The book built once per test session (``build_book``): ``(result, html_folder)``, shared by
    every test of the built book (tests/test_book.py, tests/test_browser.py)."""
    return build_book(tmp_path_factory.mktemp("book"))
