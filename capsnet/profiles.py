"""Named run sizes, and the size of every chapter's experiments under each of them.

A profile fixes how much data, how many epochs and what batch size a run uses; it never changes
the architecture of the model a chapter is about.

``smoke``: seconds, for tests and CI. ``cpu``: minutes, for a reader without a GPU (the stored
outputs). ``colab``: a free Colab GPU (a T4), every chapter in at most 10 minutes; the default
where CUDA is available. ``paper``: the paper's full setup, hours on a GPU; opt in with
``CAPSNET_PROFILE=paper`` (chapters print how long it will take before they start).
``$CAPSNET_PROFILE`` overrides the choice by device.

Every size a chapter uses lives in :data:`CHAPTER_SIZES`, one table, so that the cost of each
chapter under each profile can be computed and checked (:mod:`capsnet.budget`). Experiments that
run on the CPU whatever the machine (small models for which a GPU would not help) keep their
``cpu`` size under ``colab`` and ``paper``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["CHAPTER_SIZES", "PROFILES", "Profile", "chapter_sizes", "get_profile"]


@dataclass(frozen=True)
class Profile:
    """How big a run is.

    name: the profile's name.
    train_size, test_size: examples drawn from each split (``None``: all of it).
    epochs: passes over the training examples.
    batch_size: examples per optimisation step.
    meant_for: the hardware and time the profile is sized for.
    """

    name: str
    train_size: int | None
    test_size: int | None
    epochs: int
    batch_size: int
    meant_for: str


PROFILES: dict[str, Profile] = {
    "smoke": Profile("smoke", 512, 256, 1, 64, "seconds: the automated tests that check every chapter"),
    "cpu": Profile("cpu", 12_000, 10_000, 2, 128, "minutes on a laptop CPU; the stored outputs"),
    "colab": Profile("colab", None, None, 5, 128, "a free Colab GPU (T4): each chapter in at most 10 min"),
    "paper": Profile("paper", None, None, 50, 128, "the paper's setup: hours on a GPU (opt-in)"),
}


def _default_name() -> str:
    """``$CAPSNET_PROFILE`` if set, else ``colab`` where CUDA is available and ``cpu`` otherwise."""
    return os.environ.get("CAPSNET_PROFILE") or ("colab" if torch.cuda.is_available() else "cpu")


def get_profile(name: str | None = None) -> Profile:
    """The profile called ``name``; else ``$CAPSNET_PROFILE``; else chosen by the device."""
    name = name or _default_name()
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            "(or unset CAPSNET_PROFILE to choose by device)"
        )
    return PROFILES[name]


def _cpu_only(smoke: dict[str, Any], cpu: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sizes of an experiment that runs on the CPU on every machine: ``cpu`` beyond ``smoke``."""
    return {"smoke": smoke, "cpu": cpu, "colab": cpu, "paper": cpu}


