"""How long each chapter takes under each profile, estimated from the arithmetic its experiments
do, and whether that fits the time the book promises.

An estimate is ``setup + sum over experiments of (FLOPs / rate + steps x overhead)``:

- FLOPs come from the models' shapes (:func:`capsnet.bench.flops_per_image` for CapsNets, forward
  hooks or torch's FLOP counter for the others) times the images each experiment trains on or
  evaluates, with the sizes of :data:`capsnet.profiles.CHAPTER_SIZES`;
- every batch also costs a fixed overhead (Python, kernel launches, routing's many small kernels),
  which dominates for small models;
- every chapter pays :data:`SETUP_SECONDS` for imports, data loading and figures.

The rates are deliberately conservative, stated in :data:`MACHINES`: a Colab T4 is taken to do
4 TFLOP/s of useful fp16 work on CapsNet training (its tensor cores peak at 65), its two CPU
cores 20 GFLOP/s; a laptop CPU 80 GFLOP/s, about what a 4-core laptop of recent years does in
fp32 (this book's 2-core development machine measures 60-110 GFLOP/s on CapsNet training in
fp32 and more in bf16: ``python -m capsnet bench``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .bench import flops_per_image, layer_multiply_adds
from .matrix_capsules import MatrixCapsNet
from .models import CapsNet
from .profiles import PROFILES, Profile, chapter_sizes, get_profile

__all__ = [
    "BUDGETS",
    "MACHINES",
    "Machine",
    "Work",
    "announce",
    "chapter_seconds",
    "chapter_work",
    "estimate_line",
    "training_estimate",
]

SETUP_SECONDS = 60.0


@dataclass(frozen=True)
class Work:
    """One experiment of a chapter.

    what: a few words for reports. flops: its arithmetic. steps: batches it processes (training
    steps or evaluation batches), each paying a fixed overhead. on: ``"device"`` (the GPU under
    ``colab`` and ``paper`` where one is present) or ``"cpu"`` (always the CPU). step_cost:
    overhead of one step relative to a CapsNet step (EM routing launches many more kernels).
    """

    what: str
    flops: float
    steps: int
    on: str = "device"
    step_cost: float = 1.0


@dataclass(frozen=True)
class Machine:
    """Conservative rates of a machine: useful FLOP/s and seconds of overhead per step, on its
    accelerator (``device``) and on its CPU."""

    name: str
    device_flops: float
    device_step_seconds: float
    cpu_flops: float
    cpu_step_seconds: float

    def seconds(self, work: Work) -> float:
        if work.on == "cpu":
            return work.flops / self.cpu_flops + work.steps * work.step_cost * self.cpu_step_seconds
        return work.flops / self.device_flops + work.steps * work.step_cost * self.device_step_seconds


MACHINES: dict[str, Machine] = {
    "t4": Machine("a Colab T4 GPU", 4e12, 0.02, 20e9, 0.005),
    "laptop": Machine("a laptop CPU", 80e9, 0.005, 80e9, 0.005),
}

# Profile -> (the machine it is meant for, seconds a chapter may take there). ``paper`` has no
# budget: it is the paper's full setup, and chapters print how long it will take.
BUDGETS: dict[str, tuple[str, float]] = {
    "smoke": ("laptop", 120.0),
    "cpu": ("laptop", 15 * 60.0),
    "colab": ("t4", 10 * 60.0),
}
MACHINE_OF_PROFILE = {**{name: machine for name, (machine, _) in BUDGETS.items()}, "paper": "t4"}


def _batches(images: int, batch_size: int) -> int:
    return math.ceil(images / batch_size)


def _capsnet(**kwargs: Any) -> dict[str, float]:
    return _capsnet_flops(tuple(sorted(kwargs.items())))


@functools.cache
def _capsnet_flops(kwargs: tuple[tuple[str, Any], ...]) -> dict[str, float]:
    return flops_per_image(CapsNet(**dict(kwargs)))


def _cnn_flops(model: nn.Module, input_size: int) -> float:
    """Forward FLOPs per image of a CNN (its Conv2d and Linear layers)."""
    return 2.0 * sum(layer_multiply_adds(model, input_size))


def _matrix_capsnet_forward_flops(**kwargs: Any) -> float:
    """Forward FLOPs per image of a MatrixCapsNet, counted by torch on one image."""
    model = MatrixCapsNet(**kwargs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    return float(counter.get_total_flops())


def _train(what: str, flops: dict[str, float], images: int, batch: int, on: str = "device") -> Work:
    return Work(what, flops["training"] * images, _batches(images, batch), on)


def _test(what: str, flops: dict[str, float], images: int, on: str = "device", batch: int = 256) -> Work:
    return Work(what, flops["forward"] * images, _batches(images, batch), on)


def _chapter1(s: Any, p: Profile) -> list[Work]:
    # Three trainings per seed (global pool; no global pool; scrambled negatives) of a CNN with
    # 3x3 convolutions 1->8, 8->16, 16->16 on 32x32 faces; 64 images a step.
    cnn = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(16 * 8 * 8, 1),
    )  # fmt: skip
    forward = _cnn_flops(cnn, 32)
    runs = 3 * s["seeds"]
    return [Work("face CNNs", runs * s["steps"] * 64 * 3 * forward, runs * s["steps"], "cpu")]


def _chapter6(s: Any, p: Profile) -> list[Work]:
    work = []
    seeds = len(s["seeds"])
    for r, gradient in [(1, "last"), (2, "last"), (3, "last"), (4, "last"), (5, "last"), (3, "all")]:
        flops = _capsnet(**s["model"], routing_iterations=r, routing_gradient=gradient)
        images = seeds * s["n_train"] * s["epochs"]
        work.append(_train(f"CapsNet r={r} ({gradient}), {seeds} seeds", flops, images, s["batch_size"]))
        work.append(_test(f"test r={r}", flops, seeds * s["n_test"]))
    routing = _capsnet(**s["model"], routing_iterations=8)
    work.append(_test("routing traces", routing, 4 * s["n_inspect"]))
    return work


def _chapter8(s: Any, p: Profile) -> list[Work]:
    flops = _capsnet(conv_channels=64, primary_types=8)
    return [_train(f"small CapsNet, lambda={lam}", flops, s["steps"] * 32, 32, "cpu") for lam in (1.0, 0.5)]


def _chapter9(s: Any, p: Profile) -> list[Work]:
    from .train import RECIPES

    options = {**(RECIPES[s["recipe"]] if s["recipe"] else {}), **s["options"]}
    sizes = PROFILES[options.get("profile", p.name)]
    batch = options.get("batch_size", sizes.batch_size)
    train_size = options.get("train_size", sizes.train_size) or 60_000 - options.get("val_size", 0)
    test_size = options.get("test_size", sizes.test_size) or 10_000
    flops = _capsnet()
    if "steps" in options:
        frozen = options.get("freeze_conv1_after")
        per_image = flops["training"]
        if frozen is not None:  # the steps after the freeze skip two of the convolution passes
            per_image = frozen * per_image + (1 - frozen) * flops["training_conv1_frozen"]
        run = Work("live training run", per_image * options["steps"] * batch, options["steps"])
        tests = 1
    else:
        epochs = options.get("epochs", sizes.epochs)
        run = _train("live training run", flops, train_size, batch)
        run, tests = Work(run.what, run.flops * epochs, run.steps * epochs), epochs
    checked = tests * (test_size + options.get("val_size", 0))
    return [run, _test("live run's tests", flops, checked)]


def _chapter10(s: Any, p: Profile) -> list[Work]:
    flops = _capsnet()
    convs = [
        nn.Conv2d(1, 32, 5, padding=2), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
    ]  # fmt: skip
    pooled_cnn = nn.Sequential(*convs, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    map_cnn = nn.Sequential(*convs, nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.Linear(128, 10))
    images = s["cnn_train"] * s["cnn_epochs"]
    transforms = 2 * 7 + 7  # horizontal and vertical shifts, rotations
    return [
        _test("reference model on test digits", flops, 500 + s["n_routing"], "cpu"),
        _test(
            "equivariance", flops, (transforms + 1) * s["n_equivariance"], "cpu", batch=s["n_equivariance"]
        ),
        Work("pooled CNN", 3 * _cnn_flops(pooled_cnn, 28) * images, _batches(images, 128), "cpu"),
        Work(
            "CNNs without global pooling",
            3 * _cnn_flops(map_cnn, 28) * images * len(s["seeds"]),
            _batches(images, 128) * len(s["seeds"]),
            "cpu",
        ),
    ]


def _chapter11(s: Any, p: Profile) -> list[Work]:
    flops = _capsnet(input_size=36)
    images = s["train_pairs"] * s["epochs"]
    tests = s["test_pairs"] * (s["epochs"] + 1)
    return [
        _train("MultiMNIST from scratch", flops, images, 64),
        _test("its tests", flops, tests),
        _train("MultiMNIST with pretrained convolutions", flops, images, 64),
        _test("its tests", flops, tests),
    ]


def _chapter12(s: Any, p: Profile) -> list[Work]:
    flops = _capsnet(routing_iterations=5)
    return [_test("reference model routed with r = 1..5", flops, s["n_test"] or 10_000, "cpu", batch=100)]


def _chapter14(s: Any, p: Profile) -> list[Work]:
    em = 3 * _matrix_capsnet_forward_flops(iterations=2, **s["em_model"])
    em3 = 3 * _matrix_capsnet_forward_flops(iterations=3, **s["em_model"])
    caps = _capsnet()
    images, batch = s["n_train"] * s["epochs"], s["batch_size"]
    steps = _batches(s["n_train"], batch) * s["epochs"]
    monitored = (steps // s["monitor_every"] + 1) * s["n_monitor"]
    share = s["r3_fraction"]
    return [
        Work("MatrixCapsNet, 2 EM iterations", em * images, steps, step_cost=5.0),
        Work("MatrixCapsNet, 3 EM iterations", em3 * images * share, round(steps * share), step_cost=5.0),
        _train("CapsNet", caps, images, batch),
        Work("monitoring and tests", (em + caps["training"]) / 3 * (monitored + 2 * s["n_test"]), 0),
    ]


def _chapter15(s: Any, p: Profile) -> list[Work]:
    flops = _capsnet()
    steps = 60 * s["repeats"]  # stages, routing iterations, precisions and memory: ~60 timed steps a round
    work = [_train("timed training steps", flops, steps * s["batch"], s["batch"])]
    if s["compile"]:
        work.append(Work("torch.compile", 0, 6_000))  # compilation: about two minutes on a T4
    return work


CHAPTER_WORK: dict[int, Callable[[Any, Profile], list[Work]]] = {
    1: _chapter1,
    6: _chapter6,
    8: _chapter8,
    9: _chapter9,
    10: _chapter10,
    11: _chapter11,
    12: _chapter12,
    14: _chapter14,
    15: _chapter15,
}
CHAPTERS = range(1, 16)


def chapter_work(chapter: int, profile: str | Profile | None = None) -> list[Work]:
    """The experiments chapter ``chapter`` runs under ``profile``, with their arithmetic."""
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    if chapter not in CHAPTER_WORK:
        return []
    return CHAPTER_WORK[chapter](chapter_sizes(chapter, p), p)


def chapter_seconds(chapter: int, profile: str | Profile | None = None, machine: str | None = None) -> float:
    """Estimated wall time of chapter ``chapter`` under ``profile`` on ``machine`` (a key of
    :data:`MACHINES`; default: the machine the profile is meant for)."""
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    rates = MACHINES[machine or MACHINE_OF_PROFILE[p.name]]
    return SETUP_SECONDS + sum(rates.seconds(work) for work in chapter_work(chapter, p))


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def estimate_line(chapter: int, profile: str | Profile | None = None) -> str:
    """The chapter's profile and how long it should take, in one line. Under ``paper`` it warns
    that the chapter takes the paper's time and says how to get the short version."""
    p = profile if isinstance(profile, Profile) else get_profile(profile)
    machine = MACHINES[MACHINE_OF_PROFILE[p.name]]
    seconds = chapter_seconds(chapter, p)
    line = (
        f"profile {p.name} ({p.meant_for}): this chapter needs about {_duration(seconds)} on {machine.name}"
    )
    if p.name == "paper" and seconds > BUDGETS["colab"][1]:
        line += (
            f". That is the paper's full setup; for a {_duration(BUDGETS['colab'][1])} version set "
            "CAPSNET_PROFILE=colab (or cpu) and restart the kernel."
        )
    return line


def announce(chapter: int, profile: str | Profile | None = None) -> None:
    """Print :func:`estimate_line` at the top of a chapter."""
    print(estimate_line(chapter, profile))


def training_estimate(model: nn.Module, input_size: int, images: int, batch_size: int) -> str:
    """How long training ``model`` on ``images`` images (all epochs together) takes, on a Colab T4
    and on a laptop CPU at :data:`MACHINES`' rates: a line to print before a long run starts."""
    if isinstance(model, CapsNet):
        flops = flops_per_image(model)["training"]
    else:
        flops = 3 * _cnn_flops(model, input_size)
    work = Work("training", flops * images, _batches(images, batch_size))
    times = [
        f"{_duration(m.seconds(work))} on {m.name} ({m.device_flops / 1e12:g} TFLOP/s)"
        for m in MACHINES.values()
    ]
    return f"{images:,} training images at {flops / 1e9:.2f} GFLOP each: about " + ", ".join(times)
