"""The recorded experiments: every sweep's runs are valid ``train`` commands, run_sweep skips
finished runs and resumes interrupted ones, and sweep_records reads what the runs wrote."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from capsnet.cli import build_parser, main
from capsnet.reference import sweep_records
from capsnet.sweeps import (
    AFFNIST_TARGET,
    CNN_LR,
    CNN_LRS,
    CONVERGED_SEEDS,
    LOGIT_SCALE,
    LOGIT_SCALES,
    NO_SQUASH_LR,
    NO_SQUASH_LRS,
    SEEDS,
    SWEEPS,
    SweepError,
    run_sweep,
    sweep_runs,
)


@pytest.mark.parametrize("sweep", sorted(SWEEPS))
def test_every_run_is_a_valid_train_command(sweep):
    for run, args in sweep_runs(sweep).items():
        parsed = build_parser().parse_args(["train", *args])
        assert parsed.command == "train", run


def test_ablations_switch_one_thing_at_a_time():
    """Each variant changes one component (no-squash and cross-entropy with the setting the
    validation split chose for them); three seeds; every run holds out the same validation split."""

    def without_seed(args):
        i = args.index("--seed")
        return args[:i] + args[i + 2 :]

    runs = sweep_runs("ablations")
    base = without_seed(runs["paper-seed0"])
    assert base[base.index("--val-size") + 1] == "5000" and "--test-seed" not in base
    tuned = {"no-squash": ["--lr", NO_SQUASH_LR], "cross-entropy": ["--logit-scale", LOGIT_SCALE]}
    for run, args in runs.items():
        variant, seed = run.rsplit("-seed", 1)
        assert int(seed) in SEEDS and args[args.index("--seed") + 1] == seed
        options = without_seed(args)
        assert options[: len(base)] == base, run
        extra = [a for a in options[len(base) :] if a not in tuned.get(variant, [])]
        assert len(extra) <= 2, (run, extra)  # one option and its value
    assert len(runs) == 7 * len(SEEDS) and len(SEEDS) >= 3


def test_the_tuned_settings_come_from_the_tuning_grid():
    tuning = sweep_runs("ablations-tuning")
    assert NO_SQUASH_LR in NO_SQUASH_LRS and LOGIT_SCALE in LOGIT_SCALES
    assert set(tuning) == {f"no-squash-lr{lr}" for lr in NO_SQUASH_LRS} | {
        f"cross-entropy-scale{s}" for s in LOGIT_SCALES
    }
    for args in tuning.values():  # tuned on the validation split of seed 0's runs
        assert args[args.index("--seed") + 1] == "0" and "--val-size" in args


# The sweeps whose records in runs/ follow the shared protocol: every run recorded with the
# command its sweep defines, all tested on the same images and validated on the same images.
PROTOCOL_SWEEPS = (
    "ablations",
    "ablations-tuning",
    "affnist",
    "data-efficiency",
    "data-efficiency-tuning",
    "data-efficiency-converged",
)
RUNS = Path(__file__).resolve().parent.parent / "runs"


@pytest.mark.parametrize("sweep", PROTOCOL_SWEEPS)
def test_recorded_sweeps_are_their_definition_on_shared_images(sweep):
    if not (RUNS / sweep).is_dir():
        pytest.skip(f"runs/{sweep} is not in this checkout")
    records = sweep_records(sweep, download=False)  # every run recorded and finished
    for run, record in records.items():
        command = [
            "python",
            "-m",
            "capsnet",
            "train",
            *sweep_runs(sweep)[run],
            "--out",
            f"runs/{sweep}/{run}",
        ]
        assert record["commands"] == [shlex.join([*command, "--quiet"])], run
        assert len(record["final"]["correct"]) == record["final"]["test_images"], run
    assert len({r["final"]["images_sha256"] for r in records.values()}) == 1
    assert len({r["final"]["val"]["images_sha256"] for r in records.values()}) == 1


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


class FakeProcess:
    """Stands in for subprocess.Popen: records the command and ends with ``status``."""

    calls: list[list[str]] = []
    status = 0

    def __init__(self, command, **kwargs):
        FakeProcess.calls.append(command)

    def wait(self) -> int:
        return FakeProcess.status

    def poll(self) -> int:
        return FakeProcess.status


@pytest.fixture
def fake_processes(monkeypatch):
    FakeProcess.calls, FakeProcess.status = [], 0
    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    return FakeProcess


def test_run_sweep_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, fake_processes):
    calls = fake_processes.calls
    _fake_run(tmp_path / "affnist" / "capsnet-seed0")
    _fake_run(tmp_path / "affnist" / "cnn-small-seed0", finished=False, checkpoint=True)
    assert run_sweep("affnist", tmp_path, only=["capsnet-seed0", "cnn-small-seed0"]) == ["cnn-small-seed0"]
    (command,) = calls
    assert command[1:4] == ["-m", "capsnet", "train"]
    assert command[-4:] == ["--out", str(tmp_path / "affnist" / "cnn-small-seed0"), "--resume", "--quiet"]
    assert command[4:-4] == SWEEPS["affnist"]["cnn-small-seed0"]


def test_a_parallel_sweep_starts_the_next_run_when_any_run_ends(tmp_path, monkeypatch):
    """The first run outlasts the others: its place is not waited for, the second's is reused."""
    started = []

    class Slow:
        def __init__(self, command, **kwargs):
            self.run, self.polls = Path(command[command.index("--out") + 1]).name, 0
            started.append(self.run)

        def poll(self):
            self.polls += 1
            assert self.polls < 1000, "the sweep waited for the long run only"
            return None if self.run == "capsnet-seed0" and len(started) < 3 else 0

    monkeypatch.setattr(subprocess, "Popen", Slow)
    monkeypatch.setattr("capsnet.sweeps.time.sleep", lambda seconds: None)
    runs = ["capsnet-seed0", "capsnet-seed1", "capsnet-seed2"]
    trained = run_sweep("affnist", tmp_path, only=runs, parallel=2)
    assert trained[0] == "capsnet-seed1" and sorted(trained) == runs
    assert started == runs


