"""The command line, ``python -m capsnet train | evaluate | bench``: help texts, a real smoke
run end to end, evaluation of its exported weights, resuming, and one-line errors.

The end-to-end tests train the full-size CapsNet on 512 MNIST images in a subprocess (the slow
part of this file); they are skipped when MNIST is not available offline."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import capsnet
import capsnet.train as train_module
from capsnet.checkpoint import load_checkpoint, save_checkpoint
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


def test_train_stops_at_a_validation_accuracy(tmp_path, data_root):
    """Chapter 11's protocol: checks every 2 steps, stopped at the first that reaches the target
    (any accuracy reaches 0.01), then tested where it stopped."""
    args = ["--dataset", "translated-mnist", "--model", "cnn-small", "--profile", "smoke"]
    args += ["--train-size", "64", "--test-size", "32", "--steps", "6", "--batch-size", "16"]
    args += ["--val-size", "48", "--val-every", "2", "--stop-at-val-accuracy", "0.01"]
    args += ["--val-patience", "2"]  # the target stops the run first
    result = _capsnet("train", *args, "--out", "run", "--quiet", cwd=tmp_path, data=data_root)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["val_every"] == 2 and record["config"]["stop_at_val_accuracy"] == 0.01
    assert record["config"]["val_patience"] == 2
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 2 and metrics["stopped_at"]["step"] == 2
    assert metrics["val_checks"] == [[2, metrics["stopped_at"]["accuracy"]]]
    assert {"test_accuracy", "val_accuracy", "affnist_style_accuracy"} <= set(metrics)
    assert record["final"]["val"]["accuracy"] == metrics["val_accuracy"]


# ----------------------------------------------------------------------------- one-line errors


def _error_line(capsys) -> str:
    """The one line ``main`` printed to stderr."""
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


BAD_OPTIONS = {
    "routing-iterations": (
        ["--routing-iterations", "0"],
        "routing_iterations (--routing-iterations) must be",
    ),
    "lr": (["--lr", "-1"], "lr (--lr) must be a number above 0 and at most 1, got -1.0"),
    "fp16-on-cpu": (["--precision", "fp16", "--device", "cpu"], "precision (--precision): fp16 autocast is"),
    "device": (["--device", "tpu9"], "unknown device 'tpu9' (--device): use cpu or cuda"),
    "steps": (["--steps", "0"], "steps (--steps) must be an integer from 1 to"),
    "test-every": (["--test-every", "0"], "test_every (--test-every) must be an integer from 1"),
    "batch-size-0": (
        ["--batch-size", "0"],
        "batch_size (--batch-size) must be an integer from 1 to 4,096, got 0",
    ),
    "batch-size-huge": (["--batch-size", "100000"], "from 1 to 4,096, got 100000"),
    "train-size": (["--train-size", "-1"], "train_size (--train-size) must be an integer from 0"),
    "test-size": (["--test-size", "-3"], "test_size (--test-size) must be an integer from 0"),
    "max-shift": (
        ["--max-shift", "1000"],
        "max_shift (--max-shift) must be an integer from 0 to 7, got 1000",
    ),
    "epochs": (["--epochs", "0"], "epochs (--epochs) must be an integer from 1 to 10,000, got 0"),
    "seed": (["--seed", "-1"], "seed (--seed) must be an integer from 0"),
    "patience-without-checks": (
        ["--val-size", "100", "--val-patience", "3"],
        "val_patience (--val-patience) counts the validation checks it stops on",
    ),
    "stop-without-checks": (
        ["--val-size", "100", "--stop-at-val-accuracy", "0.9"],
        "stop_at_val_accuracy (--stop-at-val-accuracy) needs the validation checks it stops on",
    ),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_one_line_before_anything_is_made(tmp_path, capsys, case):
    args, message = BAD_OPTIONS[case]
    assert main(["train", "--profile", "smoke", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 1
    line = _error_line(capsys)
    assert line.startswith("python -m capsnet train: error: ") and message in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--steps", "0"], "bench: error: --steps must be from 1 to 10,000, got 0"),
        (["bench", "--batch-size", "0"], "bench: error: --batch-size must be from 1 to 4,096, got 0"),
        (["bench", "--device", "tpu9"], "bench: error: unknown device 'tpu9'"),
        (["sweep", "affnist", "--only", "nope"], "sweep: error: sweep affnist has no run nope"),
    ],
)
def test_other_commands_check_their_options(capsys, args, message):
    assert main(args) == 1
    assert message in _error_line(capsys)


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["train", "--profile", "smoke", "--out", str(tmp_path / "file"), "--quiet"]) == 1
    assert "is a file, not a run folder" in _error_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


def test_a_recorded_run_without_its_checkpoint_is_never_overwritten(tmp_path, capsys):
    """The issue's case: a copy of runs/mnist-reference, as it ships in git."""
    recorded = Path(__file__).resolve().parent.parent / "runs" / "mnist-reference"
    if not (recorded / "run.json").is_file():
        pytest.skip("no recorded reference run in this checkout")
    for name in ("run.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((recorded / name).read_bytes())
    for resume in ([], ["--resume"]):
        assert main(["train", "--profile", "smoke", "--out", str(tmp_path), *resume, "--quiet"]) == 1
        assert "holds the records of a run (run.json, metrics.jsonl)" in _error_line(capsys)
    assert (tmp_path / "run.json").read_bytes() == (recorded / "run.json").read_bytes()


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    from filelock import FileLock

    (tmp_path / "run").mkdir()
    script = f"import sys; from filelock import FileLock; lock = FileLock({str(tmp_path / 'run' / LOCK)!r})"
    script += "; lock.acquire(); print('held', flush=True); sys.stdin.read()"
    other = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert other.stdout.readline().strip() == "held"
        assert main(["train", "--profile", "smoke", "--out", str(tmp_path / "run"), "--quiet"]) == 1
        assert "is in use: another process is training in it" in _error_line(capsys)
    finally:
        other.stdin.close()
        other.wait(timeout=30)
        other.stdout.close()
    FileLock(tmp_path / "run" / LOCK, timeout=0).acquire()  # released by the process that held it


def test_resume_refuses_options_that_conflict_with_the_run(smoke_run, capsys):
    out, _ = smoke_run
    before = (out / "checkpoint.pt").stat().st_mtime_ns
    assert (
        main(["train", "--out", str(out), "--resume", "--lr", "0.01", "--batch-size", "32", "--quiet"]) == 1
    )
    line = _error_line(capsys)
    assert (
        "lr (--lr) 0.01 (the run's: 0.001)" in line and "batch_size (--batch-size) 32 (the run's: 64)" in line
    )
    assert "Only --epochs, --steps and --test-every can change" in line
    assert (out / "checkpoint.pt").stat().st_mtime_ns == before


# ----------------------------------------------------------------------------- tiny runs in this process


TINY_CAPSNET = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": (32, 64)}
TINY_ARGS = ["--profile", "smoke", "--train-size", "48", "--test-size", "16", "--batch-size", "16"]
TINY_ARGS += ["--precision", "fp32", "--device", "cpu", "--quiet"]


@pytest.fixture
def tiny(monkeypatch, one_thread):
    """``train`` on a tiny CapsNet and 48 random images (3 steps per epoch)."""

    def digits(config, split, root):
        n, seed = (config.train_size, 0) if split == "train" else (config.test_size, 1)
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
        return images, torch.randint(0, 10, (n,), generator=gen)

    monkeypatch.setattr(train_module, "_digits", digits)
    monkeypatch.setattr(train_module, "build_model", lambda kind, **kw: capsnet.CapsNet(**TINY_CAPSNET, **kw))


def _break_batch_loss(monkeypatch, at_step: int, exception: BaseException | None = None) -> None:
    """Training step ``at_step`` raises ``exception`` (default: its loss becomes NaN)."""
    real, steps = train_module.batch_loss, [0]

    def patched(model, x, y, recon_weight, train, **options):
        value, scores = real(model, x, y, recon_weight, train, **options)
        steps[0] += train
        if train and steps[0] == at_step:
            if exception is not None:
                raise exception
            value = value * float("nan")
        return value, scores

    monkeypatch.setattr(train_module, "batch_loss", patched)


def test_a_step_budget_is_extended_on_resume(tmp_path, tiny, capsys):
    """--steps 2, then --resume --steps 5: the weights of a run trained straight to 5 steps."""
    assert main(["train", *TINY_ARGS, "--steps", "5", "--out", str(tmp_path / "straight")]) == 0
    assert main(["train", *TINY_ARGS, "--steps", "2", "--out", str(tmp_path / "split")]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--steps", "5", "--quiet"]) == 0
    straight, split = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("straight", "split"))
    assert all(torch.equal(v, straight["model"][k]) for k, v in split["model"].items())
    record = json.loads((tmp_path / "split" / "run.json").read_text())
    assert (record["config"]["steps"], record["config"]["epochs"], record["final"]["epoch"]) == (5, 2, 2)
    assert [m["step"] for m in straight["history"]] == [m["step"] for m in split["history"]] == [3, 5]
    assert len(record["commands"]) == 2  # (in this process, each is pytest's command line)
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--epochs", "3", "--quiet"]) == 0
    record = json.loads((tmp_path / "split" / "run.json").read_text())
    assert (record["config"]["steps"], record["config"]["epochs"], record["epochs_done"]) == (None, 3, 3)


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path, tiny, monkeypatch, capsys):
    out, real_batch_loss = tmp_path / "run", train_module.batch_loss
    _break_batch_loss(monkeypatch, 2, KeyboardInterrupt())  # in epoch 1
    assert main(["train", *TINY_ARGS, "--epochs", "3", "--out", str(out)]) == 130
    assert "train: interrupted; no epoch had finished, so nothing was saved" in _error_line(capsys)
    monkeypatch.setattr(train_module, "batch_loss", real_batch_loss)
    _break_batch_loss(monkeypatch, 5, KeyboardInterrupt())  # in epoch 2
    assert main(["train", *TINY_ARGS, "--epochs", "3", "--out", str(out)]) == 130
    assert f"the last checkpoint in {out} is kept: continue with --out {out} --resume" in _error_line(capsys)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_a_loss_that_diverges_in_the_first_epoch_names_no_checkpoint(tmp_path, tiny, monkeypatch, capsys):
    _break_batch_loss(monkeypatch, 2)
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "run")]) == 1
    line = _error_line(capsys)
    assert "loss became nan in epoch 1" in line and "No checkpoint was written" in line
    assert "kept in" not in line


