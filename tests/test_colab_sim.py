"""Every chapter runs in a simulated Colab: a fresh virtual environment with only Colab's packages,
the package installed by each chapter's own install cell from a built wheel with its book extra,
each chapter alone in a scratch folder, the reference runs downloaded from a local mirror
(tools/colab_sim.py says how). A few minutes on a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.colab_sim
def test_every_chapter_runs_in_a_simulated_colab():
    data = os.environ.get("CAPSNET_DATA")
    assert data and Path(data).is_dir(), (
        "the simulated Colab reads MNIST from $CAPSNET_DATA (or ../shared/data beside the checkout), "
        f"and there is none ({data!r}): set CAPSNET_DATA to the folder holding the data sets"
    )
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "colab_sim.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    print(done.stdout)  # each chapter's time: shown with pytest -rP
    assert done.returncode == 0, (
        f"chapters failed in the simulated Colab:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    )
