"""Fault injection: ``python -m capsnet train`` killed with SIGKILL at many moments (inside a
checkpoint write, before and after its rename, between the checkpoint and the records, between the
two records, after the last epoch, during the export, and at random times), then continued with
``--resume`` (or started again where no checkpoint was written yet). Every time the run must end
with weights bitwise equal to an uninterrupted run's, ``metrics.jsonl`` and ``run.json`` that
match its checkpoint, and no temporary file left.

To keep this fast, each training is a forked child of the test process (no new interpreter to
start) running the command line's ``main`` on a tiny CapsNet and 48 random images (3 epochs of 3
steps); the child kills itself at a chosen call of the function where the kill should land."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

import capsnet
import capsnet.checkpoint
import capsnet.run_folder
import capsnet.train as train_module
from capsnet.checkpoint import load_checkpoint
from capsnet.cli import main
from capsnet.conv import conv_backward
from capsnet.run_folder import LOCK, RunFolder

TINY_CAPSNET = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": (32, 64)}
ARGS = ["train", "--profile", "smoke", "--train-size", "48", "--test-size", "16", "--batch-size", "16"]
ARGS += ["--epochs", "3", "--precision", "fp32", "--device", "cpu", "--quiet"]
TIMINGS = {"seconds", "train_images_per_s", "train_seconds"}
FORK = multiprocessing.get_context("fork") if sys.platform != "win32" else None

pytestmark = pytest.mark.skipif(FORK is None, reason="needs fork and SIGKILL")


@pytest.fixture(autouse=True, scope="module")
def _one_way_to_compute_gradients(tmp_path_factory: pytest.TempPathFactory):
    """Every child computes the convolution gradients the same way: under ``auto`` the first to
    time a shape stores its choice in one cache file and the others read it (capsnet.conv; a run
    killed before its first record starts afresh, so without the file it would time again)."""
    cache = tmp_path_factory.mktemp("conv-cache") / "conv-backward.json"
    before = os.environ.get("CAPSNET_CONV_CACHE")
    os.environ["CAPSNET_CONV_CACHE"] = str(cache)
    try:
        with conv_backward("auto"):
            yield
    finally:
        if before is None:
            del os.environ["CAPSNET_CONV_CACHE"]
        else:
            os.environ["CAPSNET_CONV_CACHE"] = before


def _digits(config, split: str, root) -> tuple[torch.Tensor, torch.Tensor]:
    """48 training and 16 test images of random noise, the same in every process."""
    n, seed = (config.train_size, 0) if split == "train" else (config.test_size, 1)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(
        0, 10, (n,), generator=gen
    )


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(module: object, name: str, call: int, when: str) -> None:
    """Make the ``call``-th call of ``module.name`` kill the process, ``before`` or ``after`` it
    ran; ``inside`` (for torch.save): after writing half of what it would have written."""
    real, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return real(*args, **kwargs)
        if when == "before":
            _die()
        if when == "inside":
            obj, f = args[:2]
            real(obj, f)
            f.seek(f.tell() // 2)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
            _die()
        result = real(*args, **kwargs)
        _die()
        return result

    setattr(module, name, wrapper)


# where a kill lands: (module, function, when); the n-th call is the scenario's choice
POINTS = {
    "checkpoint-write": (torch, "save", "inside"),  # torch.save: 3 checkpoints, then weights-fp16.pt
    "before-rename": (os, "replace", "before"),  # each epoch: checkpoint, metrics.jsonl, run.json
    "after-rename": (os, "replace", "after"),
    "before-records": (RunFolder, "_write", "before"),  # after the checkpoint, before both records
    "between-records": (
        capsnet.run_folder,
        "write_atomically",
        "after",
    ),  # metrics.jsonl written, not run.json
    "before-export": (train_module, "export_weights", "before"),  # after the last epoch
}
SCENARIOS = [
    ("checkpoint-write", 1),  # the first checkpoint: nothing to resume, start again
    ("checkpoint-write", 3),
    ("checkpoint-write", 4),  # weights-fp16.pt
    ("before-rename", 1),
    ("before-rename", 4),
    ("after-rename", 1),  # the first checkpoint is there, no records yet
    ("after-rename", 8),  # the last epoch's metrics.jsonl
    ("after-rename", 10),  # weights-fp16.pt, before run.json's final
    ("before-records", 2),
    ("between-records", 5),  # the last epoch's metrics.jsonl written, run.json one epoch behind
    ("before-export", 1),
]


def _train(out: Path, resume: bool, kill: tuple[str, int] | None) -> None:
    """The child: ``python -m capsnet train`` into ``out``, killed at ``kill`` if given."""
    torch.set_num_threads(1)
    train_module._digits = _digits
    train_module.build_model = lambda kind, **kwargs: capsnet.CapsNet(**TINY_CAPSNET, **kwargs)
    if kill is not None:
        (module, name, when), call = POINTS[kill[0]], kill[1]
        _kill_at(module, name, call, when)
    sys.exit(main([*ARGS, "--out", str(out), *(["--resume"] if resume else [])]))


def _start(out: Path, kill: tuple[str, int] | None = None) -> multiprocessing.Process:
    child = FORK.Process(target=_train, args=(out, (out / "checkpoint.pt").exists(), kill))
    child.start()
    return child


def _finish(out: Path, kill: tuple[str, int] | None = None) -> int:
    child = _start(out, kill)
    child.join(timeout=120)
    assert child.exitcode is not None, "the training hung"
    return child.exitcode


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run. (First, what Adam imports on first use is imported here, once,
    rather than in every child.)"""
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    out = tmp_path_factory.mktemp("kill") / "reference"
    assert _finish(out) == 0
    return out


