"""The run folder: what one training run keeps on disk, and the few rules that keep it usable
whatever happens to the process that writes it.

Files:

- ``checkpoint.pt``: the single source of truth. Weights, optimiser, learning-rate schedule,
  random state, the per-epoch history and the run's record; rewritten atomically after every epoch.
- ``metrics.jsonl`` (one JSON line per epoch) and ``run.json`` (the record, wall time, epochs
  done and, once the run is exported, ``final``): derived from the checkpoint and rewritten from
  it after every checkpoint and whenever a run starts or resumes.
- ``weights-fp16.pt``: the finished run's weights in float16 (:func:`capsnet.train.export_weights`).
- ``.lock``: held by the process that trains in the folder (:mod:`filelock`).

Its states, read from what is on disk (:meth:`RunFolder.state`):

- ``"new"``: no run files (no folder, an empty one, or only temporary files a kill left): a
  run may start; ``--resume`` has nothing to continue.
- ``"resumable"``: ``checkpoint.pt`` exists: ``--resume`` continues it, a fresh start is refused.
- ``"records-only"``: ``run.json``, ``metrics.jsonl`` or ``weights-fp16.pt`` without a checkpoint
  (a finished run as kept in git, or someone else's files): never overwritten, never resumed.

What it guarantees: a kill at any moment leaves the last checkpoint whole, and a folder that
``--resume`` continues (records that lag behind the checkpoint are rewritten from it first); a
full disk ends the run with one message and the last checkpoint kept; temporary files a kill left
behind are removed when a run starts or resumes; a second process that tries to train in a folder
in use is refused.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .checkpoint import load_checkpoint, save_checkpoint, write_atomically

__all__ = ["RunFolder", "RunFolderError", "strict_json", "CHECKPOINT", "METRICS", "RECORD", "WEIGHTS", "LOCK"]

CHECKPOINT, METRICS, RECORD, WEIGHTS, LOCK = (
    "checkpoint.pt",
    "metrics.jsonl",
    "run.json",
    "weights-fp16.pt",
    ".lock",
)
RECORDS = (RECORD, METRICS, WEIGHTS)
# what write_atomically leaves when killed (.NAME.<uuid>.tmp), and earlier versions' NAME.tmp
_TEMPORARY = re.compile(
    r"\.(checkpoint\.pt|weights-fp16\.pt|run\.json|metrics\.jsonl)\.[0-9a-f]{32}\.tmp|(run\.json|metrics\.jsonl)\.tmp"
)
# the folders this process holds: a nested hold (fit inside the command line's) is reentrant
_HELD: dict[Path, FileLock] = {}


class RunFolderError(RuntimeError):
    """A folder cannot be used as a run folder as asked (in use, a file, not writable, or holding
    records without a checkpoint); the message says what to do."""


def strict_json(data: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and infinity (which are not JSON) instead of writing them."""
    return json.dumps(data, allow_nan=False, **kwargs)


