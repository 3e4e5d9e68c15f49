"""Time to accuracy of a training recipe: train it once, record how long the training took and
what test accuracy it reached.

This is a benchmark, not a test: it prints numbers and writes a record, and checks nothing but
that the run finished. The recipe's schedule is fixed in advance (a budget of steps); nothing
looks at the test set before the end: the test set is evaluated once, on the final weights (the
run's ``final`` entry: float16 weights evaluated in float32).

``--isa avx2`` restricts both of PyTorch's CPU libraries to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``), to measure a machine without AVX-512 on one that has it; the
record says which instructions were in effect, checked in a separate process before training.

Usage (from the repository root)::

    python tools/time_to_accuracy.py --isa avx2 --out runs/fast-recipe/avx2-2core
    python tools/time_to_accuracy.py --out /tmp/try -- --lr 2e-3 --steps 500   # options for train

It writes ``time_to_accuracy.json`` into the run folder beside the run's own records, with the
machine's fp32 matmul rate measured just before and just after the run (``matmul_gflops``): on a
shared machine the same code can run at half speed at another hour, and that rate says which hour
it was.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from capsnet.bench import MATMUL_SIZE, matmul_gflops

ISA_ENVIRONMENT = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
TARGET_ACCURACY = 0.99
TARGET_SECONDS = 600.0

_PROBE = """
import torch, torch.nn.functional as F
F.conv2d(torch.randn(2, 8, 20, 20), torch.randn(8, 8, 9, 9))  # large enough for oneDNN
print("aten:", torch.backends.cpu.get_cpu_capability())
"""


def instructions(environment: dict[str, str]) -> dict[str, str]:
    """The vector instructions ATen and oneDNN use under ``environment``, read in a fresh process
    (oneDNN says which it picked when ``ONEDNN_VERBOSE`` is on)."""
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**environment, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    found = {"aten": "", "onednn": ""}
    for line in (probe.stdout + probe.stderr).splitlines():
        if line.startswith("aten:"):
            found["aten"] = line.split(":", 1)[1].strip()
        elif ",isa:" in line:
            found["onednn"] = line.split(",isa:", 1)[1].strip()
    return found


def summarize(out: Path) -> dict[str, Any]:
    """Training time, images and accuracies of the finished run in ``out``."""
    record = json.loads((out / "run.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    seconds = sum(m["train_seconds"] for m in metrics)
    final = record["final"]
    return {
        "training_seconds": seconds,
        "steps": metrics[-1]["step"],
        "test_accuracy": final["accuracy"],
        "test_images": final["test_images"],
        "val_accuracy": final["val"]["accuracy"] if "val" in final else None,
        "precision": record["precision"],
        "hardware": record["hardware"],
        "reached_target": final["accuracy"] >= TARGET_ACCURACY and seconds <= TARGET_SECONDS,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--recipe", default="fast", help="the training recipe (default fast)")
    parser.add_argument("--isa", choices=sorted(ISA_ENVIRONMENT), help="restrict the CPU libraries to this")
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write (must be new)")
    parser.add_argument("train_options", nargs="*", help="further options for train, after --")
    args = parser.parse_args(argv)

    environment = {**os.environ, **ISA_ENVIRONMENT.get(args.isa, {})}
    used = instructions(environment)
    if args.isa and not (used["aten"].lower() == args.isa and args.isa in used["onednn"].lower()):
        print(f"--isa {args.isa} did not take effect: {used}", file=sys.stderr)
        return 1
    options = ["--recipe", args.recipe, "--out", str(args.out), "--quiet", *args.train_options]
    command = [sys.executable, "-m", "capsnet", "train", *options]
    print(f"{' '.join(command)}\ninstructions: {used}; load average {os.getloadavg()}", flush=True)
    load_before = os.getloadavg()
    matmul_before = matmul_gflops(torch.float32, torch.device("cpu"), MATMUL_SIZE["cpu"])
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True)
    wall_seconds = time.perf_counter() - started
    matmul_after = matmul_gflops(torch.float32, torch.device("cpu"), MATMUL_SIZE["cpu"])
    summary = {
        "command": "python -m capsnet train " + " ".join(options),
        "environment": {k: environment[k] for k in ISA_ENVIRONMENT.get(args.isa, {})},
        "instructions": used,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "matmul_gflops": {"before": matmul_before, "after": matmul_after},
        "wall_seconds": wall_seconds,
        **summarize(args.out),
        "targets": {"test_accuracy": TARGET_ACCURACY, "training_seconds": TARGET_SECONDS},
    }
    (args.out / "time_to_accuracy.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print(
        f"{summary['steps']} steps in {summary['training_seconds']:.0f} s of training "
        f"({summary['precision']}, {used['aten']}): test accuracy {summary['test_accuracy']:.2%} "
        f"on {summary['test_images']:,} images; validation {summary['val_accuracy']}; "
        f"fp32 matmul {matmul_before:.0f} GFLOP/s before, {matmul_after:.0f} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
