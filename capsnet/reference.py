"""The book's reference runs: models trained once with ``python -m capsnet train`` and recorded
under ``runs/`` (command, hardware, wall time, per-epoch metrics, final test accuracy, float16
weights). Chapters load them instead of training for hours.

In a checkout of the book's repository the files are read from ``runs/``; where the package was
installed without the repository (Colab) they are downloaded once into the user cache, from
:data:`RUNS_URL` or, when set, ``$CAPSNET_RUNS_URL`` (any URL urllib opens, ``file://`` included: a
local mirror of ``runs/``).

Models are loaded onto the CPU unless a device is asked for: chapters read them, and reading
needs no GPU. Move a model with ``.to(device)`` and its inputs with it.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DownloadError, cache_dir, download_file
from .sweeps import sweep_runs
from .train import load_trained

__all__ = [
    "REFERENCE_RUNS",
    "RUNS_URL",
    "load_reference",
    "per_image",
    "recorded_file",
    "reference_record",
    "runs_url",
    "sweep_records",
    "test_error_summary",
]

RUNS_URL = "https://raw.githubusercontent.com/capsnet-book/capsnet-book/main/runs/"
RUNS_URL_VARIABLE = "CAPSNET_RUNS_URL"


def runs_url() -> str:
    """Where recorded runs are downloaded from: ``$CAPSNET_RUNS_URL`` if set, else :data:`RUNS_URL`
    (always ending in ``/``)."""
    url = os.environ.get(RUNS_URL_VARIABLE) or RUNS_URL
    return url if url.endswith("/") else url + "/"


REFERENCE_RUNS = ("mnist-reference",)
_RECORD_FILES = ("run.json", "metrics.jsonl")
_FILES = (*_RECORD_FILES, "weights-fp16.pt")


def _checkout_runs() -> Path:
    """The ``runs/`` folder of the checkout this module sits in (found at call time)."""
    return Path(__file__).resolve().parent.parent / "runs"


def _run_dir(
    name: str, download: bool, files: tuple[str, ...] = _FILES, root: str | Path | None = None
) -> Path:
    """The folder holding ``files`` of run ``name`` (a reference run, or ``SWEEP/RUN``): under
    ``root`` if given, else the checkout's ``runs/`` or the cache."""
    if root is not None:
        folder = Path(root) / name
        if not all((folder / f).is_file() for f in files):
            raise FileNotFoundError(f"run {name} is not recorded in {root}")
        return folder
    checkout = _checkout_runs() / name
    if all((checkout / f).is_file() for f in files):
        return checkout
    for file in files:
        recorded_file(f"{name}/{file}", download)
    return cache_dir() / "runs" / name


def recorded_file(path: str, download: bool = True) -> Path:
    """A file of the book's ``runs/`` folder (e.g. ``"bench/cpu-2core.json"``): from the checkout
    if the package sits in one, else from the user cache, downloaded there once from
    :func:`runs_url` if needed.

    Raises:
        FileNotFoundError: the file is in neither place and could not be downloaded; the message
            says what to do.
    """
    checkout, cached = _checkout_runs() / path, cache_dir() / "runs" / path
    for candidate in (checkout, cached):
        if candidate.is_file():
            return candidate
    if not download:
        raise FileNotFoundError(f"runs/{path} is neither in {checkout} nor in {cached}")
    try:
        return download_file([f"{runs_url()}{path}"], cached)
    except DownloadError as err:
        raise FileNotFoundError(
            f"runs/{path} is not in {checkout} and could not be downloaded ({err}). Run the chapter "
            "from a checkout of the book's repository, connect to the internet, "
            f"or set ${RUNS_URL_VARIABLE} to a copy of the repository's runs/ folder."
        ) from err


def _check_reference(name: str) -> None:
    if name not in REFERENCE_RUNS:
        raise ValueError(f"unknown reference run {name!r}: choose one of {', '.join(REFERENCE_RUNS)}")


def _record(name: str, download: bool, root: str | Path | None = None) -> dict[str, Any]:
    folder = _run_dir(name, download, _RECORD_FILES, root)
    record = json.loads((folder / "run.json").read_text())
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    record["metrics"] = [json.loads(line) for line in lines if line.strip()]
    return record


def reference_record(name: str = "mnist-reference", download: bool = True) -> dict[str, Any]:
    """The run's ``run.json`` (commands, configuration, hardware, wall time, ``final`` test result)
    with its per-epoch metrics added under ``"metrics"``."""
    _check_reference(name)
    return _record(name, download)


