"""Checkpoints: atomic writes (an interrupted or killed save keeps the previous checkpoint),
clear errors for missing, truncated, corrupted and foreign files, and the float16 weights file."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import capsnet
from capsnet.checkpoint import (
    CheckpointError,
    SaveError,
    load_checkpoint,
    save_checkpoint,
    save_fp16_weights,
    write_atomically,
)


def _state(version: int, size: int = 1000) -> dict:
    return {"model": {"w": torch.full((size,), float(version))}, "epoch": version, "history": [{"a": 0.5}]}


def _assert_version(state: dict, version: int, size: int = 1000) -> None:
    assert state["epoch"] == version
    assert torch.equal(state["model"]["w"], torch.full((size,), float(version)))


def test_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pt"
    assert save_checkpoint(path, _state(1)) == path  # creates the folder
    _assert_version(load_checkpoint(path), 1)
    save_checkpoint(path, _state(2))
    loaded = load_checkpoint(path)
    _assert_version(loaded, 2)
    assert loaded["history"] == [{"a": 0.5}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_new_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "checkpoint.pt", _state(1))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


INTERRUPTIONS = {
    "disk-full": OSError(errno.ENOSPC, "No space left on device"),
    "torch-disk-full": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
    "ctrl-c": KeyboardInterrupt(),
}


@pytest.mark.parametrize("case", INTERRUPTIONS)
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, case):
    interruption = INTERRUPTIONS[case]
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1))
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half a checkpoint...
        raise interruption  # ...then the disk fills up or the user presses Ctrl-C

    monkeypatch.setattr(torch, "save", half_then_fail)
    if isinstance(interruption, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(path, _state(2))
    else:  # one message that says what happened and that the old checkpoint is kept
        with pytest.raises(SaveError, match=r"\(the disk is full\); its previous version is kept"):
            save_checkpoint(path, _state(2))
    monkeypatch.undo()
    _assert_version(load_checkpoint(path), 1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


def test_killed_writer_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that keeps rewriting a 16 MB checkpoint: whenever it dies, the file holds
    one complete version (no cleanup code runs on SIGKILL, so a hidden temporary file may remain)."""
    path = tmp_path / "checkpoint.pt"
    size = 4_000_000
    script = textwrap.dedent(
        f"""
        import sys, torch
        from capsnet.checkpoint import save_checkpoint
        for version in range(1, 10_000):
            state = {{"model": {{"w": torch.full(({size},), float(version))}}, "epoch": version}}
            save_checkpoint({str(path)!r}, state)
            print(version, flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # the first checkpoint is complete
        time.sleep(0.3)  # ...and now it is in the middle of some later save
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    state = load_checkpoint(path)
    _assert_version(state, state["epoch"], size)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(name.startswith(".checkpoint.pt.") and name.endswith(".tmp") for name in leftovers)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state(1, 100_000))
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupted") as info:
        load_checkpoint(path)
    assert "restore it from a backup" in str(info.value)  # says what to do
    assert "without --resume" in str(info.value)


@pytest.mark.parametrize("where", [0.5, 0.01, 0.999])
def test_corrupted_byte_is_detected(tmp_path, where):
    """One flipped byte, in the tensor data (0.5), the pickled structure (0.01) or the zip
    directory (0.999), is an error: never silently different weights."""
    path = save_checkpoint(tmp_path / "checkpoint.pt", _state(1, 100_000))
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)


def test_foreign_files(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save({"weights": torch.ones(3)}, tensor_file)  # a torch file, but not ours
    with pytest.raises(CheckpointError, match="not a capsnet checkpoint.*checkpoint.pt or weights-fp16.pt"):
        load_checkpoint(tensor_file)
    bare = tmp_path / "bare.pt"
    torch.save(torch.ones(3), bare)
    with pytest.raises(CheckpointError, match="not a capsnet checkpoint"):
        load_checkpoint(bare)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(text)
    pickled = tmp_path / "object.pt"
    torch.save({"model": Path("x")}, pickled)  # arbitrary objects are refused, not unpickled
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(pickled)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(plain_pickle)


def test_fp16_weights_are_half_the_size(tmp_path):
    torch.manual_seed(0)
    model = capsnet.CapsNet(conv_channels=16, primary_types=4, decoder_hidden=(32, 64))
    full = tmp_path / "fp32.pt"
    save_checkpoint(full, {"model": model.state_dict()})
    half = save_fp16_weights(tmp_path / "weights-fp16.pt", model, {"epoch": 7, "record": {"a": 1}})
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    state = load_checkpoint(half)
    assert state["epoch"] == 7 and state["record"] == {"a": 1}
    for name, value in model.state_dict().items():
        assert state["model"][name].dtype == torch.float16
        assert torch.equal(state["model"][name], value.half())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the model itself is untouched


def test_fp16_weights_keep_integer_buffers(tmp_path):
    model = torch.nn.BatchNorm1d(3)  # num_batches_tracked is an int64 buffer
    state = load_checkpoint(save_fp16_weights(tmp_path / "w.pt", model, {}))
    assert state["model"]["num_batches_tracked"].dtype == torch.int64
    assert state["model"]["running_mean"].dtype == torch.float16


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """The new name must reach the disk too: fsync of the folder, after os.replace."""
    calls = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda *a: (calls.append("replace"), real_replace(*a))[1])

    def fsync(fd):
        calls.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_atomically(tmp_path / "run.json", lambda f: f.write(b"{}\n"))
    assert calls == ["fsync file", "replace", "fsync folder"]
    assert (tmp_path / "run.json").read_bytes() == b"{}\n"


def test_an_unwritable_place_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError, match="could not write .*its previous version is kept"):
        save_checkpoint(tmp_path / "file" / "checkpoint.pt", _state(1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    state = _state(1, 10)
    state["model"]["w"][3] = bad
    path = save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError, match="holds non-finite weights .* in w: it cannot be evaluated"):
        load_checkpoint(path)
    state["model"]["w"] = torch.ones(10, dtype=torch.int64)  # integer buffers are never NaN
    load_checkpoint(save_checkpoint(path, state))


def test_weights_that_are_not_tensors_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": [1.0, 2.0]}})
    with pytest.raises(CheckpointError, match="'model' entry is not a set of weights"):
        load_checkpoint(path)
