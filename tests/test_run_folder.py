"""The run folder (capsnet.run_folder): its states, the folders it refuses, the lock that keeps a
second process out, the temporary files a kill leaves, records that lag behind the checkpoint,
and a full disk. Tiny models on random data, trained by fit."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import capsnet
from capsnet.checkpoint import SaveError, load_checkpoint
from capsnet.data import DeviceBatches
from capsnet.run_folder import LOCK, RunFolder, RunFolderError
from capsnet.train import fit

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BASELINE = {"channels": (4, 4, 4), "hidden": (8, 8)}
UUID = "0123456789abcdef0123456789abcdef"
STALE = [f".checkpoint.pt.{UUID}.tmp", f".run.json.{UUID}.tmp", f".metrics.jsonl.{UUID}.tmp", "run.json.tmp"]
STALE += [f".weights-fp16.pt.{UUID}.tmp", "metrics.jsonl.tmp"]
NOT_OURS = ["notes.tmp", ".checkpoint.pt.mine.tmp", "run.json"]


def _fit(out: Path, epochs: int, **kwargs) -> list[dict]:
    """The baseline CNN (tiny) on 48 random images, 3 batches per epoch."""
    torch.manual_seed(0)
    model = capsnet.BaselineCNN(**TINY_BASELINE)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 28, 28), generator=gen, dtype=torch.uint8)
    batches = DeviceBatches(images, torch.randint(0, 10, (48,), generator=gen), 16, shuffle=True)
    return fit(model, batches, epochs=epochs, precision="fp32", out_dir=out, progress=False, **kwargs)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK)


def _assert_records_match_the_checkpoint(folder: Path) -> None:
    state = load_checkpoint(folder / "checkpoint.pt")
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert lines == state["history"]
    record = json.loads((folder / "run.json").read_text())
    assert record["epochs_done"] == state["epoch"]
    assert record["wall_seconds"] == sum(m["seconds"] for m in state["history"])


# ----------------------------------------------------------------------------- states


def test_states(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert folder.state() == "new"  # not there yet
    (tmp_path / "run").mkdir()
    for name in [LOCK, *STALE[:2]]:
        (tmp_path / "run" / name).write_bytes(b"")
    assert folder.state() == "new"  # only what a kill leaves
    for record in ("run.json", "metrics.jsonl", "weights-fp16.pt"):
        (tmp_path / "run" / record).write_text("{}")
        assert folder.state() == "records-only" and folder.records()[-1] == record
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert folder.state() == "resumable"


@pytest.mark.parametrize("record", ["run.json", "metrics.jsonl", "weights-fp16.pt"])
def test_a_folder_with_records_but_no_checkpoint_is_never_overwritten(tmp_path, record):
    """How runs/ ships in git: the records of a finished run, without its checkpoint."""
    (tmp_path / record).write_text('{"final": {"accuracy": 0.9957}}\n')
    with pytest.raises(RunFolderError, match=rf"holds the records of a run \({record}\).*never overwritten"):
        _fit(tmp_path, 1)
    with pytest.raises(RunFolderError, match="cannot be continued.*train again into a new folder"):
        _fit(tmp_path, 1, resume=True)
    assert _files(tmp_path) == [record]
    assert (tmp_path / record).read_text() == '{"final": {"accuracy": 0.9957}}\n'


def test_a_copy_of_a_recorded_run_is_refused(tmp_path):
    recorded = Path(__file__).resolve().parent.parent / "runs" / "mnist-reference"
    if not (recorded / "run.json").is_file():
        pytest.skip("no recorded reference run in this checkout")
    for name in ("run.json", "metrics.jsonl"):
        (tmp_path / name).write_bytes((recorded / name).read_bytes())
    with pytest.raises(RunFolderError, match="never overwritten"):
        _fit(tmp_path, 1)
    assert (tmp_path / "run.json").read_bytes() == (recorded / "run.json").read_bytes()


def test_a_file_or_an_unwritable_place_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunFolderError, match="is a file, not a run folder"):
        _fit(tmp_path / "file", 1)
    with pytest.raises(RunFolderError, match=r"cannot write in .*file/run"):
        _fit(tmp_path / "file" / "run", 1)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only folder (not as root)
    with pytest.raises(RunFolderError, match="cannot write in .*Permission denied"):
        _fit(tmp_path / "read-only", 1)
    assert (tmp_path / "file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- lock


def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that holds ``folder``'s lock until its standard input closes."""
    script = textwrap.dedent(
        f"""
        import sys
        from filelock import FileLock
        lock = FileLock({str(folder / LOCK)!r}, timeout=0)
        lock.acquire()
        print("held", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    other = _hold_in_another_process(tmp_path / "run")
    try:
        with pytest.raises(RunFolderError, match="is in use: another process is training in it"):
            _fit(tmp_path / "run", 1)
        assert _files(tmp_path / "run") == []
    finally:
        other.stdin.close()
        other.wait(timeout=30)
        other.stdout.close()
    _fit(tmp_path / "run", 1)  # free again
    assert _files(tmp_path / "run") == ["checkpoint.pt", "metrics.jsonl", "run.json"]


def test_holds_nest_within_a_process_and_are_released(tmp_path):
    folder = RunFolder(tmp_path)
    with folder.hold(), RunFolder(tmp_path / ".").hold():
        _fit(tmp_path, 1)  # fit holds it too
    other = _hold_in_another_process(tmp_path)  # released: another process can take it
    other.stdin.close()
    other.wait(timeout=30)
    other.stdout.close()


def test_a_failed_run_releases_the_folder(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        _fit(tmp_path, 1, record={"bad": float("nan")})
    _fit(tmp_path, 1)


# ----------------------------------------------------------------------------- temporary files


def test_temporary_files_left_by_a_kill_are_removed_on_start_and_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in STALE + NOT_OURS[:2]:
        (run / name).write_bytes(b"\0" * 10)
    _fit(run, 1)
    assert _files(run) == sorted(["checkpoint.pt", "metrics.jsonl", "run.json", *NOT_OURS[:2]])
    for name in STALE:
        (run / name).write_bytes(b"")
    _fit(run, 2, resume=True)
    assert _files(run) == sorted(["checkpoint.pt", "metrics.jsonl", "run.json", *NOT_OURS[:2]])


# ----------------------------------------------------------------------------- records


@pytest.mark.parametrize("lag", ["no-records", "one-epoch-behind"])
def test_records_are_rewritten_from_the_checkpoint_on_resume(tmp_path, lag):
    """A kill between the checkpoint and the records leaves them missing or an epoch behind:
    the resume, even one with nothing left to train, rewrites them from the checkpoint."""
    _fit(tmp_path, 2)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    if lag == "no-records":
        (tmp_path / "metrics.jsonl").unlink()
        (tmp_path / "run.json").unlink()
    else:
        (tmp_path / "metrics.jsonl").write_text(metrics.splitlines(keepends=True)[0])
        record = json.loads((tmp_path / "run.json").read_text())
        (tmp_path / "run.json").write_text(json.dumps({**record, "epochs_done": 1, "final": {"epoch": 1}}))
    history = _fit(tmp_path, 2, resume=True)
    assert len(history) == 2
    _assert_records_match_the_checkpoint(tmp_path)
    assert "final" not in json.loads((tmp_path / "run.json").read_text())  # it was not this checkpoint's


# ----------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    saves, real_save = [0], torch.save

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # epoch 2's checkpoint: torch's own message for a full disk
            f.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4288 vs 4224")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SaveError, match=r"checkpoint.pt \(the disk is full\); its previous version is kept"):
        _fit(tmp_path, 3)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert _files(tmp_path) == ["checkpoint.pt", "metrics.jsonl", "run.json"]  # no temporary file
    _assert_records_match_the_checkpoint(tmp_path)
    assert len(_fit(tmp_path, 3, resume=True)) == 3


def test_a_full_disk_while_writing_the_records(tmp_path, monkeypatch):
    """The disk fills up after epoch 2's checkpoint, while run.json is written: no empty
    run.json.tmp is left, and the resume brings the records up to the checkpoint."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".run.json.") and (
            json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
        ):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc to tell which file is written")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SaveError, match=r"run.json \(the disk is full\)"):
        _fit(tmp_path, 3)
    monkeypatch.undo()
    assert _files(tmp_path) == ["checkpoint.pt", "metrics.jsonl", "run.json"]
    assert json.loads((tmp_path / "run.json").read_text())["epochs_done"] == 1  # one behind
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2
    _fit(tmp_path, 2, resume=True)
    _assert_records_match_the_checkpoint(tmp_path)