def test_error_summary(record: dict[str, Any], last: int = 5) -> dict[str, Any]:
    """The test errors (%) of a recorded run, told apart by how their epoch was chosen.

    A run that was extended while someone watched its test accuracy offers many test numbers, and
    the best of them flatters it. Returned: ``planned_epoch`` / ``planned_error``, the end of the
    schedule its first command fixed before training (``--epochs N``); ``last_epochs`` (first,
    last), ``last_mean`` and ``last_sd``, over the last ``last`` epochs; ``final_epoch`` /
    ``final_error``, the run's final evaluation (the stored weights, float32), whatever rule
    ended the run; ``best_error`` and ``evaluations``, the lowest of all per-epoch test errors and
    how many there were. ``record`` is as :func:`reference_record` returns it (with ``metrics``).
    """
    metrics = record["metrics"]
    if not metrics:
        raise ValueError("the record has no per-epoch metrics: the run has not finished an epoch")
    first_command = record["commands"][0]
    planned = re.search(r"--epochs (\d+)", first_command)
    planned_epoch = int(planned.group(1)) if planned else record["config"]["epochs"]
    by_epoch = {m["epoch"]: m["test_error"] for m in metrics}
    tail = metrics[-last:]
    errors = [m["test_error"] for m in tail]
    mean = sum(errors) / len(errors)
    sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / (len(errors) - 1)) if len(errors) > 1 else 0.0
    final = record.get("final") or {"epoch": metrics[-1]["epoch"], "error": metrics[-1]["test_error"]}
    return {
        "planned_epoch": planned_epoch,
        "planned_error": by_epoch.get(planned_epoch),
        "last_epochs": (tail[0]["epoch"], tail[-1]["epoch"]),
        "last_mean": mean,
        "last_sd": sd,
        "final_epoch": final["epoch"],
        "final_error": final["error"],
        "best_error": min(by_epoch.values()),
        "evaluations": len(metrics),
    }


def sweep_records(
    sweep: str, download: bool = True, root: str | Path | None = None
) -> dict[str, dict[str, Any]]:
    """The records of every run of a sweep (see :mod:`capsnet.sweeps`), run name -> ``run.json``
    with ``"metrics"``, as :func:`reference_record` gives them; from ``root`` (the folder that
    ``python -m capsnet sweep --root`` wrote) if given, else from the book's ``runs/``. A run that
    was not recorded (or not finished) raises ``FileNotFoundError`` naming the command that makes it."""
    records = {}
    for run in sweep_runs(sweep):
        try:
            records[run] = _record(f"{sweep}/{run}", download, root)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}. Make it with: python -m capsnet sweep {sweep} --only {run}"
            ) from err
        if "final" not in records[run]:
            raise FileNotFoundError(
                f"run {sweep}/{run} is not finished; finish it with: "
                f"python -m capsnet sweep {sweep} --only {run}"
            )
    return records


def per_image(record: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """What a finished run recorded per image of its final evaluation on ``split`` (``"test"``,
    ``"val"`` or a further test set such as ``"affnist_style"``): ``predicted`` (a tensor of
    classes), ``correct`` (a bool tensor), both in the order of the images, and ``images_sha256``,
    the fingerprint of those images (equal fingerprints: the same images, so two runs can be
    compared pairwise with :func:`capsnet.stats.mcnemar`).

    Raises:
        LookupError: the run has no per-image record of ``split`` (runs exported before capsnet
            0.4 have none: train them again).
    """
    final = record.get("final") or {}
    found = final if split == "test" else final.get(split)
    if not isinstance(found, dict) or "correct" not in found:
        raise LookupError(
            f"the run {' '.join(record.get('commands', [])[-1:]) or '(no command recorded)'} has no "
            f"per-image record of its {split!r} images: runs exported before capsnet 0.4 have "
            "none; train it again with the current package"
        )
    return {
        "predicted": torch.tensor([int(c) for c in found["predicted"]]),
        "correct": torch.tensor([c == "1" for c in found["correct"]]),
        "images_sha256": found["images_sha256"],
    }


def load_reference(
    name: str = "mnist-reference", device: torch.device | str | None = None, download: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The reference model (float32, eval mode, on ``device``: the CPU unless one is given) and
    its record.

    >>> model, record = load_reference()  # doctest: +SKIP
    >>> record["final"]["accuracy"]        # doctest: +SKIP
    """
    _check_reference(name)
    folder = _run_dir(name, download)
    model, _ = load_trained(folder / "weights-fp16.pt", device)
    return model, reference_record(name, download)
