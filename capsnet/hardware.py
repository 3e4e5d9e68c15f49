"""Which device to train on, which precision it supports, and a one-line description of it for
run records and benchmark tables."""

from __future__ import annotations

import os
import platform
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["PRECISIONS", "autocast", "cpu_isa", "cpu_name", "default_device", "describe", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_bf16() -> bool:
    """True where oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into the precision this device runs fast, and check the others.

    ``auto`` picks bf16 only where the hardware computes it natively: CUDA cards of compute
    capability 8.0 or newer (A100, RTX 30xx, H100, ...) and CPUs with AVX512-BF16 or AMX. Older
    CUDA cards (T4 7.5, V100 7.0, P100 6.0) get fp16, trained with gradient scaling
    (``torch.amp.GradScaler``); other CPUs get fp32. (``torch.cuda.is_bf16_supported()`` is not
    asked: it also says yes where bf16 is only emulated, as on a T4, where it is slow.)

    Raises:
        ValueError: an unknown precision, or fp16 on the CPU (autocast has no fast fp16 path
            there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if _cuda_capability(device) >= (8, 0) else "fp16"
        return "bf16" if device.type == "cpu" and _cpu_has_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 autocast is for CUDA; on the CPU use bf16 or fp32 (or auto)")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_name() -> str:
    """The CPU's model name, e.g. ``"AMD EPYC"`` (from ``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector instructions PyTorch's CPU kernels use (``ATEN_CPU_CAPABILITY`` can lower them),
    and oneDNN's limit if ``ONEDNN_MAX_CPU_ISA`` sets one: e.g. ``"AVX512"`` or
    ``"AVX2 (oneDNN at most AVX2)"``."""
    isa = torch.backends.cpu.get_cpu_capability()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{isa} (oneDNN at most {limit})" if limit else isa


def describe(device: torch.device | None = None) -> str:
    """E.g. ``"CPU: AMD EPYC, 2 threads of 2 cores, AVX512; torch 2.13.0"`` or
    ``"CUDA: NVIDIA T4; torch 2.5.1"``."""
    device = device or default_device()
    if device.type == "cuda":
        what = f"CUDA: {torch.cuda.get_device_name(device)}"
    else:
        threads, cores = torch.get_num_threads(), os.cpu_count()
        what = (
            f"CPU: {cpu_name()}, {threads} thread{'s' * (threads != 1)} of {cores} "
            f"core{'s' * (cores != 1)}, {cpu_isa()}"
        )
    return f"{what}; torch {torch.__version__}"
