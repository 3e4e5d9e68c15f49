"""A convolution whose gradients can run as ordinary forward convolutions.

Over 90% of a CapsNet training step is the PrimaryCaps convolution (256 -> 256 channels, 9x9,
stride 2). On the CPU, oneDNN runs its forward pass near the machine's matmul rate but its two
gradients at about half of it, and on some CPUs the weight gradient of the first convolution
(1 -> 256 channels) at a tenth. Both gradients of a stride-``s`` convolution (no padding, no
dilation, no groups) can be written as stride-1 forward convolutions, which oneDNN runs fast:

- **Weight gradient.** ``dW[o, i, p, q] = sum_{n, y, x} g[n, o, y, x] * x[n, i, s*y + p, s*x + q]``
  is a convolution of the input, with its batch and channel axes swapped, by the output gradient
  (also swapped) dilated by ``s``: :func:`weight_grad_as_conv`.
- **Input gradient.** Split the input positions by their phase ``(a, b)`` modulo ``s``: the
  positions of one phase receive gradient only through the kernel taps ``W[:, :, a::s, b::s]``,
  by a stride-1 transposed convolution: :func:`input_grad_by_phases`.

The sums are the same; only their order differs (equal to rounding: tested in float64). Which way
is faster depends on the machine, the precision and the shapes, so :func:`conv2d` times
both ways of each gradient it needs once per shape, on the CPU, and keeps the faster
(:func:`chosen_backward` lists the choices and their timings; ``python -m capsnet bench`` prints
them). Elsewhere (CUDA, or inside ``torch.compile``) it is a plain ``F.conv2d``.
:class:`Conv2d` is the layer (CapsNet's two convolutions).

The choices persist between processes on one machine, in ``~/.cache/capsnet/conv-backward.json``
(``CAPSNET_CONV_CACHE`` names another file, or ``""`` for none), under the CPU, the vector
instructions PyTorch's libraries use and PyTorch's version: timing is noisy, and two processes that
timed for themselves could choose differently and then differ in rounding. Delete the file to time
again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn
from torch.autograd.function import once_differentiable

from .hardware import cpu_name

__all__ = [
    "BACKWARD_MODES",
    "Conv2d",
    "Conv2dFunction",
    "chosen_backward",
    "conv_backward",
    "conv2d",
    "input_grad_by_phases",
    "remember_backward",
    "weight_grad_as_conv",
]

# auto: time both ways of each gradient once per shape (CPU only); native: PyTorch's own
# convolution backward; convolutions: both gradients as forward convolutions (this module's).
BACKWARD_MODES = ("auto", "native", "convolutions")
_mode = os.environ.get("CAPSNET_CONV_BACKWARD", "auto")
_chosen: dict[tuple[Any, ...], dict[str, Any]] = {}
_TIMING_REPEATS = 2


def weight_grad_as_conv(
    x: torch.Tensor, grad_out: torch.Tensor, kernel_size: tuple[int, int], stride: int
) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, W, stride=stride)`` with respect to ``W``, as one convolution.

    Shapes: ``x (N, C_in, H, W)``, ``grad_out (N, C_out, H', W')`` -> ``(C_out, C_in, kH, kW)``.
    The batch axis becomes the channel axis that the convolution sums over.
    """
    kh, kw = kernel_size
    rows, cols = grad_out.shape[-2:]
    used = x[..., : kh + stride * (rows - 1), : kw + stride * (cols - 1)]  # positions some tap reads
    grad = F.conv2d(used.transpose(0, 1), grad_out.transpose(0, 1), dilation=stride)
    return grad.transpose(0, 1).contiguous()


