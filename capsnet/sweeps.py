"""The book's recorded experiments: sets of ``python -m capsnet train`` runs, one folder each.

A sweep is a list of named runs, each a list of command-line options. ``python -m capsnet sweep
NAME`` runs them one after another into ``runs/NAME/RUN/`` (each run records its own command,
hardware, wall time and per-epoch metrics in ``run.json`` and ``metrics.jsonl``), skips runs that
are finished and resumes one that was interrupted. The chapters read the records with
:func:`capsnet.reference.sweep_records`.

The sizes are chosen for the book's 2-core CPU (minutes per run); on a GPU, run the same sweep
with larger ``--train-size`` / ``--steps`` (see each chapter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .train import ConfigError

__all__ = ["SWEEPS", "SEEDS", "SweepError", "run_sweep", "sweep_runs"]

SEEDS = (0, 1)

_MNIST = ["--dataset", "mnist", "--profile", "cpu", "--test-size", "5000", "--batch-size", "64"]

# Chapter 12: one component switched at a time, everything else as in the paper.
_ABLATIONS = {
    "paper": [],
    "r1": ["--routing-iterations", "1"],
    "uniform": ["--coupling", "uniform"],
    "random": ["--coupling", "random"],
    "no-squash": ["--no-squash"],
    "cross-entropy": ["--loss", "cross_entropy"],
    "no-recon": ["--recon-weight", "0"],
}

# Chapter 13: the same budget of optimiser steps on 1%, 5%, 10% and 100% of the training set.
_FRACTIONS = {"1pct": 600, "5pct": 3000, "10pct": 6000, "100pct": 0}

_TRANSLATED = ["--dataset", "translated-mnist", "--profile", "cpu", "--max-shift", "0"]
_TRANSLATED += ["--train-size", "10000", "--test-size", "5000", "--batch-size", "64"]

SWEEPS: dict[str, dict[str, list[str]]] = {
    "ablations": {
        f"{name}-seed{seed}": [*_MNIST, "--train-size", "6000", "--epochs", "1", *args, "--seed", str(seed)]
        for name, args in _ABLATIONS.items()
        for seed in SEEDS
    },
    "data-efficiency": {
        f"{model}-{fraction}-seed{seed}": [
            *_MNIST,
            *("--model", model, "--train-size", str(size), "--steps", "120", "--test-every", "100"),
            *("--seed", str(seed)),
        ]
        for model in ("capsnet", "cnn-small")
        for fraction, size in _FRACTIONS.items()
        for seed in SEEDS
    },
    "affnist": {
        "capsnet": [*_TRANSLATED, "--model", "capsnet", "--epochs", "2"],
        "cnn-small": [*_TRANSLATED, "--model", "cnn-small", "--epochs", "6"],
    },
}


class SweepError(RuntimeError):
    """A run of a sweep failed; its own error was printed above this one."""


def sweep_runs(name: str) -> dict[str, list[str]]:
    """The runs of sweep ``name``: run name -> command-line options of ``python -m capsnet train``."""
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}: choose one of {', '.join(SWEEPS)}")
    return SWEEPS[name]


def _finished(folder: Path) -> bool:
    record = folder / "run.json"
    return record.is_file() and "final" in json.loads(record.read_text())


def run_sweep(name: str, root: str | Path = "runs", only: list[str] | None = None) -> list[str]:
    """Run the unfinished runs of sweep ``name`` (or just those in ``only``) into ``root/name``;
    returns the names of the runs it trained. Each run is a ``python -m capsnet train`` process,
    so its ``run.json`` records the exact command. A run with a checkpoint is resumed (however it
    was interrupted: see :mod:`capsnet.run_folder`).

    Raises:
        ConfigError: an unknown sweep or run.
        SweepError: a run failed; the sweep stops there, and running it again resumes that run.
    """
    runs = sweep_runs(name)
    unknown = sorted(set(only or ()) - set(runs))
    if unknown:
        raise ConfigError(f"sweep {name} has no run {', '.join(unknown)}; its runs: {', '.join(runs)}")
    trained = []
    for run, args in runs.items():
        folder = Path(root) / name / run
        if (only and run not in only) or _finished(folder):
            continue
        resume = ["--resume"] if (folder / "checkpoint.pt").is_file() else []
        command = [sys.executable, "-m", "capsnet", "train", *args, "--out", str(folder), *resume, "--quiet"]
        print(f"sweep {name}: {run}", flush=True)
        try:
            subprocess.run(command, check=True, env=os.environ.copy())
        except subprocess.CalledProcessError as err:
            raise SweepError(
                f"sweep {name}: run {run} failed (exit status {err.returncode}, its error is above); fix the "
                "cause and run the sweep again: finished runs are skipped and this one resumes"
            ) from err
        trained.append(run)
    return trained
