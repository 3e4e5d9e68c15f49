"""pytest configuration for tests/: markers and shared fixtures. (The environment every run needs,
notebooks included, is set in the repository root's conftest.py.)"""

from __future__ import annotations

import pytest
import torch


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


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: for small tensors that is much faster than two, and on a
    busy 2-core machine it avoids threads spinning against each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
