"""Data: MNIST and Fashion-MNIST from IDX files, device-resident batches with the paper's
random shifts. This package stands apart: it knows nothing of models."""

from .batches import DeviceBatches, random_shift
from .datasets import DATASETS, DataError, Split, cache_dir, load_dataset, locate_file
from .idx import IDXError, read_idx, write_idx

__all__ = [
    "DATASETS",
    "DataError",
    "DeviceBatches",
    "IDXError",
    "Split",
    "cache_dir",
    "load_dataset",
    "locate_file",
    "random_shift",
    "read_idx",
    "write_idx",
]