def test_a_full_disk_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    real_save, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4224")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", *TINY_ARGS, "--epochs", "2", "--out", str(tmp_path / "run")]) == 1
    assert "(the disk is full); its previous version is kept" in _error_line(capsys)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def test_unreadable_data_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    def unreadable(config, split, root):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/mnist/train-images-idx3-ubyte")

    monkeypatch.setattr(train_module, "_digits", unreadable)
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "run")]) == 1
    line = _error_line(capsys)
    assert "/data/mnist/train-images-idx3-ubyte: Permission denied; check its permissions" in line


def test_running_out_of_memory_is_one_line(tmp_path, tiny, monkeypatch, capsys):
    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_module, "make_data", too_big)
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "run")]) == 1
    assert "out of memory; try a smaller --batch-size" in _error_line(capsys)


def test_evaluate_refuses_non_finite_weights_and_crafted_records(tmp_path, tiny, monkeypatch, capsys):
    assert main(["train", *TINY_ARGS, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "weights-fp16.pt"), "--device", "cpu", "--quiet"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    state = load_checkpoint(tmp_path / "run" / "weights-fp16.pt")
    state["model"]["conv1.weight"][0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", state)
    assert main(["evaluate", str(tmp_path / "nan.pt"), "--device", "cpu", "--quiet"]) == 1
    assert "holds non-finite weights (NaN or infinity) in conv1.weight" in _error_line(capsys)
    monkeypatch.setattr(train_module, "build_model", capsnet.models.build_model)  # the record's sizes only
    assert main(["evaluate", str(tmp_path / "run" / "weights-fp16.pt"), "--device", "cpu", "--quiet"]) == 1
    assert "its weights do not fit the capsnet its record describes" in _error_line(capsys)
    state = load_checkpoint(tmp_path / "run" / "weights-fp16.pt")
    state["record"]["model_kwargs"]["conv_channels"] = 1_000_000
    state["record"]["model_kwargs"]["primary_types"] = 1_000_000
    save_checkpoint(tmp_path / "huge.pt", state)
    assert main(["evaluate", str(tmp_path / "huge.pt"), "--device", "cpu", "--quiet"]) == 1
    assert "parameters, more than the 500,000,000 capsnet builds" in _error_line(capsys)
