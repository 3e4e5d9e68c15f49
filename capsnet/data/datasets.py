"""Finding, verifying and downloading MNIST and Fashion-MNIST.

Where the files are looked for, in order:

1. the ``root`` folder passed to :func:`load_dataset`;
2. the folder named by ``$CAPSNET_DATA``;
3. the user cache folder (``$XDG_CACHE_HOME/capsnet`` or ``~/.cache/capsnet``), where downloads go.

Each folder holds one sub-folder per data set (``mnist/``, ``fashion-mnist/``) with the four
standard files, gzip-compressed or not. Every file's MD5 (of the uncompressed bytes) is checked
against the published checksum before it is used.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .idx import IDXError, parse_idx

__all__ = [
    "DATASETS",
    "DataError",
    "DownloadError",
    "Split",
    "cache_dir",
    "download_file",
    "load_dataset",
    "locate_file",
]


class DataError(RuntimeError):
    """A data file is missing, damaged or cannot be fetched; the message says what to do."""


@dataclass(frozen=True)
class Split:
    """One split of a data set: images ``(n, 1, 28, 28)`` uint8 and labels ``(n,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class _Spec:
    files: dict[str, str]  # file name (uncompressed) -> MD5 of its uncompressed bytes
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]


DATASETS: dict[str, _Spec] = {
    "mnist": _Spec(
        files={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
    ),
    "fashion-mnist": _Spec(
        files={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
}  # fmt: skip

_HELP = (
    "Point the package at a folder that holds '{name}/{file}.gz' with root=... or the CAPSNET_DATA "
    "environment variable (for example CAPSNET_DATA=../shared/data), or connect to the internet so "
    "it can be downloaded into {cache}."
)


def cache_dir() -> Path:
    """The user cache folder where downloads are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsnet"


def _spec(name: str) -> _Spec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def _search_roots(root: str | Path | None) -> list[Path]:
    roots = [Path(root)] if root is not None else []
    if os.environ.get("CAPSNET_DATA"):
        roots.append(Path(os.environ["CAPSNET_DATA"]))
    roots.append(cache_dir())
    return roots


def _read_verified(path: Path, name: str, file: str) -> bytes:
    """The uncompressed bytes of ``path`` after checking their MD5; :class:`DataError` if wrong."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{path} is damaged (not a complete gzip file: {err}). Delete it and download it "
                "again, or replace it with a good copy."
            ) from err
    digest = hashlib.md5(raw).hexdigest()
    expected = DATASETS[name].files[file]
    if digest != expected:
        raise DataError(
            f"{path} is corrupted or truncated: the MD5 of its contents is {digest}, expected "
            f"{expected}. Delete it and download it again, or replace it with a good copy."
        )
    return raw


class DownloadError(DataError):
    """None of the given addresses could be fetched; the message lists each one's error."""


def download_file(urls: list[str], target: Path, progress: bool = True) -> Path:
    """Fetch the first of ``urls`` that answers into ``target``, with a progress bar.

    The bytes go to ``target.part`` first and are renamed to ``target`` only when complete, so an
    interrupted download never leaves a file that looks finished.
    """
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, partial.open("wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress)
                with bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            partial.replace(target)
            return target
        except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
            errors.append(f"{url}: {err}")
            partial.unlink(missing_ok=True)
    raise DownloadError("; ".join(errors))


def _download(name: str, file: str, target: Path, progress: bool) -> None:
    """Fetch ``file.gz`` of data set ``name`` from its mirrors into ``target``."""
    try:
        download_file([f"{mirror}{file}.gz" for mirror in DATASETS[name].mirrors], target, progress)
    except DownloadError as err:
        raise DataError(
            f"could not download {name}/{file}.gz ({err}). "
            + _HELP.format(name=name, file=file, cache=cache_dir())
        ) from err


def _locate(
    name: str, file: str, root: str | Path | None, download: bool, progress: bool
) -> tuple[Path, bytes]:
    """Path and verified, uncompressed bytes of ``file`` of data set ``name``."""
    spec = _spec(name)
    if file not in spec.files:
        raise ValueError(f"{name} has no file {file!r}: its files are {', '.join(spec.files)}")
    for folder in _search_roots(root):
        for candidate in (folder / name / f"{file}.gz", folder / name / file):
            if candidate.is_file():
                return candidate, _read_verified(candidate, name, file)
    if not download:
        searched = ", ".join(str(r / name) for r in _search_roots(root))
        raise DataError(
            f"{name}/{file} was not found (searched {searched}). "
            + _HELP.format(name=name, file=file, cache=cache_dir())
        )
    target = cache_dir() / name / f"{file}.gz"
    _download(name, file, target, progress)
    try:
        return target, _read_verified(target, name, file)
    except DataError:
        target.unlink(missing_ok=True)
        raise


def locate_file(
    name: str, file: str, root: str | Path | None = None, download: bool = True, progress: bool = True
) -> Path:
    """Path of a verified copy of ``file`` of data set ``name``, downloading it if needed."""
    return _locate(name, file, root, download, progress)[0]


def load_dataset(
    name: str = "mnist",
    split: str = "train",
    root: str | Path | None = None,
    *,
    download: bool = True,
    progress: bool = True,
) -> Split:
    """Load one split of MNIST or Fashion-MNIST as uint8 images and int64 labels (on the CPU).

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: a folder holding ``name/`` with the IDX files; searched before ``$CAPSNET_DATA`` and
            the cache.
        download: fetch missing files from the public mirrors into the cache.
        progress: show a progress bar while downloading.

    Returns:
        A :class:`Split` with ``images`` of shape ``(n, 1, 28, 28)`` (uint8) and ``labels`` ``(n,)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        file = f"{prefix}-{kind}"
        path, raw = _locate(name, file, root, download, progress)
        try:
            arrays.append(parse_idx(raw, str(path)))
        except IDXError as err:
            raise DataError(str(err)) from err
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
    return Split(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=_spec(name).classes,
    )
