"""Named run sizes. A profile fixes how much data, how many epochs and what batch size a run
uses; it never changes the architecture.

``smoke``: seconds, for tests and CI. ``cpu``: minutes, for a reader without a GPU.
``paper``: the paper's setup, for a GPU. The default is ``paper`` where CUDA is available and
``cpu`` otherwise; ``$CAPSNET_PROFILE`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Profile", "PROFILES", "get_profile"]


@dataclass(frozen=True)
class Profile:
    """How big a run is.

    name: the profile's name.
    train_size, test_size: examples drawn from each split (``None``: all of it).
    epochs: passes over the training examples.
    batch_size: examples per optimisation step.
    scale: a rough factor (1.0 for ``paper``) chapters use to size their own experiments.
    """

    name: str
    train_size: int | None
    test_size: int | None
    epochs: int
    batch_size: int
    scale: float


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", train_size=512, test_size=256, epochs=1, batch_size=64, scale=0.01),
    "cpu": Profile("cpu", train_size=12_000, test_size=10_000, epochs=2, batch_size=128, scale=0.1),
    "paper": Profile("paper", train_size=None, test_size=None, epochs=50, batch_size=128, scale=1.0),
}


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``; else ``$CAPSNET_PROFILE``; else chosen by the device."""
    name = name or os.environ.get("CAPSNET_PROFILE") or ("paper" if torch.cuda.is_available() else "cpu")
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            "(or unset CAPSNET_PROFILE to choose by device)"
        )
    return PROFILES[name]
