"""Checkpoints that survive a kill: written to a temporary file in the same folder, flushed to
disk, then renamed over the old one (an atomic step on POSIX and Windows file systems), and the
folder's entry flushed too. Loading checks the CRC-32 that :func:`torch.save` stores for every
record of its zip file, so a damaged file is reported instead of silently yielding wrong weights,
and refuses non-finite weights."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "CheckpointError",
    "SaveError",
    "load_checkpoint",
    "save_checkpoint",
    "save_fp16_weights",
    "write_atomically",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or not one of ours, or cannot be written."""


class SaveError(CheckpointError):
    """A file could not be written (a full disk, no permission); its previous version is kept."""


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk, so that a rename in it survives a power cut (POSIX; a
    folder cannot be opened for this on Windows)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_error(path: Path, err: BaseException) -> SaveError:
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or "unexpected pos" in str(err)
    reason = "the disk is full" if full else f"{type(err).__name__}: {err}"
    return SaveError(
        f"could not write {path} ({reason}); its previous version is kept. Free some space or fix "
        "the folder's permissions, then run again (--resume continues a run from its checkpoint)."
    )


def _remove(tmp: Path) -> None:
    """Remove a temporary file, if there is one, without hiding the error being raised."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` with ``write(file)`` atomically: ``path`` holds either its old or its new
    content, never a part. The temporary file (``.NAME.<uuid>.tmp`` beside it) is removed on any
    error; only a killed process leaves one behind (see :mod:`capsnet.run_folder`).

    Raises:
        SaveError: the file could not be written (e.g. the disk is full).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with mode 0o666 lets the umask decide the permissions, as for any new file
        # (tempfile.mkstemp would make every checkpoint readable by its owner only).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        _remove(tmp)
        raise _save_error(path, err) from err
    except BaseException:
        _remove(tmp)
        raise
    return path


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with :func:`torch.save` atomically (:func:`write_atomically`): ``path``
    holds either the old or the new checkpoint, never a half-written one."""
    return write_atomically(path, lambda f: torch.save(state, f))


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({reason}). It may be truncated or corrupted; restore "
        "it from a backup, or start the run again in a new folder (without --resume)."
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or :func:`save_fp16_weights`).

    Load to the CPU (the default) to resume training and move the model afterwards: the states
    of the random number generators must stay CPU byte tensors, whatever device trained the run.

    Raises:
        CheckpointError: ``path`` is missing, truncated, corrupted (a record fails its CRC-32
            check), not a capsnet checkpoint, or its weights are not all finite; the message
            says what to do.
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
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise CheckpointError(
            f"{path} is not a capsnet checkpoint: its 'model' entry is not a set of weights"
        )
    non_finite = [k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if non_finite:
        raise CheckpointError(
            f"{path} holds non-finite weights (NaN or infinity) in {', '.join(non_finite[:3])}"
            + (f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else "")
            + ": it cannot be evaluated or trained on. Use an earlier checkpoint or train again."
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
