"""Checkpoints that survive a kill: written to a temporary file in the same folder, flushed to
disk, then renamed over the old one (an atomic step on POSIX and Windows file systems). Loading
checks the CRC-32 that :func:`torch.save` stores for every record of its zip file, so a damaged
file is reported instead of silently yielding wrong weights."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "save_fp16_weights"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or not one of ours."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with :func:`torch.save` atomically: ``path`` holds either the old or the
    new checkpoint, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file
    # (tempfile.mkstemp would make every checkpoint readable by its owner only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({reason}). It may be truncated or corrupted; restore "
        "it from a backup, or start the run again in a new folder (without --resume)."
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or :func:`save_fp16_weights`).

    Raises:
        CheckpointError: ``path`` is missing, truncated, corrupted (a record fails its CRC-32
            check) or not a capsnet checkpoint; the message says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: check the path (a run folder holds checkpoint.pt)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC-32
    except Exception as err:  # zipfile raises several types for a damaged archive
        raise _damaged(path, f"{type(err).__name__}: {err}") from err
    if bad is not None:
        raise _damaged(path, f"record {bad!r} fails its CRC-32 check")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise _damaged(path, f"{type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(
            f"{path} is not a capsnet checkpoint (a torch file without a 'model' entry): pass a "
            "checkpoint.pt or weights-fp16.pt written by capsnet's training"
        )
    return state


def save_fp16_weights(path: str | Path, model: torch.nn.Module, extra: dict[str, Any]) -> Path:
    """Save a compact copy of a model: its floating-point weights in float16 plus ``extra``
    (e.g. the model's configuration). Half the size of float32; accuracy is unchanged in practice,
    and :func:`capsnet.evaluate` on the loaded weights is what records report."""
    weights = {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype)
        for k, v in model.state_dict().items()
    }
    return save_checkpoint(path, {"model": weights, **extra})
