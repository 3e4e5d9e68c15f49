"""The command line, ``python -m capsnet train | evaluate | bench``: help texts, a real smoke
run end to end, evaluation of its exported weights, resuming, and one-line errors.

The end-to-end tests train the full-size CapsNet on 512 MNIST images in a subprocess (the slow
part of this file); they are skipped when MNIST is not available offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capsnet.cli import build_parser, main
from capsnet.data import DataError, locate_file
from capsnet.run_folder import LOCK

TIMEOUT = 600  # seconds for one command; a smoke run takes well under a minute on two cores

EXPECTED_OPTIONS = {
    "train": [
        "--dataset", "--model", "--profile", "--epochs", "--batch-size", "--train-size", "--test-size",
        "--lr", "--max-shift", "--precision", "--seed", "--routing-iterations", "--routing-gradient",
        "--coupling", "--no-decoder", "--out", "--resume", "--device", "--data", "--quiet",
        "--steps", "--recon-weight", "--loss", "--no-squash", "--test-every",
    ],
    "evaluate": ["checkpoint", "--full-test-set", "--precision", "--device", "--data", "--quiet"],
    "bench": ["--batch-size", "--device"],
}  # fmt: skip


def _subparsers() -> dict:
    parser = build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


def _capsnet(*args: str, cwd: Path, data: str | None = None) -> subprocess.CompletedProcess:
    """``python -m capsnet ARGS`` with ``$CAPSNET_DATA=data``, on one CPU thread (at batch 64 a
    second thread mostly waits, the more so when the machine running the tests is busy)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CAPSNET_DATA": data} if data else {})}
    return subprocess.run(
        [sys.executable, "-m", "capsnet", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


# ----------------------------------------------------------------------------- help


def test_top_level_help(tmp_path):
    result = _capsnet("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("train", "evaluate", "bench"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["train", "evaluate", "bench"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = [
        a.option_strings[0] if a.option_strings else a.dest
        for a in _subparsers()[command]._actions
        if a.dest != "help"
    ]
    assert set(EXPECTED_OPTIONS[command]) <= set(options)
    for option in options:
        assert option in text, option
    for action in _subparsers()[command]._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "train" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_root() -> str:
    try:
        files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"]
        folder = locate_file("mnist", files[0], download=False).parent.parent
        for file in files[1:]:
            locate_file("mnist", file, download=False)
    except DataError:
        pytest.skip("MNIST is not available offline (set CAPSNET_DATA to the data folder)")
    return str(folder)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """``python -m capsnet train --profile smoke --out TMP --quiet``, run once for this module."""
    work = tmp_path_factory.mktemp("cli")
    result = _capsnet("train", "--profile", "smoke", "--out", "run", "--quiet", cwd=work, data=data_root)
    return work / "run", result


def test_train_smoke_end_to_end(smoke_run):
    out, result = smoke_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == [
        "checkpoint.pt",
        "metrics.jsonl",
        "run.json",
        "weights-fp16.pt",
    ]
    record = json.loads((out / "run.json").read_text())
    config = record["config"]
    assert (config["profile"], config["model"], config["dataset"]) == ("smoke", "capsnet", "mnist")
    assert (config["train_size"], config["test_size"], config["epochs"]) == (512, 256, 1)
    assert record["commands"] == ["python -m capsnet train --profile smoke --out run --quiet"]
    assert record["epochs_done"] == 1 and record["wall_seconds"] > 0 and record["hardware"]
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 512 // 64
    final = record["final"]
    assert (final["epoch"], final["test_images"], final["weights"]) == (1, 256, "weights-fp16.pt")
    assert f"test accuracy {final['accuracy']:.4%}" in result.stdout
    assert "epoch 1/1" not in result.stderr  # --quiet: no progress bars


def test_evaluate_reproduces_the_recorded_accuracy(smoke_run, data_root):
    out, _ = smoke_run
    result = _capsnet("evaluate", str(out / "weights-fp16.pt"), "--quiet", cwd=out.parent, data=data_root)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    final = json.loads((out / "run.json").read_text())["final"]
    assert printed["accuracy"] == final["accuracy"]
    assert printed["loss"] == pytest.approx(final["loss"], rel=1e-9)
    assert printed["error"] == pytest.approx(final["error"])
    assert printed["test_images"] == 256


def test_resume_trains_on(tmp_path, data_root):
    first = _capsnet(
        "train", "--profile", "smoke", "--train-size", "64", "--test-size", "64", "--out", "run", "--quiet",
        cwd=tmp_path, data=data_root,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    out = tmp_path / "run"
    assert json.loads((out / "run.json").read_text())["epochs_done"] == 1
    more = _capsnet(
        "train", "--out", "run", "--resume", "--epochs", "2", "--quiet", cwd=tmp_path, data=data_root
    )
    assert more.returncode == 0, more.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["epochs_done"] == 2 and record["final"]["epoch"] == 2
    assert record["config"]["train_size"] == 64 and record["config"]["epochs"] == 2  # the stored config
    assert len(record["commands"]) == 2 and "--resume" in record["commands"][1]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # 64 images in one batch of 64 per epoch


# ----------------------------------------------------------------------------- errors


def test_errors_are_one_line(tmp_path, capsys):
    """Problems the user can fix are reported without a traceback, with exit status 1."""
    assert main(["evaluate", str(tmp_path / "missing.pt"), "--quiet"]) == 1
    assert "error: no checkpoint at" in capsys.readouterr().err

    broken = tmp_path / "weights-fp16.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip file")
    assert main(["evaluate", str(broken), "--quiet"]) == 1
    assert "truncated or corrupted" in capsys.readouterr().err

    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume", "--quiet"]) == 1
    assert "no run to resume" in capsys.readouterr().err


def test_existing_run_needs_resume(smoke_run, data_root, capsys):
    out, _ = smoke_run
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    args = [
        "train",
        "--profile",
        "smoke",
        "--out",
        str(out),
        "--data",
        data_root,
        "--device",
        "cpu",
        "--quiet",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before


def test_train_translated_mnist_records_the_affnist_style_test(tmp_path, data_root):
    args = ["--dataset", "translated-mnist", "--model", "cnn-small", "--profile", "smoke"]
    args += ["--train-size", "64", "--test-size", "32", "--steps", "3", "--batch-size", "16"]
    result = _capsnet("train", *args, "--out", "run", "--quiet", cwd=tmp_path, data=data_root)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["steps"] == 3 and record["config"]["epochs"] == 1
    assert record["model_kwargs"] == {"input_size": 40}
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 3
    assert {"test_accuracy", "affnist_style_accuracy"} <= set(metrics)
    final = record["final"]
    assert 0 <= final["affnist_style"]["accuracy"] <= 1 and final["test_images"] == 32
