"""The book's GPU check, sized to finish within 8 minutes on one modern GPU (an H100 or H200).

Steps, each recorded with its wall time and whether it passed:

1. ``unit-tests``: pytest on tests/ (not the book build, the simulated Colab or this check's own
   test), on the GPU wherever a test uses the default device;
2. ``chapters``: every chapter of _toc.yml executed in the ``colab`` profile into a scratch folder
   (``execute_notebooks.run_notebooks`` with an output folder: the stored notebooks are never
   touched), with each chapter's wall time (``--jobs`` of them at a time);
3. ``resume``: ``python -m capsnet train`` for 1 epoch, then ``--resume --epochs 2``, against an
   uninterrupted 2-epoch run with the same seed: both must finish; the largest difference
   between their weights is recorded (0 where the kernels are deterministic, as on the CPU);
4. ``bench``: ``python -m capsnet bench``, saved as ``runs/bench/<gpu name>.json``.

It writes one summary, ``runs/gpu-check/<date>-<gpu name>.json`` (date, GPU, torch, CUDA and
capsnet versions, each step's results, whether all passed), rewritten after every step so that a
run cut short still leaves its record, and exits with status 1 if a step failed. Commit what it
records, and say in the README which GPU was last checked.

``--tiny`` runs the same steps at the ``smoke`` profile's scale on any machine, the CPU included
(two chapters, one test file, a short bench), writing its records into the scratch folder unless
``--records`` says otherwise: tests/test_gpu_check.py checks the script this way.

On this project's GPU machine (Python 3.12 with PyTorch; no Jupyter kernel, no internet), first run
``bash tools/gpu_wheels.sh`` here (wheels into .whl/, MNIST into .gpu-data/), then run, carrying
``.whl`` and ``.gpu-data``, from the repository root::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CAPSNET_DATA=/tmp/data && cp -r .gpu-data /tmp/data || exit; python3 tools/gpu_check.py; rc=$?; python3 -m capsnet sweep paper-gpu --time-budget 240 --parallel 2; tar czf $OUT/paper-gpu.tgz --exclude='*.pt' runs/paper-gpu; cp runs/gpu-check/*.json runs/bench/*.json $OUT/; exit $rc

and copy the files that come back into runs/gpu-check/ and runs/bench/, and unpack paper-gpu.tgz
into runs/. The sweep (``capsnet.sweeps``: the paper's Table 1, 50 epochs a run) measures one
epoch first and trains, in priority order, only the runs that fit its time budget; raise the
budget when more device time is left after the check (the device's whole allowance, start and
transfers included, is what limits it).

Usage elsewhere (from the repository root, with ``CAPSNET_DATA`` set)::

    python tools/gpu_check.py                  # everything, on CUDA
    python tools/gpu_check.py --only bench resume
    python tools/gpu_check.py --tiny           # the script itself, at tiny scale, anywhere
"""  # noqa: E501 (the device command is one line)

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from execute_notebooks import REPO, run_notebooks, toc_notebooks

import capsnet
from capsnet.checkpoint import load_checkpoint

# The unit tests leave out what is not a unit test of the package on this device.
PYTEST_SELECTION = ["-m", "not book_build and not colab_sim", "--ignore", "tests/test_gpu_check.py"]


@dataclass(frozen=True)
class Scale:
    """How big each step is.

    profile: the chapters' profile. chapters: the notebooks run (``None``: every chapter).
    tests: what pytest runs. train: the resume runs' size options. bench: bench's size options.
    """

    profile: str
    chapters: tuple[str, ...] | None
    tests: tuple[str, ...]
    train: tuple[str, ...]
    bench: tuple[str, ...]


FULL = Scale(
    profile="colab",
    chapters=None,
    tests=("tests",),
    train=("--profile", "colab", "--train-size", "6000", "--test-size", "1000"),
    bench=(),
)
TINY = Scale(
    profile="smoke",
    chapters=("book/02_inverse_graphics.ipynb", "book/03_capsules_vs_neurons.ipynb"),
    tests=("tests/test_squashing.py",),
    train=("--profile", "smoke", "--train-size", "256", "--test-size", "128"),
    bench=("--steps", "1", "--batch-size", "8"),
)


def device_name() -> str:
    """The GPU's name (``"NVIDIA H200"``), or ``"cpu"`` where there is none."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    """A file name for a device: ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Check:
    """One run of the check: its scale, its work folder, where its records go, and how many
    chapters run at the same time."""

    scale: Scale
    scratch: Path
    records: Path
    jobs: int


