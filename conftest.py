"""Environment for every pytest run in this repository, notebooks included.

This file sits at the repository root because pytest loads a conftest.py only for the paths it
collects and their parents: ``tests/conftest.py`` is not loaded by ``pytest book/<chapter>.ipynb``,
this one always is. The variables are set at import time, before nbval starts any kernel, and the
kernels inherit them. Values already in the environment win.

- ``CAPSNET_PROFILE=smoke``: notebooks under test train for seconds, not minutes.
- ``CAPSNET_DATA``: the shared MNIST / Fashion-MNIST folder next to the checkout (``../shared/data``)
  when it exists, so tests never download.
- ``CAPSNET_CONV_CACHE=""``: ``capsnet.conv`` keeps its timed choices in the process, not in the
  user's cache file, so that no test depends on what an earlier run stored there.

``MPLBACKEND`` is deliberately *not* set: kernels must keep Jupyter's inline backend so that figures
are actually drawn (a drawing error then fails the test) and cells whose output nbval compares
produce the same outputs as the stored run. Only this pytest process uses the non-interactive Agg
backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

os.environ.setdefault("CAPSNET_PROFILE", "smoke")
os.environ.setdefault("CAPSNET_CONV_CACHE", "")

_shared_data = Path(__file__).resolve().parent.parent / "shared" / "data"
if "CAPSNET_DATA" not in os.environ and _shared_data.is_dir():
    os.environ["CAPSNET_DATA"] = str(_shared_data)

matplotlib.use("Agg")