def input_grad_by_phases(
    grad_out: torch.Tensor, weight: torch.Tensor, stride: int, input_shape: torch.Size
) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, weight, stride=stride)`` with respect to ``x``, as ``stride**2``
    stride-1 transposed convolutions, one per phase of the input positions.

    Shapes: ``grad_out (N, C_out, H', W')``, ``weight (C_out, C_in, kH, kW)`` -> ``input_shape``
    ``(N, C_in, H, W)``. Rows and columns that no kernel tap reads get zero.
    """
    grad = grad_out.new_zeros(input_shape)
    for a in range(stride):
        for b in range(stride):
            taps = weight[:, :, a::stride, b::stride]
            if taps.numel() == 0:  # a kernel smaller than the stride skips this phase
                continue
            part = F.conv_transpose2d(grad_out, taps)
            grad[:, :, a::stride, b::stride][..., : part.shape[-2], : part.shape[-1]] = part
    return grad


def _native_grads(
    x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor, stride: int, mask: list[bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [stride, stride], [0, 0], [1, 1], False, [0, 0], 1, [*mask, False]
    )
    return grad_x, grad_w


class Conv2dFunction(torch.autograd.Function):
    """``F.conv2d`` forward; each gradient computed the way ``paths`` names: ``(input path,
    weight path)``, the input path ``"native"`` or ``"phases"``, the weight path ``"native"`` or
    ``"convolution"``. Called as ``Conv2dFunction.apply(x, weight, bias, stride, paths)``."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: int,
        paths: tuple[str, str],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.paths, ctx.has_bias = stride, paths, bias is not None
        return F.conv2d(x, weight, bias, stride)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        stride, (input_path, weight_path) = ctx.stride, ctx.paths
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        native = [want_x and input_path == "native", want_w and weight_path == "native"]
        grad_x, grad_w = _native_grads(x, weight, grad_out, stride, native) if any(native) else (None, None)
        if want_x and input_path == "phases":
            grad_x = input_grad_by_phases(grad_out, weight, stride, x.shape)
        if want_w and weight_path == "convolution":
            grad_w = weight_grad_as_conv(x, grad_out, weight.shape[-2:], stride)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias and want_b else None
        return grad_x, grad_w, grad_b, None, None


def _seconds(run: Callable[[], object]) -> float:
    """The best of ``_TIMING_REPEATS`` timed calls of ``run``, after one untimed call."""
    run()
    best = float("inf")
    for _ in range(_TIMING_REPEATS):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def _choose(x: torch.Tensor, weight: torch.Tensor, stride: int, input_grad: bool) -> dict[str, Any]:
    """Time PyTorch's and this module's way of each gradient needed on these shapes; keep the
    faster (the input gradient only where ``input_grad``)."""
    ways: dict[str, dict[str, Callable[[torch.Tensor], object]]] = {
        "weight": {
            "native": lambda g: _native_grads(x, weight, g, stride, [False, True]),
            "convolution": lambda g: weight_grad_as_conv(x, g, weight.shape[-2:], stride),
        }
    }
    if input_grad:
        ways["input"] = {
            "native": lambda g: _native_grads(x, weight, g, stride, [True, False]),
            "phases": lambda g: input_grad_by_phases(g, weight, stride, x.shape),
        }
    with torch.no_grad():
        # any values time the same; not random, so that the random stream of training is untouched
        grad_out = torch.ones_like(F.conv2d(x, weight, None, stride))
        seconds = {
            grad: {way: _seconds(lambda run=run: run(grad_out)) for way, run in candidates.items()}
            for grad, candidates in ways.items()
        }
    return {
        "input_gradient": min(seconds["input"], key=seconds["input"].get) if input_grad else "native",
        "weight_gradient": min(seconds["weight"], key=seconds["weight"].get),
        "seconds": seconds,
    }


def _cache_file() -> Path | None:
    """The file where ``auto``'s choices persist, or None (``CAPSNET_CONV_CACHE=""``)."""
    configured = os.environ.get("CAPSNET_CONV_CACHE")
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "capsnet" / "conv-backward.json"


def _machine() -> str:
    """What a timing depends on besides the shapes: the CPU, the vector instructions of ATen and
    oneDNN (``ONEDNN_MAX_CPU_ISA`` can restrict oneDNN's) and PyTorch's version."""
    aten, onednn = torch.backends.cpu.get_cpu_capability(), os.environ.get("ONEDNN_MAX_CPU_ISA", "any")
    return f"{cpu_name()}; ATen {aten}; oneDNN max {onednn}; torch {torch.__version__}"


def _stored(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The cache file's choices by machine; empty if it is missing or unreadable (then rewritten)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("input_gradient") in ("native", "phases")
        and entry.get("weight_gradient") in ("native", "convolution")
    )


