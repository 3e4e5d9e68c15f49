"""Data: MNIST and Fashion-MNIST from IDX files, device-resident batches with the paper's
random shifts, and the data sets built from MNIST digits (translated, affNIST-style, MultiMNIST).
This package stands apart: it knows nothing of models."""

from .batches import DeviceBatches, random_shift
from .datasets import (
    DATASETS,
    DataError,
    DownloadError,
    Split,
    cache_dir,
    download_file,
    load_dataset,
    locate_file,
)
from .idx import IDXError, read_idx, write_idx
from .synthetic import AffineTransforms, MultiMNIST, affnist_style, multi_mnist, translated_mnist

__all__ = [
    "AffineTransforms",
    "DATASETS",
    "DataError",
    "DeviceBatches",
    "DownloadError",
    "IDXError",
    "MultiMNIST",
    "Split",
    "affnist_style",
    "cache_dir",
    "download_file",
    "load_dataset",
    "locate_file",
    "multi_mnist",
    "random_shift",
    "read_idx",
    "translated_mnist",
    "write_idx",
]
