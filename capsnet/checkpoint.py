"""Checkpoints that survive a kill: written to a temporary file in the same folder, flushed to
disk, then renamed over the old one (an atomic step on POSIX and Windows file systems)."""

from __future__ import annotations

import os
import tempfile
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error if it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}). It may be truncated "
            "or corrupted; restore it from a backup or start the run again without --resume."
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a capsnet checkpoint (no 'model' entry)")
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