def test_sweep_records(tmp_path):
    for run in SWEEPS["affnist"]:
        _fake_run(tmp_path / "affnist" / run)
    records = sweep_records("affnist", root=tmp_path)
    assert sorted(records) == sorted(SWEEPS["affnist"])
    assert records["capsnet-seed0"]["final"]["accuracy"] == 0.5
    assert records["capsnet-seed0"]["metrics"] == [{"epoch": 1, "test_accuracy": 0.5}]
    (tmp_path / "affnist" / "capsnet-seed0" / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="python -m capsnet sweep affnist --only capsnet-seed0"):
        sweep_records("affnist", root=tmp_path)


def test_sweep_records_refuse_an_unfinished_run(tmp_path):
    _fake_run(tmp_path / "affnist" / "capsnet-seed0", finished=False)
    _fake_run(tmp_path / "affnist" / "cnn-small-seed0")
    with pytest.raises(FileNotFoundError, match="capsnet-seed0 is not finished"):
        sweep_records("affnist", root=tmp_path)


def test_a_failed_run_stops_the_sweep_with_one_line(tmp_path, fake_processes, capsys):
    fake_processes.status = 1
    with pytest.raises(SweepError, match="run capsnet-seed0 failed .*exit status 1.*this one resumes"):
        run_sweep("affnist", tmp_path)
    assert main(["sweep", "affnist", "--root", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m capsnet sweep: error: sweep affnist: run capsnet-seed0 failed")


def test_affnist_compares_the_models_stopped_at_one_validation_accuracy():
    """Chapter 11's protocol: both models, three seeds, the same options but for the model and
    its step budget; each stops at AFFNIST_TARGET on validation checks, and tests on the same
    images (the default test seed)."""
    runs = sweep_runs("affnist")
    assert set(runs) == {f"{m}-seed{s}" for m in ("capsnet", "cnn-small") for s in SEEDS}
    shared = None
    for run, args in runs.items():
        config = build_parser().parse_args(["train", *args])
        assert (config.model, config.seed) == (run.rsplit("-seed", 1)[0], int(run.rsplit("-seed", 1)[1]))
        assert config.stop_at_val_accuracy == float(AFFNIST_TARGET) and config.val_every and config.val_size
        assert config.test_seed is None and config.steps
        options = {k: v for k, v in vars(config).items() if k not in ("model", "seed", "steps")}
        assert shared in (None, options), run
        shared = options


def test_data_efficiency_to_convergence_differs_only_in_model_size_and_seed():
    """Chapter 13's second protocol: each run stops when validation accuracy stops improving
    (a patience rule, or a cap), CapsNet at the paper's rate, each CNN at the rate its own
    tuning runs chose on validation; all test on the same images."""
    tuning = sweep_runs("data-efficiency-tuning")
    assert set(CNN_LR) == {"cnn-small", "cnn-flops"} and set(CNN_LR.values()) <= set(CNN_LRS)
    assert set(tuning) == {f"{model}-lr{lr}" for model in CNN_LR for lr in CNN_LRS}
    runs = sweep_runs("data-efficiency-converged")
    models = ("capsnet", "cnn-small", "cnn-flops")
    assert set(runs) == {f"{m}-1pct-seed{s}" for m in models for s in CONVERGED_SEEDS}
    assert set(CONVERGED_SEEDS) > set(SEEDS)
    gpu = sweep_runs("data-efficiency-converged-gpu")
    fixed_budget = sweep_runs("data-efficiency")
    assert set(gpu) == set(fixed_budget) | {r.replace("cnn-small", "cnn-flops") for r in fixed_budget}
    assert set(gpu) > {run for run in runs if int(run.rsplit("seed", 1)[1]) in SEEDS}
    for run, args in runs.items():  # the GPU sweep is the CPU sweep with a longer cap, and more sizes
        if run not in gpu:  # the CPU sweep's extra seeds
            continue
        cap = args.index("--steps") + 1
        assert gpu[run][:cap] + gpu[run][cap + 1 :] == args[:cap] + args[cap + 1 :], run
        assert int(gpu[run][cap]) > int(args[cap])
    runs = {**runs, **{f"gpu-{run}": args for run, args in gpu.items()}}
    shared = None
    for run, args in {**tuning, **runs}.items():
        config = build_parser().parse_args(["train", *args])
        assert config.val_patience and config.val_every and config.val_size and config.steps
        assert config.test_seed is None and config.stop_at_val_accuracy is None
        if run in runs:
            assert config.lr == (1e-3 if config.model == "capsnet" else float(CNN_LR[config.model])), run
        else:
            assert config.model in CNN_LR and float(run.rsplit("-lr", 1)[1]) == config.lr, run
            assert (config.seed, config.train_size) == (0, 600), run
        varied = ("model", "seed", "steps", "train_size", "lr")
        options = {k: v for k, v in vars(config).items() if k not in varied}
        assert shared in (None, options), run
        shared = options


def test_paper_gpu_sweep_is_table_1_in_priority_order():
    runs = sweep_runs("paper-gpu")
    parts = ["r3-recon", "r1-recon", "r3-norecon", "r1-norecon"]
    assert list(runs) == [f"{part}-seed{seed}" for part in parts for seed in (0, 1, 2)]
    for run, args in runs.items():
        config = build_parser().parse_args(["train", *args])
        # all of MNIST, the paper's schedule for 50 epochs fixed in advance, the full test set
        # (so the same images) after every epoch
        assert (config.train_size, config.test_size, config.epochs, config.test_every) == (0, 0, 50, 1)
        assert config.profile == "paper" and config.lr is None and config.steps is None
        assert config.routing_iterations == int(run[1])
        assert bool(config.no_decoder) == ("norecon" in run)


TINY = [
    "--profile",
    "smoke",
    "--train-size",
    "64",
    "--test-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "1",
]


def test_a_time_budget_measures_an_epoch_first_and_skips_runs_that_would_not_finish(tmp_path):
    only = ["r3-recon-seed0", "r1-recon-seed0"]
    trained = run_sweep("paper-gpu", tmp_path, only, time_budget=600, extra=TINY)
    assert trained == only
    record = json.loads((tmp_path / "paper-gpu" / "sweep.json").read_text())
    assert record["probe"]["run"] == "r3-recon-seed0" and record["probe"]["epoch"] > 0
    assert record["trained"] == only and record["skipped"] == []
    assert not list((tmp_path / "paper-gpu").glob(".probe-*")), "the measurement's folder is removed"
    for run in only:
        run_record = json.loads((tmp_path / "paper-gpu" / run / "run.json").read_text())
        assert run_record["final"]["test_images"] == 32
    # A budget too short for anything: the rest is skipped, each with its reason, nothing trained.
    assert run_sweep("paper-gpu", tmp_path, ["r3-norecon-seed0"], time_budget=0.5, extra=TINY) == []
    record = json.loads((tmp_path / "paper-gpu" / "sweep.json").read_text())
    assert [s["run"] for s in record["skipped"]] == ["r3-norecon-seed0"]
    assert "left of 0 s" in record["skipped"][0]["reason"]


def test_runs_can_share_the_machine(tmp_path):
    only = ["r1-norecon-seed0", "r1-norecon-seed1"]
    assert sorted(run_sweep("paper-gpu", tmp_path, only, parallel=2, extra=TINY)) == only
    assert json.loads((tmp_path / "paper-gpu" / "sweep.json").read_text())["parallel"] == 2
    with pytest.raises(ValueError, match="parallel must be at least 1"):
        run_sweep("paper-gpu", tmp_path, only, parallel=0)