def _assert_like_the_reference(out: Path, reference: Path) -> None:
    state, expected = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference / "checkpoint.pt")
    assert state["model"].keys() == expected["model"].keys()
    for name, value in state["model"].items():
        assert torch.equal(value, expected["model"][name]), name
    weights, expected_weights = (
        load_checkpoint(out / "weights-fp16.pt"),
        load_checkpoint(reference / "weights-fp16.pt"),
    )
    assert all(torch.equal(v, expected_weights["model"][k]) for k, v in weights["model"].items())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == state["history"]  # the records are the checkpoint's
    assert [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics] == [
        {k: v for k, v in m.items() if k not in TIMINGS} for m in expected["history"]
    ]
    record, expected_record = (json.loads((folder / "run.json").read_text()) for folder in (out, reference))
    assert record["epochs_done"] == state["epoch"] == 3
    assert record["wall_seconds"] == sum(m["seconds"] for m in metrics)
    assert record["final"] == expected_record["final"] and record["config"] == expected_record["config"]
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == [
        "checkpoint.pt",
        "metrics.jsonl",
        "run.json",
        "weights-fp16.pt",
    ]  # no temporary file


@pytest.mark.parametrize(("point", "call"), SCENARIOS, ids=[f"{p}-{n}" for p, n in SCENARIOS])
def test_killed_at_a_chosen_moment(tmp_path, reference, point, call):
    out = tmp_path / "run"
    assert _finish(out, kill=(point, call)) == -signal.SIGKILL
    assert _finish(out) == 0
    _assert_like_the_reference(out, reference)


def test_killed_at_random_moments(tmp_path, reference):
    """Kills at random times, three per run, each run continued after each kill; the times span
    a whole training, start-up and export included."""
    rng = random.Random(0)
    started = time.perf_counter()
    assert _finish(tmp_path / "timed") == 0
    duration = time.perf_counter() - started
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        for _ in range(3):
            child = _start(out)
            time.sleep(rng.uniform(0, duration))
            child.kill()
            child.join(timeout=60)
        assert _finish(out) == 0
        _assert_like_the_reference(out, reference)