def _stored_or_timed(key: tuple[Any, ...], time_it: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The choice for ``key`` from the cache file, or ``time_it()``, then stored there. One process
    at a time reads, times and writes (a file lock), so processes started together agree. Without
    a usable file, every process times for itself."""
    path = _cache_file()
    if path is None:
        return time_it()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError:
        return time_it()
    try:
        stored, machine, name = _stored(path), _machine(), repr(key)
        if not isinstance(stored.get(machine), dict):
            stored[machine] = {}
        entry = stored[machine].get(name)
        if _valid(entry):
            return entry
        entry = stored[machine][name] = time_it()
        try:
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
                json.dump(stored, f, indent=1)
            os.replace(f.name, path)
        except OSError:
            pass  # the choice holds in this process only
        return entry
    finally:
        lock.release()


def _key(
    dtype: torch.dtype,
    input_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: int,
    input_grad: bool,
    threads: int,
) -> tuple[Any, ...]:
    """What a choice depends on: all but the batch size (timed at the first batch seen)."""
    return (dtype, tuple(input_shape[1:]), tuple(weight_shape), stride, input_grad, threads)


def _paths(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[str, str]:
    """The (input gradient, weight gradient) paths for this call under the current mode."""
    if _mode not in BACKWARD_MODES:
        raise ValueError(f"CAPSNET_CONV_BACKWARD must be one of {', '.join(BACKWARD_MODES)}, got {_mode!r}")
    if _mode == "native" or torch.compiler.is_compiling():
        return "native", "native"
    if _mode == "convolutions":
        return "phases", "convolution"
    if x.device.type != "cpu" or not torch.is_grad_enabled() or not weight.requires_grad:
        return "native", "native"
    input_grad, threads = x.requires_grad, torch.get_num_threads()
    key = _key(x.dtype, x.shape, weight.shape, stride, input_grad, threads)
    if key not in _chosen:
        _chosen[key] = _stored_or_timed(
            key,
            lambda: {
                "dtype": str(x.dtype).removeprefix("torch."),
                "input_shape": list(x.shape),
                "weight_shape": list(weight.shape),
                "stride": stride,
                "threads": threads,
                **_choose(x.detach(), weight.detach(), stride, input_grad),
                "timed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    return _chosen[key]["input_gradient"], _chosen[key]["weight_gradient"]


def conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride)`` (no padding, dilation or groups), with each gradient
    computed the faster way on this machine (module docstring; :func:`conv_backward` to force one).

    Shapes: ``x (N, C_in, H, W)``, ``weight (C_out, C_in, kH, kW)`` -> ``(N, C_out, H', W')``.
    Under autocast it computes in the autocast dtype, as ``F.conv2d`` does.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    paths = _paths(x, weight, stride)
    if paths == ("native", "native"):
        return F.conv2d(x, weight, bias, stride)
    with torch.autocast(device, enabled=False):
        return Conv2dFunction.apply(x, weight, bias, stride, paths)


class Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` without padding, dilation or groups whose forward is :func:`conv2d`
    (same parameters and state dict: a drop-in for ``nn.Conv2d(in_channels, out_channels,
    kernel_size, stride)``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride[0])


@contextmanager
def conv_backward(mode: str) -> Iterator[None]:
    """Use ``mode`` (one of :data:`BACKWARD_MODES`) for :func:`conv2d`'s gradients inside
    the block; the environment variable ``CAPSNET_CONV_BACKWARD`` sets it for a whole process."""
    global _mode
    if mode not in BACKWARD_MODES:
        raise ValueError(f"conv backward mode must be one of {', '.join(BACKWARD_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def chosen_backward() -> list[dict[str, Any]]:
    """What ``auto`` chose so far in this process, one entry per shape and dtype, with the best
    time in seconds of each way of each gradient and when it was timed (in this process or an
    earlier one: the module docstring)."""
    return list(_chosen.values())


def remember_backward(choices: Sequence[dict[str, Any]]) -> None:
    """Make ``auto`` use ``choices`` (entries of :func:`chosen_backward`, e.g. from a run record)
    for their shapes instead of timing them again, so that a resumed run computes its gradients
    the way it did before. Shapes already chosen in this process keep their choice."""
    for entry in choices:
        key = _key(
            getattr(torch, entry["dtype"]),
            entry["input_shape"],
            entry["weight_shape"],
            entry["stride"],
            "input" in entry["seconds"],
            entry["threads"],
        )
        _chosen.setdefault(key, dict(entry))
