"""Which device to train on, which precision it supports, and a one-line description of it for
run records and benchmark tables."""

from __future__ import annotations

import os
import platform
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["PRECISIONS", "autocast", "default_device", "describe", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into the mixed precision this device runs fast, and check the others.

    ``auto``: bf16 on CUDA cards that support it, else fp16; bf16 on CPUs with native bf16
    instructions (AVX512-BF16 or AMX), else fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for CUDA; on the CPU use bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device | None = None) -> str:
    """E.g. ``"CPU: AMD EPYC, 2 threads of 2 cores; torch 2.13.0"`` or ``"CUDA: NVIDIA T4; torch 2.5.1"``."""
    device = device or default_device()
    if device.type == "cuda":
        what = f"CUDA: {torch.cuda.get_device_name(device)}"
    else:
        what = f"CPU: {_cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return f"{what}; torch {torch.__version__}"
