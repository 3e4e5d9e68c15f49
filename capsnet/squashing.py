"""The squashing non-linearity and capsule lengths (Sabour et al. 2017, Eq. 1).

A capsule's output is a vector whose *length* is the probability that the entity it stands for
is present and whose *orientation* encodes the entity's pose. ``squash`` maps any vector to one
with the same direction and a length in ``[0, 1)``::

    v = |s|^2 / (1 + |s|^2) * s / |s|                                     (Eq. 1)

Written naively this divides by zero at ``s = 0`` and overflows ``|s|^2`` for large inputs.
Here every vector is first divided by its largest absolute component, so the sum of squares
lies in ``[1, d]`` whatever the scale of ``s``; the length is then rebuilt from that safe sum.
Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

__all__ = ["squash", "capsule_length"]

# Beyond this length |s|^2 / (1 + |s|^2) differs from 1 by less than 1e-12 (float32 rounds it to 1).
_LENGTH_CAP = 1.0e6


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    if not t.is_floating_point():
        raise TypeError(f"capsule tensors must be floating point, got dtype {t.dtype}")
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _scaled(s: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``s`` into ``unit * scale`` with ``sumsq = |unit|^2`` in ``[1, d]`` (or 0 for s=0)."""
    scale = s.abs().amax(dim=dim, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    unit = s / scale
    sumsq = unit.square().sum(dim=dim, keepdim=True)
    return unit, scale, sumsq


def capsule_length(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean length ``|s|`` along ``dim``, finite with a finite gradient everywhere.

    Shapes: ``(..., d, ...) -> (..., ...)`` (``dim`` removed). The gradient at the zero vector
    is 0 instead of the NaN that ``s.square().sum().sqrt()`` gives, and ``|s|^2`` never overflows.
    """
    work = s.to(_working_dtype(s))
    _, scale, sumsq = _scaled(work, dim)
    length = scale * sumsq.clamp_min(1.0).sqrt() * (sumsq > 0)
    return length.squeeze(dim).to(s.dtype)


def squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Squash capsule vectors along ``dim`` (Sabour et al. 2017, Eq. 1).

    ``v = |s|^2 / (1 + |s|^2) * s / |s|``: same direction as ``s``, length in ``[0, 1)``,
    monotone in ``|s|``; short vectors shrink to almost zero (``|v| ~ |s|^2``), long ones to
    just below unit length.

    Args:
        s: total input of the capsules, any shape; ``dim`` holds the capsule dimension.
        dim: the axis along which each vector lies.

    Returns:
        A tensor of the same shape and dtype as ``s``. Values and gradients are finite at
        ``s = 0``, for tiny and for huge inputs, in float16, bfloat16, float32 and float64.
    """
    work = s.to(_working_dtype(s))
    unit, scale, sumsq = _scaled(work, dim)
    safe_sumsq = sumsq.clamp_min(1.0)  # only the zero vector has sumsq < 1
    length = (scale * safe_sumsq.sqrt()).clamp_max(_LENGTH_CAP)
    squashed_length = length.square() / (1.0 + length.square())
    v = unit / safe_sumsq.sqrt() * squashed_length
    return v.to(s.dtype)
