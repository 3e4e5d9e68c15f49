"""Tests of capsnet.data: the IDX format, finding/verifying/downloading data sets, random shifts
and device batches. Everything runs on small files the tests write, except the checks of the real
MNIST and Fashion-MNIST files, which run when $CAPSNET_DATA points at them."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet.data import (
    DATASETS,
    DataError,
    DeviceBatches,
    IDXError,
    cache_dir,
    load_dataset,
    locate_file,
    random_shift,
    read_idx,
    write_idx,
)

# --------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path: Path, suffix: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, (3, 4, 5)) if dtype == np.uint8 else rng.uniform(-100, 100, (3, 4, 5))
    array = values.astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz"), (
        "gzip exactly when the name ends in .gz"
    )
    back = read_idx(path)
    assert back.shape == array.shape and back.dtype.kind == array.dtype.kind
    assert back.dtype.itemsize == array.dtype.itemsize
    np.testing.assert_array_equal(back, array)


def test_idx_bytes_follow_the_format(tmp_path: Path) -> None:
    """The header is two zero bytes, the type code, the number of dimensions and big-endian sizes;
    multi-byte data are big-endian too."""
    write_idx(tmp_path / "u8", np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert (tmp_path / "u8").read_bytes() == b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + bytes(range(6))
    write_idx(tmp_path / "i32", np.array([1, -2], dtype=np.int32))
    expected = b"\x00\x00\x0c\x01" + struct.pack(">I", 2) + struct.pack(">ii", 1, -2)
    assert (tmp_path / "i32").read_bytes() == expected


def test_idx_reads_a_handwritten_gzip_file(tmp_path: Path) -> None:
    raw = b"\x00\x00\x08\x01" + struct.pack(">I", 4) + bytes([7, 8, 9, 10])
    (tmp_path / "labels.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels.gz"), [7, 8, 9, 10])


def test_idx_refuses_dtypes_it_cannot_store(tmp_path: Path) -> None:
    with pytest.raises(IDXError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _valid_idx_bytes() -> bytes:
    return b"\x00\x00\x08\x03" + struct.pack(">III", 2, 3, 4) + bytes(24)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_valid_idx_bytes()[:-1], "truncated"),  # one data byte missing
        (_valid_idx_bytes() + b"\x00", "truncated or corrupted"),  # one byte too many
        (_valid_idx_bytes()[:10], "header needs 16 bytes"),  # cut inside the header
        (b"\x1f\x00" + _valid_idx_bytes()[2:], "does not start with two zero bytes"),  # wrong magic
        (b"PK\x03\x04" + bytes(20), "does not start with two zero bytes"),  # a zip file
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX data type 0x07"),
        (b"", "not an IDX file"),
    ],
)
def test_idx_errors(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def _damaged_gzip(kind: str) -> bytes:
    data = gzip.compress(_valid_idx_bytes() + bytes(range(256)) * 40)
    if kind == "cut":  # the download stopped half way
        return data[: len(data) // 2]
    if kind == "crc":  # the last bytes hold the CRC-32 and size
        return data[:-8] + bytes(8)
    damaged = bytearray(data)  # garbage in the deflate stream
    for i in range(12, len(damaged) - 8, 5):
        damaged[i] ^= 0xFF
    return bytes(damaged)


@pytest.mark.parametrize("kind", ["cut", "crc", "garbage"])
def test_idx_damaged_gzip(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad-idx.gz"
    path.write_bytes(_damaged_gzip(kind))
    with pytest.raises(IDXError, match="damaged gzip"):
        read_idx(path)


# ------------------------------------------------------------------------------ finding the files


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $CAPSNET_DATA, the cache under tmp_path, and no network: every test starts from nothing."""
    monkeypatch.delenv("CAPSNET_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path


def _fake_files(seed: int = 0, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _idx_bytes(tmp_path: Path, array: np.ndarray) -> bytes:
    write_idx(tmp_path / "scratch", array)
    return (tmp_path / "scratch").read_bytes()


def _checksums(tmp_path: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {file: hashlib.md5(_idx_bytes(tmp_path, array)).hexdigest() for file, array in arrays.items()}


def _trust(monkeypatch: pytest.MonkeyPatch, name: str, checksums: dict[str, str]) -> None:
    """Make ``checksums`` the published MD5s of data set ``name`` for this test."""
    spec = DATASETS[name]
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, files={**spec.files, **checksums}))


def _write_dataset(folder: Path, name: str, arrays: dict[str, np.ndarray], gz: bool = True) -> None:
    (folder / name).mkdir(parents=True, exist_ok=True)
    for file, array in arrays.items():
        write_idx(folder / name / (file + (".gz" if gz else "")), array)


def _fake_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, folder: Path, name: str = "mnist", gz: bool = True
) -> dict[str, np.ndarray]:
    """Write a tiny data set into ``folder/name`` and trust its checksums."""
    arrays = _fake_files()
    _write_dataset(folder, name, arrays, gz)
    _trust(monkeypatch, name, _checksums(tmp_path, arrays))
    return arrays


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_a_small_dataset(monkeypatch: pytest.MonkeyPatch, isolated: Path, gz: bool, name: str) -> None:
    arrays = _fake_dataset(monkeypatch, isolated, isolated / "root", name, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset(name, split, root=isolated / "root", download=False)
        images, labels = arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
        assert data.images.shape == (len(images), 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.shape == (len(images),) and data.labels.dtype == torch.int64
        assert len(data) == len(images)
        assert torch.equal(data.images[:, 0], torch.from_numpy(images))
        assert torch.equal(data.labels, torch.from_numpy(labels).long())
        assert data.classes == DATASETS[name].classes and len(data.classes) == 10
        data.images[0, 0, 0, 0] = 1  # the tensors own writable memory


@pytest.mark.parametrize("gz", [True, False])
def test_wrong_checksum(isolated: Path, gz: bool) -> None:
    """Files that are valid IDX but not the published ones are refused, naming the file and both MD5s."""
    _write_dataset(isolated / "root", "mnist", _fake_files(), gz)
    with pytest.raises(DataError, match="corrupted or truncated") as info:
        load_dataset("mnist", "test", root=isolated / "root", download=False)
    message = str(info.value)
    assert str(isolated / "root" / "mnist" / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))) in message
    assert DATASETS["mnist"].files["t10k-images-idx3-ubyte"] in message and "Delete it" in message


