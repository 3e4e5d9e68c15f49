"""The recorded experiments: every sweep's runs are valid ``train`` commands, run_sweep skips
finished runs and resumes interrupted ones, and sweep_records reads what the runs wrote."""

from __future__ import annotations

import json
import subprocess

import pytest

from capsnet.cli import build_parser, main
from capsnet.reference import sweep_records
from capsnet.sweeps import SEEDS, SWEEPS, SweepError, run_sweep, sweep_runs


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_run_is_a_valid_train_command(sweep):
    for run, args in sweep_runs(sweep).items():
        parsed = build_parser().parse_args(["train", *args])
        assert parsed.command == "train", run


def test_ablations_switch_one_thing_at_a_time():
    runs = sweep_runs("ablations")
    base = runs["paper-seed0"]
    for run, args in runs.items():
        assert run.endswith(tuple(f"seed{s}" for s in SEEDS))
        extra = [a for a in args if a not in base]
        assert len(extra) <= 2, (run, extra)  # one option and its value (or a seed)


def test_unknown_sweep_and_run():
    with pytest.raises(ValueError, match="unknown sweep 'cifar'.*ablations"):
        sweep_runs("cifar")
    with pytest.raises(ValueError, match="no run nope"):
        run_sweep("affnist", only=["nope"])


def _fake_run(folder, finished: bool = True, checkpoint: bool = False):
    folder.mkdir(parents=True)
    record = {"config": {}, "commands": ["python -m capsnet train ..."]}
    if finished:
        record["final"] = {"accuracy": 0.5}
    (folder / "run.json").write_text(json.dumps(record))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_accuracy": 0.5}) + "\n")
    if checkpoint:
        (folder / "checkpoint.pt").write_bytes(b"")


def test_run_sweep_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: calls.append(command))
    _fake_run(tmp_path / "affnist" / "capsnet")
    _fake_run(tmp_path / "affnist" / "cnn-small", finished=False, checkpoint=True)
    assert run_sweep("affnist", tmp_path) == ["cnn-small"]
    (command,) = calls
    assert command[1:4] == ["-m", "capsnet", "train"]
    assert command[-4:] == ["--out", str(tmp_path / "affnist" / "cnn-small"), "--resume", "--quiet"]
    assert command[4:-4] == SWEEPS["affnist"]["cnn-small"]


def test_sweep_records(tmp_path):
    for run in SWEEPS["affnist"]:
        _fake_run(tmp_path / "affnist" / run)
    records = sweep_records("affnist", root=tmp_path)
    assert sorted(records) == sorted(SWEEPS["affnist"])
    assert records["capsnet"]["final"]["accuracy"] == 0.5
    assert records["capsnet"]["metrics"] == [{"epoch": 1, "test_accuracy": 0.5}]
    (tmp_path / "affnist" / "capsnet" / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="python -m capsnet sweep affnist --only capsnet"):
        sweep_records("affnist", root=tmp_path)


def test_sweep_records_refuse_an_unfinished_run(tmp_path):
    _fake_run(tmp_path / "affnist" / "capsnet", finished=False)
    _fake_run(tmp_path / "affnist" / "cnn-small")
    with pytest.raises(FileNotFoundError, match="capsnet is not finished"):
        sweep_records("affnist", root=tmp_path)


def test_a_failed_run_stops_the_sweep_with_one_line(tmp_path, monkeypatch, capsys):
    def fail(command, **kwargs):
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(SweepError, match="run capsnet failed .*exit status 1.*this one resumes"):
        run_sweep("affnist", tmp_path)
    assert main(["sweep", "affnist", "--root", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m capsnet sweep: error: sweep affnist: run capsnet failed")