# Chapter number -> profile -> the sizes its notebook reads with chapter_sizes(n). Chapters whose
# computations are small and fixed (2, 3, 4, 5, 7, 13) have no entry.
CHAPTER_SIZES: dict[int, dict[str, dict[str, Any]]] = {
    # A small CNN on 32x32 toy faces, trained on the CPU: images per class, steps of 64, seeds.
    1: _cpu_only(
        smoke={"n_per_class": 400, "steps": 200, "seeds": 1},
        cpu={"n_per_class": 1_000, "steps": 600, "seeds": 3},
    ),
    # Six CapsNets, r = 1..5 (gradient through the last iteration) and r = 3 (through all), each
    # trained from every seed: training / test images, epochs, batch, seeds, images whose routing
    # is inspected, the model's size (smaller CapsNets on a CPU; {} is the paper's).
    6: {
        "smoke": {
            "seeds": (0, 1),
            "n_train": 128,
            "n_test": 128,
            "epochs": 1,
            "batch_size": 64,
            "n_inspect": 64,
            "model": {"conv_channels": 16, "primary_types": 4, "decoder_hidden": (64, 128)},
        },
        "cpu": {
            "seeds": (0, 1, 2),
            "n_train": 4_000,
            "n_test": 2_000,
            "epochs": 1,
            "batch_size": 64,
            "n_inspect": 1_000,
            "model": {"conv_channels": 32, "primary_types": 8},
        },
        "colab": {
            "seeds": (0, 1, 2),
            "n_train": 20_000,
            "n_test": 10_000,
            "epochs": 1,
            "batch_size": 128,
            "n_inspect": 1_000,
            "model": {},
        },
        "paper": {
            "seeds": (0, 1, 2),
            "n_train": 60_000,
            "n_test": 10_000,
            "epochs": 5,
            "batch_size": 128,
            "n_inspect": 1_000,
            "model": {},
        },
    },
    # Two small CapsNets (64 Conv1 channels, 8 primary types) trained on the CPU with the margin
    # loss at two values of lambda: steps of 32 images each.
    8: _cpu_only(smoke={"steps": 15}, cpu={"steps": 150}),
    # The live training run of the paper's CapsNet: a recipe of capsnet.train.RECIPES (None: the
    # paper's) and options that override it (a profile's name takes its sizes, as in TrainConfig).
    # On a CPU the fast recipe (>= 99% in minutes); on a GPU the profile's epochs of all of MNIST.
    9: {
        "smoke": {
            "recipe": "fast",
            "options": {"steps": 8, "train_size": 512, "test_size": 256, "val_size": 256},
        },
        "cpu": {"recipe": "fast", "options": {}},
        "colab": {"recipe": None, "options": {"profile": "colab"}},
        "paper": {"recipe": None, "options": {"profile": "paper"}},
    },
    # Chapter 10, all on the CPU: test digits transformed for the equivariance measurements, and
    # for the routing statistics; the two small CNNs compared with the reference model (training
    # images, epochs; the CNN without global pooling is trained once per seed).
    10: _cpu_only(
        smoke={"n_equivariance": 48, "n_routing": 64, "cnn_train": 512, "cnn_epochs": 1, "seeds": (0, 1, 2)},
        cpu={
            "n_equivariance": 200,
            "n_routing": 300,
            "cnn_train": 55_000,
            "cnn_epochs": 1,
            "seeds": (0, 1, 2),
        },
    ),
    # MultiMNIST (36x36 pairs): training pairs, test pairs, epochs.
    11: {
        "smoke": {"train_pairs": 256, "test_pairs": 128, "epochs": 1},
        "cpu": {"train_pairs": 6_000, "test_pairs": 2_000, "epochs": 1},
        "colab": {"train_pairs": 60_000, "test_pairs": 10_000, "epochs": 2},
        "paper": {"train_pairs": 600_000, "test_pairs": 10_000, "epochs": 10},
    },
    # Test images the reference model is routed on (0: the whole test set).
    12: {
        "smoke": {"n_test": 256},
        "cpu": {"n_test": 0},
        "colab": {"n_test": 0},
        "paper": {"n_test": 0},
    },
    # MatrixCapsNet against CapsNet on the same images: training images, epochs, batch, test
    # images, monitored test images and how often (in steps), the share of those steps a run
    # with three EM iterations gets, and the MatrixCapsNet's size ({}: the package default).
    14: {
        "smoke": {
            "n_train": 192,
            "epochs": 1,
            "batch_size": 32,
            "n_test": 256,
            "n_monitor": 128,
            "monitor_every": 2,
            "r3_fraction": 1 / 3,
            "em_model": {},
        },
        "cpu": {
            "n_train": 6_000,
            "epochs": 1,
            "batch_size": 32,
            "n_test": 2_000,
            "n_monitor": 500,
            "monitor_every": 25,
            "r3_fraction": 1 / 3,
            "em_model": {},
        },
        "colab": {
            "n_train": 20_000,
            "epochs": 1,
            "batch_size": 32,
            "n_test": 10_000,
            "n_monitor": 1_000,
            "monitor_every": 100,
            "r3_fraction": 1 / 3,
            "em_model": {},
        },
        "paper": {
            "n_train": 60_000,
            "epochs": 10,
            "batch_size": 32,
            "n_test": 10_000,
            "n_monitor": 1_000,
            "monitor_every": 500,
            "r3_fraction": 1.0,
            "em_model": {"channels": 64, "primary_types": 8, "caps1_types": 16, "caps2_types": 16},
        },
    },
    # Timings: batch of the timed steps, timed rounds, batches of the memory test, images of the
    # data-loading test, whether torch.compile is tried, the side of the reference matmul
    # (None: the device's default, capsnet.bench.MATMUL_SIZE).
    15: {
        "smoke": {
            "batch": 4,
            "repeats": 1,
            "memory_batches": (2, 4),
            "data_images": 512,
            "compile": False,
            "matmul": 256,
        },
        "cpu": {
            "batch": 32,
            "repeats": 5,
            "memory_batches": (8, 32, 100),
            "data_images": 12_000,
            "compile": True,
            "matmul": None,
        },
        "colab": {
            "batch": 128,
            "repeats": 10,
            "memory_batches": (32, 100, 256),
            "data_images": 60_000,
            "compile": True,
            "matmul": None,
        },
        "paper": {
            "batch": 128,
            "repeats": 20,
            "memory_batches": (32, 100, 256),
            "data_images": 60_000,
            "compile": True,
            "matmul": None,
        },
    },
}


def chapter_sizes(chapter: int, profile: str | Profile | None = None) -> MappingProxyType:
    """The sizes chapter ``chapter``'s experiments use under ``profile`` (default: the current
    profile, :func:`get_profile`), as a read-only mapping.

    >>> chapter_sizes(11, "cpu")["train_pairs"]
    6000
    """
    name = profile.name if isinstance(profile, Profile) else get_profile(profile).name
    if chapter not in CHAPTER_SIZES:
        raise KeyError(f"chapter {chapter} has no sizes: chapters with sizes are {sorted(CHAPTER_SIZES)}")
    return MappingProxyType(CHAPTER_SIZES[chapter][name])
