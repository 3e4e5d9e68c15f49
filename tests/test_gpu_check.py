"""tools/gpu_check.py at tiny scale (smoke profile, two chapters, one test file, a short bench), on
whatever device this machine has: every step passes and the summary records what it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import capsnet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    data = os.environ.get("CAPSNET_DATA")
    assert data and Path(data).is_dir(), "set CAPSNET_DATA to the folder holding MNIST"
    work = tmp_path_factory.mktemp("gpu-check")
    command = [sys.executable, "tools/gpu_check.py", "--tiny", "--jobs", "1", "--scratch", str(work)]
    # one cache of the convolution-gradient choices for every process (capsnet.conv): timing for
    # itself, the resumed run could keep another choice than the uninterrupted one and differ in rounding
    environment = {**os.environ, "CAPSNET_CONV_CACHE": str(work / "conv-backward.json")}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    return done, work / "records"


def test_tiny_gpu_check_passes_and_records_every_step(tiny_check):
    done, records = tiny_check
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    (path,) = (records / "gpu-check").glob("*.json")
    summary = json.loads(path.read_text())
    assert path.name.startswith(summary["date"][:10])
    assert summary["capsnet"] == capsnet.__version__ and summary["tiny"] is True
    assert summary["passed"] is True
    steps = summary["steps"]
    assert list(steps) == ["unit-tests", "chapters", "resume", "bench"]
    assert all(step["passed"] and step["seconds"] > 0 for step in steps.values())

    assert steps["unit-tests"]["counts"]["passed"] > 0
    chapters = steps["chapters"]["chapters"]
    assert list(chapters) == ["02_inverse_graphics", "03_capsules_vs_neurons"]
    assert all(chapter["passed"] and chapter["seconds"] > 0 for chapter in chapters.values())
    assert steps["resume"]["epochs"] == [2, 2]
    bench = json.loads((records / steps["bench"]["record"]).read_text())
    assert bench["steps"] == 1 and bench["batch_size"] == 8


def test_tiny_resume_on_the_cpu_equals_an_uninterrupted_run(tiny_check):
    done, records = tiny_check
    (path,) = (records / "gpu-check").glob("*.json")
    summary = json.loads(path.read_text())
    if summary["device"] != "cpu":
        pytest.skip("CUDA kernels need not be deterministic: the GPU check only records the difference")
    resume = summary["steps"]["resume"]
    assert resume["max_weight_difference"] == 0.0
    assert resume["test_accuracy"]["resumed"] == resume["test_accuracy"]["uninterrupted"]