@pytest.mark.parametrize("kind", ["cut", "crc", "garbage"])
def test_damaged_gzip_in_a_dataset(isolated: Path, kind: str) -> None:
    (isolated / "root" / "mnist").mkdir(parents=True)
    path = isolated / "root" / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(_damaged_gzip(kind))
    with pytest.raises(DataError, match="is damaged") as info:
        load_dataset("mnist", "test", root=isolated / "root", download=False)
    assert str(path) in str(info.value)


def test_a_truncated_file_with_matching_checksum_is_reported(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    """The IDX reader's own checks back up the MD5: a DataError, not an IDXError, reaches the user."""
    raw = _valid_idx_bytes()[:-3]
    (isolated / "root" / "mnist").mkdir(parents=True)
    (isolated / "root" / "mnist" / "t10k-images-idx3-ubyte").write_bytes(raw)
    _trust(monkeypatch, "mnist", {"t10k-images-idx3-ubyte": hashlib.md5(raw).hexdigest()})
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", "test", root=isolated / "root", download=False)


def test_images_and_labels_must_agree(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    arrays = _fake_files()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:-1]
    _write_dataset(isolated / "root", "mnist", arrays)
    _trust(monkeypatch, "mnist", _checksums(isolated, arrays))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_dataset("mnist", "test", root=isolated / "root", download=False)


def test_missing_files_without_download(isolated: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", "train", root=isolated / "nowhere", download=False)
    message = str(info.value)
    assert "mnist/train-images-idx3-ubyte" in message and "not found" in message
    assert "CAPSNET_DATA" in message and "root=" in message
    assert str(isolated / "nowhere" / "mnist") in message and str(cache_dir() / "mnist") in message


def test_no_network_gives_one_clear_error(isolated: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", "test", progress=False)
    message = str(info.value)
    assert "could not download fashion-mnist/t10k-images-idx3-ubyte.gz" in message
    assert "network is unreachable" in message and "CAPSNET_DATA" in message
    for mirror in DATASETS["fashion-mnist"].mirrors:
        assert f"{mirror}t10k-images-idx3-ubyte.gz" in message
    assert not [p for p in cache_dir().rglob("*") if p.is_file()], "no .part file is left"


class _Response(io.BytesIO):
    """What urlopen returns, enough for the downloader: a context manager with headers and read()."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise http.client.IncompleteRead(b"", 100)
        return super().read(size)


def _serve(monkeypatch: pytest.MonkeyPatch, answers: dict[str, object]) -> list[str]:
    """Replace urlopen: a URL in ``answers`` gets those bytes (or raises that exception), any other
    URL a URLError. Returns the list of URLs requested, in order."""
    requested: list[str] = []

    def urlopen(url: str, timeout: float | None = None) -> _Response:
        requested.append(url)
        answer = answers.get(url, urllib.error.URLError("no route to host (test)"))
        if isinstance(answer, BaseException):
            raise answer
        return answer() if callable(answer) else _Response(answer)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requested


def test_download_into_the_cache(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    file = "t10k-labels-idx1-ubyte"
    raw = _idx_bytes(isolated, np.arange(10, dtype=np.uint8))
    _trust(monkeypatch, "mnist", {file: hashlib.md5(raw).hexdigest()})
    first, second = DATASETS["mnist"].mirrors[:2]
    requested = _serve(monkeypatch, {f"{second}{file}.gz": gzip.compress(raw)})

    path = locate_file("mnist", file, progress=False)
    assert requested == [f"{first}{file}.gz", f"{second}{file}.gz"], "mirrors are tried in order"
    assert cache_dir() == isolated / "xdg-cache" / "capsnet"
    assert path == cache_dir() / "mnist" / f"{file}.gz"
    assert gzip.decompress(path.read_bytes()) == raw
    assert [p.name for p in (cache_dir() / "mnist").iterdir()] == [f"{file}.gz"], "no .part file is left"
    np.testing.assert_array_equal(read_idx(path), np.arange(10))

    assert locate_file("mnist", file, progress=False) == path
    assert len(requested) == 2, "a cached file is not downloaded again"


def test_download_with_wrong_contents_is_not_kept(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    file = "t10k-labels-idx1-ubyte"
    raw = _idx_bytes(isolated, np.arange(10, dtype=np.uint8))  # not the published file
    _serve(monkeypatch, {f"{DATASETS['mnist'].mirrors[0]}{file}.gz": gzip.compress(raw)})
    with pytest.raises(DataError, match="MD5"):
        locate_file("mnist", file, progress=False)
    assert not [p for p in cache_dir().rglob("*") if p.is_file()]


def test_interrupted_download_leaves_nothing(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    file = "t10k-images-idx3-ubyte"
    data = os.urandom(300_000)
    answers = {
        f"{m}{file}.gz": (lambda: _Response(data, fail_after=65_536)) for m in DATASETS["mnist"].mirrors
    }
    _serve(monkeypatch, answers)
    with pytest.raises(DataError, match="could not download mnist/t10k-images-idx3-ubyte.gz"):
        locate_file("mnist", file, progress=False)
    assert not [p for p in cache_dir().rglob("*") if p.is_file()], "the partial file is removed"


def test_lookup_order(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    """root, then $CAPSNET_DATA, then the cache; within a folder the .gz file first."""
    arrays = _fake_dataset(monkeypatch, isolated, isolated / "root")
    for folder in ("env", "xdg-cache/capsnet"):
        _write_dataset(isolated / folder, "mnist", arrays)
    _write_dataset(isolated / "root", "mnist", arrays, gz=False)
    monkeypatch.setenv("CAPSNET_DATA", str(isolated / "env"))
    file = "t10k-labels-idx1-ubyte"

    def where(root: Path | None = None) -> Path:
        return locate_file("mnist", file, root=root, download=False)

    assert where(isolated / "root") == isolated / "root" / "mnist" / f"{file}.gz"
    (isolated / "root" / "mnist" / f"{file}.gz").unlink()
    assert where(isolated / "root") == isolated / "root" / "mnist" / file
    assert where() == isolated / "env" / "mnist" / f"{file}.gz"
    assert where(isolated / "empty") == isolated / "env" / "mnist" / f"{file}.gz"
    monkeypatch.delenv("CAPSNET_DATA")
    assert where() == isolated / "xdg-cache" / "capsnet" / "mnist" / f"{file}.gz"


def test_cache_dir_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "capsnet"


def test_bad_names(isolated: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*mnist, fashion-mnist"):
        load_dataset("cifar", download=False)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'valid'"):
        load_dataset("mnist", "valid", download=False)
    with pytest.raises(ValueError, match="mnist has no file 'train-images'"):
        locate_file("mnist", "train-images", download=False)


# ------------------------------------------------------------------------------------ real files


def _real(name: str, split: str):
    folder = os.environ.get("CAPSNET_DATA")
    if not folder or not (Path(folder) / name).is_dir():
        pytest.skip(f"set CAPSNET_DATA to a folder holding {name}/ to check the real files")
    return load_dataset(name, split, download=False)


@pytest.fixture(scope="module")
def mnist_train():
    return _real("mnist", "train")


@pytest.fixture(scope="module")
def mnist_test():
    return _real("mnist", "test")


def test_real_mnist(mnist_train, mnist_test) -> None:
    counts = {
        "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    }
    for split, data, n, first in (("train", mnist_train, 60_000, 5), ("test", mnist_test, 10_000, 7)):
        assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
        assert torch.bincount(data.labels, minlength=10).tolist() == counts[split]
        assert int(data.labels[0]) == first
        assert int(data.images.max()) == 255 and int(data.images.min()) == 0
        assert data.classes == tuple("0123456789")


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_fashion_mnist(split: str) -> None:
    data = _real("fashion-mnist", split)
    n = 60_000 if split == "train" else 10_000
    assert data.images.shape == (n, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.bincount(data.labels, minlength=10).tolist() == [n // 10] * 10
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


# ---------------------------------------------------------------------------------- random shifts


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``(C, H, W)`` moved down by dy and right by dx, zeros where nothing moved in."""
    _, height, width = image.shape
    out = torch.zeros_like(image)
    out[:, max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = image[
        :, max(-dy, 0) : height + min(-dy, 0), max(-dx, 0) : width + min(-dx, 0)
    ]
    return out


def _offsets(inputs: torch.Tensor, outputs: torch.Tensor, max_shift: int) -> list[tuple[int, int]]:
    """For each pair, the one offset within +-max_shift that turns the input into the output."""
    found = []
    for x, y in zip(inputs, outputs, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-max_shift, max_shift + 1)
            for dx in range(-max_shift, max_shift + 1)
            if torch.equal(_shift(x, dy, dx), y)
        ]
        assert len(matches) == 1, f"output is not a shifted copy of its input (matches: {matches})"
        found.extend(matches)
    return found


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_shift_is_an_exact_translation(dtype: torch.dtype) -> None:
    images = torch.randint(1, 256, (60, 2, 9, 7), generator=torch.Generator().manual_seed(0)).to(dtype)
    out = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == dtype
    offsets = _offsets(images, out, 2)
    assert set(offsets) == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}, "all 25 offsets occur"


def test_random_shift_seeds() -> None:
    images = torch.rand(16, 1, 8, 8)
    a, b, c = (random_shift(images, 3, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_shift_zero_is_identity_and_errors() -> None:
    images = torch.rand(4, 1, 8, 8)
    assert torch.equal(random_shift(images, 0), images)
    with pytest.raises(ValueError, match="max_shift must be >= 0, got -1"):
        random_shift(images, -1)
    with pytest.raises(ValueError, match=r"\(batch, channels, H, W\), got \(8, 8\)"):
        random_shift(images[0, 0], 2)


# -------------------------------------------------------------------------------- device batches


def _numbered(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images whose every pixel holds the example's index mod 256, labels = the index."""
    labels = torch.arange(n)
    return (labels % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 5, 5).contiguous(), labels


def _epoch(batches: DeviceBatches, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches.set_epoch(epoch)
    return list(batches)


def test_device_batches_cover_every_example_once() -> None:
    images, labels = _numbered()
    batches = DeviceBatches(images, labels, batch_size=10, shuffle=True, seed=3)
    assert len(batches) == 11
    epoch = _epoch(batches, 0)
    assert [len(y) for _, y in epoch] == [10] * 10 + [3], "the last batch holds the rest"
    seen = torch.cat([y for _, y in epoch])
    assert sorted(seen.tolist()) == list(range(103))
    assert not torch.equal(seen, labels), "shuffled"
    for x, y in epoch:
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 5, 5)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert torch.equal(x, (y.float() / 255).view(-1, 1, 1, 1).expand_as(x)), "images follow their labels"


def test_device_batches_order_is_reproducible_per_epoch() -> None:
    images, labels = _numbered()

    def order(seed: int, epoch: int) -> list[int]:
        batches = DeviceBatches(images, labels, 16, shuffle=True, seed=seed)
        return torch.cat([y for _, y in _epoch(batches, epoch)]).tolist()

    assert order(1, 4) == order(1, 4), "same seed and epoch, same order (a resumed run sees the same batches)"
    assert order(1, 4) != order(1, 5) and order(1, 4) != order(2, 4)
    batches = DeviceBatches(images, labels, 16, shuffle=True, seed=1)
    assert torch.equal(torch.cat([y for _, y in _epoch(batches, 4)]), torch.tensor(order(1, 4)))


def test_device_batches_without_shuffle_and_with_shifts() -> None:
    images = torch.randint(
        1, 256, (20, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(20)
    plain = DeviceBatches(images, labels, 8)
    assert torch.equal(torch.cat([x for x, _ in plain]), images.float() / 255)
    assert torch.equal(torch.cat([y for _, y in plain]), labels)

    shifted = DeviceBatches(images, labels, 8, max_shift=1, seed=2)
    x1, x2 = (torch.cat([x for x, _ in _epoch(shifted, 0)]) for _ in range(2))
    assert torch.equal(x1, x2), "shifts are reproducible too"
    assert torch.equal(torch.cat([y for _, y in shifted]), labels)
    _offsets(images.float() / 255, x1, 1)
    assert not torch.equal(x1, torch.cat([x for x, _ in _epoch(shifted, 1)]))


def test_device_batches_accept_float_images_and_masks() -> None:
    images, masks = torch.rand(7, 1, 4, 4), torch.eye(10)[torch.arange(7)]
    x, y = next(iter(DeviceBatches(images, masks, 7)))
    assert torch.equal(x, images) and torch.equal(y, masks)


def test_device_batches_errors() -> None:
    images, labels = _numbered(10)
    with pytest.raises(ValueError, match=r"\(n, channels, H, W\), got \(10, 5, 5\)"):
        DeviceBatches(images[:, 0], labels, 4)
    with pytest.raises(ValueError, match="got 10 images but 9 labels"):
        DeviceBatches(images, labels[:9], 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        DeviceBatches(images, labels, 0)
    with pytest.raises(ValueError, match="max_shift must be >= 0, got -2"):
        DeviceBatches(images, labels, 4, max_shift=-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_batches_on_cuda() -> None:
    images, labels = _numbered()
    batches = DeviceBatches(images, labels, 32, "cuda", shuffle=True, max_shift=2, seed=0)
    epoch = _epoch(batches, 0)
    assert all(x.is_cuda and y.is_cuda for x, y in epoch)
    assert sorted(torch.cat([y for _, y in epoch]).tolist()) == list(range(103))