class RunFolder:
    """The run folder at ``path`` (see the module's description)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        """``checkpoint.pt``, the source of truth."""
        return self.path / CHECKPOINT

    @property
    def weights(self) -> Path:
        """``weights-fp16.pt``, the exported weights."""
        return self.path / WEIGHTS

    def records(self) -> list[str]:
        """The run records in the folder: ``run.json``, ``metrics.jsonl``, ``weights-fp16.pt``."""
        return [name for name in RECORDS if (self.path / name).exists()]

    def state(self) -> str:
        """``"new"``, ``"resumable"`` or ``"records-only"``."""
        if self.checkpoint.exists():
            return "resumable"
        return "records-only" if self.records() else "new"

    @contextmanager
    def hold(self) -> Iterator[RunFolder]:
        """Hold the folder for this process while it trains or exports there: create it, lock
        it, and remove the temporary files a killed process left. Holds nest within a process.

        Raises:
            RunFolderError: the folder is a file, cannot be created or written, or another
                process holds it.
        """
        key = self.path.resolve()
        first = key not in _HELD
        if first:
            _HELD[key] = self._lock()
        else:
            _HELD[key].acquire()
        lock = _HELD[key]
        try:
            if first:
                self._remove_temporaries()
            yield self
        finally:
            lock.release()
            if not lock.is_locked:
                del _HELD[key]

    def _lock(self) -> FileLock:
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(
                f"{self.path} is a file, not a run folder: choose another output folder (--out)"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.path))
            lock = FileLock(self.path / LOCK, timeout=0)
            lock.acquire()
        except Timeout as err:
            raise RunFolderError(
                f"{self.path} is in use: another process is training in it. Wait until it has finished, "
                "or train into another folder (--out)"
            ) from err
        except OSError as err:
            raise RunFolderError(
                f"cannot write in {self.path} ({err.strerror or err}): choose another output folder (--out)"
            ) from err
        return lock

    def _remove_temporaries(self) -> None:
        for path in self.path.iterdir():
            if _TEMPORARY.fullmatch(path.name):
                path.unlink(missing_ok=True)

    def check(self, resume: bool) -> None:
        """Refuse to start a run here (``resume=False``) unless the folder is new, or to continue
        one (``resume=True``) unless it holds a checkpoint.

        Raises:
            FileExistsError: a fresh start where a checkpoint is.
            FileNotFoundError: ``resume`` where nothing is.
            RunFolderError: run records without a checkpoint, for either.
        """
        state = self.state()
        if state == "records-only":
            records = ", ".join(self.records())
            if resume:
                raise RunFolderError(
                    f"{self.path} holds the records of a run ({records}) but no {CHECKPOINT}, so it cannot "
                    "be continued (checkpoints are not kept in git): train again into a new folder"
                )
            raise RunFolderError(
                f"{self.path} holds the records of a run ({records}) without a {CHECKPOINT}; they are never "
                "overwritten: train into another folder (--out), or move them away first"
            )
        if state == "resumable" and not resume:
            raise FileExistsError(
                f"{self.path} already holds a run: pass resume=True (--resume) to continue it, "
                "or choose another output folder"
            )
        if state == "new" and resume:
            raise FileNotFoundError(
                f"{self.path} holds no run to resume (no {CHECKPOINT}): start it without --resume"
            )

    def begin(self, resume: bool) -> dict[str, Any] | None:
        """Start a run here (``resume=False``) or continue one (``resume=True``: returns its
        checkpoint, loaded to the CPU, after rewriting ``metrics.jsonl`` and ``run.json`` from
        it), after :meth:`check`. Call it while holding the folder.

        Raises:
            What :meth:`check` and :func:`capsnet.checkpoint.load_checkpoint` raise.
        """
        self.check(resume)
        if not resume:
            return None
        checkpoint = self.load()
        self.write_records(checkpoint)
        return checkpoint

    def load(self) -> dict[str, Any]:
        """The checkpoint, every tensor on the CPU (see :func:`capsnet.checkpoint.load_checkpoint`)."""
        return load_checkpoint(self.checkpoint)

    def commit(self, checkpoint: dict[str, Any]) -> None:
        """Save ``checkpoint`` (the new source of truth), then rewrite the records from it. The
        records are made first, so a value that is not JSON fails before anything is written."""
        records = self._records(checkpoint)
        save_checkpoint(self.checkpoint, checkpoint)
        self._write(records)

    def write_records(self, checkpoint: dict[str, Any], final: dict[str, Any] | None = None) -> None:
        """Rewrite ``metrics.jsonl`` and ``run.json`` from ``checkpoint`` (``final``: the
        evaluation of the exported weights, see :func:`capsnet.train.export_weights`)."""
        self._write(self._records(checkpoint, final))

    def _records(self, checkpoint: dict[str, Any], final: dict[str, Any] | None = None) -> dict[str, str]:
        history = checkpoint["history"]
        record = {
            **checkpoint.get("record", {}),
            "wall_seconds": sum(m["seconds"] for m in history),
            "epochs_done": checkpoint["epoch"],
        }
        if final is not None:
            record["final"] = final
        return {
            METRICS: "".join(strict_json(m) + "\n" for m in history),
            RECORD: strict_json(record, indent=2) + "\n",
        }

    def _write(self, records: dict[str, str]) -> None:
        for name, text in records.items():
            write_atomically(self.path / name, lambda f, text=text: f.write(text.encode()))