def python(*args: str | Path, log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run this Python with ``args`` from the repository root, its output into ``log``; print the
    output's tail if it failed."""
    command = [sys.executable, *map(str, args)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        print(f"{' '.join(command)} failed ({done.returncode}); see {log}\n{tail}", flush=True)
    return done


def unit_tests(check: Check) -> dict[str, Any]:
    """pytest on the package's unit tests, in the tests' own default profile."""
    env = {key: value for key, value in os.environ.items() if key != "CAPSNET_PROFILE"}
    log = check.scratch / "unit-tests.log"
    done = python("-m", "pytest", "-q", *check.scale.tests, *PYTEST_SELECTION, log=log, env=env)
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", done.stdout)
    return {"passed": done.returncode == 0, "counts": {kind: int(n) for n, kind in counts}}


def chapters(check: Check) -> dict[str, Any]:
    """Every chapter (or the scale's few) executed into ``scratch/chapters``."""
    scale = check.scale
    notebooks = [REPO / name for name in scale.chapters] if scale.chapters else toc_notebooks()
    outcomes = run_notebooks(notebooks, scale.profile, check.scratch / "chapters", 600, jobs=check.jobs)
    results = {}
    for outcome in outcomes:
        result = results[outcome.notebook.stem] = {"seconds": round(outcome.seconds, 1)}
        result["passed"] = outcome.error is None
        if outcome.error is not None:
            result["error"] = outcome.error[-2000:]
    passed = all(result["passed"] for result in results.values())
    return {"passed": passed, "profile": scale.profile, "jobs": check.jobs, "chapters": results}


def resume(check: Check) -> dict[str, Any]:
    """A run trained 1 epoch and resumed to 2, against one trained 2 epochs without a stop."""
    folder = check.scratch / "resume"
    train = ("-m", "capsnet", "train", "--quiet")
    new = (*train, *check.scale.train, "--seed", "0")
    runs = {
        "first-epoch": (*new, "--epochs", "1", "--out", folder / "resumed"),
        "resumed": (*train, "--out", folder / "resumed", "--resume", "--epochs", "2"),
        "uninterrupted": (*new, "--epochs", "2", "--out", folder / "uninterrupted"),
    }
    for what, args in runs.items():
        if python(*args, log=folder / f"{what}.log").returncode != 0:
            return {"passed": False, "failed": what}
    names = ("resumed", "uninterrupted")
    resumed, uninterrupted = (load_checkpoint(folder / name / "checkpoint.pt") for name in names)
    difference = max(
        (resumed["model"][key].float() - weight.float()).abs().max().item()
        for key, weight in uninterrupted["model"].items()
    )
    records = {name: json.loads((folder / name / "run.json").read_text()) for name in names}
    epochs = [resumed["epoch"], uninterrupted["epoch"]]
    return {
        "passed": epochs == [2, 2],
        "epochs": epochs,
        "max_weight_difference": difference,
        "test_accuracy": {name: record["final"]["accuracy"] for name, record in records.items()},
    }


def bench(check: Check) -> dict[str, Any]:
    """``python -m capsnet bench`` into ``bench/<device>.json`` under the records."""
    path = check.records / "bench" / f"{slug(device_name())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = check.scratch / "bench.log"
    if python("-m", "capsnet", "bench", *check.scale.bench, "--json", path, log=log).returncode != 0:
        return {"passed": False}
    modes = ("train", "inference")
    images_per_s = {
        result["precision"]: {mode: round(result[f"{mode}_images_per_s"], 1) for mode in modes}
        for result in json.loads(path.read_text())["results"]
    }
    return {"passed": True, "record": f"bench/{path.name}", "images_per_s": images_per_s}


STEPS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "unit-tests": unit_tests,
    "chapters": chapters,
    "resume": resume,
    "bench": bench,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--tiny", action="store_true", help="smoke-profile scale on any machine (tests the script)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run (default: all)"
    )
    parser.add_argument("--jobs", type=int, default=3, help="chapters run at the same time (default: 3)")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=REPO / "scratch" / "gpu-check",
        help="work folder (default: scratch/gpu-check)",
    )
    parser.add_argument(
        "--records",
        type=Path,
        help="where gpu-check/ and bench/ are written (default: runs/; with --tiny: the work folder)",
    )
    args = parser.parse_args(argv)

    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: the GPU check needs one (--tiny checks the script on any machine)")
    if not os.environ.get("CAPSNET_DATA"):
        parser.error("set CAPSNET_DATA to the folder holding MNIST (nothing is downloaded)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    scratch = args.scratch.resolve()
    records = (args.records or (scratch / "records" if args.tiny else REPO / "runs")).resolve()
    check = Check(TINY if args.tiny else FULL, scratch, records, args.jobs)

    name = device_name()
    started = datetime.datetime.now(datetime.timezone.utc)
    summary_path = records / "gpu-check" / f"{started:%Y-%m-%d}-{slug(name)}.json"
    summary: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "capsnet": capsnet.__version__,
        "tiny": args.tiny,
        "steps": {},
    }
    clock = time.perf_counter()
    for step in args.only:
        print(f"== {step}", flush=True)
        start = time.perf_counter()
        result = STEPS[step](check)
        result["seconds"] = round(time.perf_counter() - start, 1)
        summary["steps"][step] = result
        summary["passed"] = all(done["passed"] for done in summary["steps"].values())
        summary["wall_seconds"] = round(time.perf_counter() - clock, 1)
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{step}: {'passed' if result['passed'] else 'FAILED'} in {result['seconds']} s", flush=True)
    print(f"{'passed' if summary['passed'] else 'FAILED'}; summary: {summary_path}", flush=True)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
