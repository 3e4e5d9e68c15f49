"""Tests of capsnet.squashing: the squash non-linearity (Eq. 1) and capsule lengths."""

from __future__ import annotations

import pytest
import torch

from capsnet import capsule_length, squash

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Relative tolerance of each dtype's rounding (a few units in the last place).
RTOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def naive_squash(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Eq. 1 written literally, in float64: |s|^2 / (1 + |s|^2) * s / |s|."""
    s = s.double()
    norm_sq = s.square().sum(dim=dim, keepdim=True)
    return norm_sq / (1 + norm_sq) * s / norm_sq.sqrt()


def scales(dtype: torch.dtype) -> list[float]:
    """Input magnitudes from tiny to huge that ``dtype`` can represent (subnormals included)."""
    info = torch.finfo(dtype)
    return [0.0, info.smallest_normal / 4, info.smallest_normal, 1e-3, 0.5, 1.0, 3.0, 1e3, info.max / 16]


def test_matches_eq1_for_moderate_inputs() -> None:
    torch.manual_seed(0)
    s = torch.randn(64, 8, dtype=torch.float64) * torch.logspace(-2, 2, 64, dtype=torch.float64)[:, None]
    torch.testing.assert_close(squash(s), naive_squash(s), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(squash(s.float()), naive_squash(s).float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_keeps_direction_and_shrinks_below_one(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    s = (
        torch.randn(50, 8, dtype=torch.float64) * torch.logspace(-1, 1, 50, dtype=torch.float64)[:, None]
    ).to(dtype)
    v = squash(s)
    assert v.dtype == dtype and v.shape == s.shape
    s64, v64 = s.double(), v.double()
    cosine = (s64 * v64).sum(-1) / (s64.norm(dim=-1) * v64.norm(dim=-1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=RTOL[dtype])
    # Lengths up to |s| = 10 are below 1 after rounding to every dtype (|v| <= 100/101).
    assert (v64.norm(dim=-1) < 1).all()
    torch.testing.assert_close(v64, naive_squash(s64), rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)


def test_length_is_monotone_in_input_length() -> None:
    direction = torch.nn.functional.normalize(
        torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=0
    )
    radii = torch.logspace(-4, 3, 400, dtype=torch.float64)
    lengths = capsule_length(squash(radii[:, None] * direction))
    assert (lengths.diff() > 0).all()
    # Short vectors shrink to about |s|^2, long ones approach unit length from below.
    assert float(lengths[0]) == pytest.approx(float(radii[0]) ** 2, rel=1e-6)
    assert 1 - 1e-5 < lengths[-1] < 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_values_and_gradients_from_zero_to_huge(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    for scale in scales(dtype):
        s = (scale * direction).to(dtype).requires_grad_(True)
        v = squash(s)
        assert torch.isfinite(v).all(), (dtype, scale)
        # Rounding the squashed length towards 1 is allowed, overshooting it is not.
        assert capsule_length(v.detach().double()) <= 1 + RTOL[dtype], (dtype, scale)
        (grad,) = torch.autograd.grad(v.float().sum(), s)
        assert torch.isfinite(grad).all(), (dtype, scale)
        if scale >= 1e-3:
            cosine = torch.nn.functional.cosine_similarity(v.detach().double(), direction, dim=0)
            assert float(cosine) == pytest.approx(1, abs=RTOL[dtype]), (dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_vector_maps_to_zero_with_zero_gradient(dtype: torch.dtype) -> None:
    s = torch.zeros(3, 8, dtype=dtype, requires_grad=True)
    v = squash(s)
    assert (v == 0).all()
    (grad,) = torch.autograd.grad(v.sum(), s)
    # |v| ~ |s|^2 near 0, so the true derivative at 0 is 0.
    assert (grad == 0).all()


def test_gradient_matches_eq1_in_float64() -> None:
    torch.manual_seed(4)
    s = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 4, dtype=torch.float64)
    (ours,) = torch.autograd.grad((squash(s) * weights).sum(), s)
    (naive,) = torch.autograd.grad((naive_squash(s) * weights).sum(), s)
    torch.testing.assert_close(ours, naive, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2])
def test_squashes_along_any_dim(dim: int) -> None:
    torch.manual_seed(5)
    s = torch.randn(3, 4, 5, dtype=torch.float64)
    expected = naive_squash(s.movedim(dim, -1)).movedim(-1, dim)
    torch.testing.assert_close(squash(s, dim=dim), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(capsule_length(s, dim=dim), torch.linalg.vector_norm(s, dim=dim))


def test_squash_rejects_integer_input() -> None:
    with pytest.raises(TypeError, match=r"floating point.*torch\.int64"):
        squash(torch.ones(2, 8, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_capsule_length_matches_vector_norm(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    s = torch.randn(7, 16, dtype=dtype) * torch.logspace(-3, 3, 7, dtype=dtype)[:, None]
    torch.testing.assert_close(capsule_length(s), torch.linalg.vector_norm(s, dim=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_capsule_length_is_finite_with_finite_gradient(dtype: torch.dtype) -> None:
    torch.manual_seed(7)
    direction = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64), dim=0)
    for scale in scales(dtype):
        s = (scale * direction).to(dtype).requires_grad_(True)
        length = capsule_length(s)
        assert torch.isfinite(length), (dtype, scale)
        (grad,) = torch.autograd.grad(length.float(), s)
        assert torch.isfinite(grad).all(), (dtype, scale)
        if scale == 0:
            assert length == 0 and (grad == 0).all()  # s.norm() would give a NaN gradient here
        elif scale >= 1e-3:
            assert float(length.detach()) == pytest.approx(scale, rel=RTOL[dtype])
            # d|s|/ds = s/|s|: the unit direction.
            torch.testing.assert_close(grad.double(), direction, rtol=0, atol=RTOL[dtype] * 2)
