"""An experiment that did not pay: the PrimaryCaps convolution in the Fourier domain.

On a periodic grid of ``Ph x Pw`` (the rows and columns some kernel tap reads: 19 x 19 for the
PrimaryCaps layer), a valid stride-``s`` cross-correlation is a product per frequency: with the
input's spectrum ``X`` and the kernel's conjugate spectrum ``K``, ``Y[f] = X[f] @ K[f]^T`` for each of
the ``Ph * (Pw // 2 + 1)`` frequencies ``f`` (190 for PrimaryCaps), and ``y`` is the real part of the
inverse transform read at the stride's positions. All transforms here are real matrix products with
the DFT matrices, and the complex products are done in planar real arithmetic. That makes 3.8 times
fewer multiplications than the direct convolution for PrimaryCaps, but the kernel's spectrum (256 x
256 x 190 complex numbers) must be made from the weights, and its gradient turned back, on every
step. This script checks the method against ``F.conv2d`` in float64 (forward and both gradients) and
times forward + backward against PyTorch's convolution and :func:`capsnet.conv.conv2d`; it is a
benchmark, not part of the package. The README's speed section reports what it measured.

Usage (from the repository root)::

    python tools/fourier_conv.py                 # batch 32 and 128
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python tools/fourier_conv.py 32
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from capsnet.conv import conv2d
from capsnet.models import CapsNet
from capsnet.train import adam, batch_loss


def _complex_rows(m: torch.Tensor) -> torch.Tensor:
    """Complex ``(R, K)`` -> real ``(2R, K)``, rows (r, re/im): multiplies a real vector."""
    return torch.stack([m.real, m.imag], 1).reshape(2 * m.shape[0], m.shape[1])


def _complex_block(m: torch.Tensor) -> torch.Tensor:
    """Complex ``(R, K)`` -> real ``(2R, 2K)``, rows (r, re/im), columns (re/im, k): multiplies a
    complex vector stored as its real parts, then its imaginary parts."""
    re, im = m.real, m.imag
    return torch.stack([torch.cat([re, -im], 1), torch.cat([im, re], 1)], 1).reshape(2 * m.shape[0], -1)


class Plan:
    """The real matrices of the 1-D DFTs for one input size, kernel and stride.

    Frequencies are ordered (column frequency v, row frequency u): ``F = (Pw // 2 + 1) * Ph`` of
    them. Each 2-D transform is two small matrix products, one per axis (columns first); the
    backward pass uses the transposes of the transforms with conjugated matrices, because it carries
    derivatives with respect to complex values that enter the output through a real part.
    """

    def __init__(
        self, in_hw: tuple[int, int], kernel: tuple[int, int], stride: int, dtype: torch.dtype
    ) -> None:
        (height, width), (kh, kw) = in_hw, kernel
        self.out = ((height - kh) // stride + 1, (width - kw) // stride + 1)
        ph, pw = stride * (self.out[0] - 1) + kh, stride * (self.out[1] - 1) + kw
        self.grid, self.kernel = (ph, pw), (kh, kw)
        rows, cols = ph, pw // 2 + 1  # frequencies: all rows, half the columns (the input is real)
        self.spectrum = (cols, rows)
        self.frequencies = rows * cols
        f64 = torch.float64

        def dft(freq: torch.Tensor, pos: torch.Tensor, n: int, sign: int) -> torch.Tensor:
            return torch.exp(sign * 2j * math.pi * torch.outer(freq, pos) / n)

        u, v = torch.arange(rows, dtype=f64), torch.arange(cols, dtype=f64)
        d_rows = dft(u, torch.arange(ph, dtype=f64), ph, -1)  # (rows, ph)
        d_cols = dft(v, torch.arange(pw, dtype=f64), pw, -1)  # (cols, pw)
        hermitian = torch.full((cols,), 2.0, dtype=f64)  # the columns the half spectrum leaves out
        hermitian[0] = 1
        if pw % 2 == 0:
            hermitian[-1] = 1
        i_rows = dft(stride * torch.arange(self.out[0], dtype=f64), u, ph, 1) / ph  # (Ho, rows)
        i_cols = dft(stride * torch.arange(self.out[1], dtype=f64), v, pw, 1) * hermitian / pw

        def real(m: torch.Tensor) -> torch.Tensor:
            return m.to(dtype).contiguous()

        # input: columns (real -> complex), then rows (complex -> complex)
        self.x_cols, self.x_rows = real(_complex_rows(d_cols)), real(_complex_block(d_rows))
        self.x_cols_back = real(_complex_rows(d_cols.conj()).t())
        self.x_rows_back = real(_complex_block(d_rows.conj()).t())
        # kernel: its conjugate spectrum, the same way
        k_cols, k_rows = d_cols[:, :kw].conj(), d_rows[:, :kh].conj()
        self.w_cols, self.w_rows = real(_complex_rows(k_cols)), real(_complex_block(k_rows))
        self.w_cols_back = real(_complex_rows(k_cols.conj()).t())
        self.w_rows_back = real(_complex_block(k_rows.conj()).t())
        # output at the stride's positions: y = Re(sum_f Ty[ab, f] Y[f]), Y planar (re/im, f)
        ty = torch.einsum("au,bv->abvu", i_rows, i_cols).reshape(self.out[0] * self.out[1], -1)
        self.y = real(torch.cat([ty.real, -ty.imag], 1))
        self.y_back = real(torch.cat([ty.real, ty.imag], 1).t())


def _spectrum(t: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Real ``t (B, Q, P, M)`` (column q first, then row p, then the rest) -> planar spectrum
    ``(B, V, U, 2, M)``: ``cols`` (2V, Q) from real to complex, ``rows`` (2U, 2P) complex."""
    batch, q, p, m = t.shape
    half = torch.matmul(cols, t.reshape(batch, q, p * m))  # (B, 2V, P*M): (v, re/im, p, m)
    v = cols.shape[0] // 2
    full = torch.matmul(rows, half.view(batch * v, 2 * p, m))  # (B*V, 2U, M): (u, re/im, m)
    return full.view(batch, v, rows.shape[0] // 2, 2, m)


def _from_spectrum(s: torch.Tensor, rows_back: torch.Tensor, cols_back: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_spectrum` with ``rows_back (2P, 2U)``, ``cols_back (Q, 2V)``:
    planar ``(B, V, U, 2, M)`` -> real ``(B, Q, P, M)``."""
    batch, v, u, _, m = s.shape
    half = torch.matmul(rows_back, s.reshape(batch * v, 2 * u, m))  # (B*V, 2P, M): (re/im, p, m)
    p = rows_back.shape[0] // 2
    out = torch.matmul(cols_back, half.view(batch, 2 * v, p * m))  # (B, Q, P*M)
    return out.view(batch, cols_back.shape[0], p, m)


class FourierConv2d(torch.autograd.Function):
    """``F.conv2d(x, w, stride=plan's)`` (no bias, padding or groups) through the Fourier domain.
    Called as ``FourierConv2d.apply(x, w, plan)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, plan: Plan) -> torch.Tensor:
        (ph, pw), freq = plan.grid, plan.frequencies
        batch, channels = x.shape[:2]
        out_channels = w.shape[0]
        # input (columns, rows, N*C) -> (1, V, U, re/im, N*C)
        x_t = x[..., :ph, :pw].permute(3, 2, 0, 1).reshape(1, pw, ph, batch * channels)
        x_spec = _spectrum(x_t, plan.x_cols, plan.x_rows).view(freq, 2, batch, channels)
        x_re, x_im = x_spec[:, 0], x_spec[:, 1]
        # kernel (O, q, p, C) -> (O, V, U, re/im, C): per frequency the rows of a (2C, O) matrix
        w_spec = _spectrum(w.permute(0, 3, 2, 1).contiguous(), plan.w_cols, plan.w_rows)
        w_mat = w_spec.view(out_channels, freq, 2 * channels).permute(1, 2, 0)  # (F, 2C, O)
        block = torch.cat([torch.cat([x_re, -x_im], 2), torch.cat([x_im, x_re], 2)], 1)  # (F, 2N, 2C)
        y_spec = torch.bmm(block, w_mat)  # (F, 2N, O): real rows, then imaginary
        planar = y_spec.view(freq, 2, batch * out_channels).transpose(0, 1).reshape(2 * freq, -1)
        y = plan.y @ planar  # (Ho*Wo, N*O)
        ctx.save_for_backward(x_re, x_im, w_spec)
        ctx.plan, ctx.shape = plan, x.shape
        return y.view(*plan.out, batch, out_channels).permute(2, 3, 0, 1).contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x_re, x_im, w_spec = ctx.saved_tensors
        plan, freq = ctx.plan, ctx.plan.frequencies
        batch, channels = ctx.shape[:2]
        out_channels = w_spec.shape[0]
        g = grad_y.permute(2, 3, 0, 1).reshape(-1, batch * out_channels)
        g_spec = (plan.y_back @ g).view(2, freq, batch, out_channels).transpose(0, 1)
        g_spec = g_spec.reshape(freq, 2 * batch, out_channels)  # per frequency: real rows, imaginary
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            block = torch.cat([torch.cat([x_re, x_im], 2), torch.cat([-x_im, x_re], 2)], 1)
            grad_spec = torch.empty_like(w_spec)
            out = grad_spec.view(out_channels, freq, 2 * channels).transpose(0, 1)
            torch.bmm(g_spec.transpose(1, 2), block, out=out)
            grad_w = _from_spectrum(grad_spec, plan.w_rows_back, plan.w_cols_back)  # (O, q, p, C)
            grad_w = grad_w.permute(0, 3, 2, 1).contiguous()
        if ctx.needs_input_grad[0]:
            w_rows = w_spec.view(out_channels, freq, 2 * channels).transpose(0, 1)  # (F, O, 2C)
            p = torch.bmm(g_spec, w_rows)  # (F, 2N, 2C)
            n, c = batch, channels
            grad_x_spec = torch.stack([p[:, :n, :c] - p[:, n:, c:], p[:, :n, c:] + p[:, n:, :c]], 1)
            v, u = plan.spectrum
            part = _from_spectrum(grad_x_spec.view(1, v, u, 2, n * c), plan.x_rows_back, plan.x_cols_back)
            grad_x = part.new_zeros(ctx.shape)
            ph, pw = plan.grid
            grad_x[..., :ph, :pw] = part.view(pw, ph, n, c).permute(2, 3, 1, 0)
        return grad_x, grad_w, None


def fourier_conv2d(x: torch.Tensor, w: torch.Tensor, stride: int, plan: Plan | None = None) -> torch.Tensor:
    """``F.conv2d(x, w, stride=stride)`` computed through the Fourier domain."""
    plan = plan or Plan(tuple(x.shape[-2:]), tuple(w.shape[-2:]), stride, x.dtype)
    return FourierConv2d.apply(x, w, plan)


def largest_error(
    batch: int, channels: int, out_channels: int, size: tuple[int, int], kernel: tuple[int, int], stride: int
) -> float:
    """The largest difference from ``F.conv2d`` in float64, over the output and both gradients."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, *size, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(
        out_channels, channels, *kernel, dtype=torch.float64, generator=generator, requires_grad=True
    )
    reference = F.conv2d(x, w, stride=stride)
    grad = torch.randn(reference.shape, dtype=torch.float64, generator=generator)
    expected = (reference, *torch.autograd.grad(reference, (x, w), grad))
    mine = fourier_conv2d(x, w, stride)
    found = (mine, *torch.autograd.grad(mine, (x, w), grad))
    return max((a - b).abs().max().item() for a, b in zip(found, expected, strict=True))


def _best_seconds(run: Callable[[], object], repeats: int = 4) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_primary_caps(batch: int) -> dict[str, float]:
    """Seconds for forward + backward of the PrimaryCaps convolution (256 -> 256, 9x9, stride 2, a
    20x20 input) in float32, three ways."""
    x = torch.randn(batch, 256, 20, 20, requires_grad=True)
    w = (0.01 * torch.randn(256, 256, 9, 9)).requires_grad_()
    grad = torch.randn(batch, 256, 6, 6)
    plan = Plan((20, 20), (9, 9), 2, torch.float32)
    ways = {
        "PyTorch": lambda: F.conv2d(x, w, stride=2),
        "capsnet.conv": lambda: conv2d(x, w, None, 2),
        "Fourier": lambda: fourier_conv2d(x, w, 2, plan),
    }

    def step(forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = w.grad = None
            forward().backward(grad)

        return run

    return {name: _best_seconds(step(forward)) for name, forward in ways.items()}


class FourierConv(nn.Module):
    """Stands in for a CapsNet convolution layer: the same weight and bias, the Fourier way."""

    def __init__(self, conv: nn.Conv2d, input_size: int) -> None:
        super().__init__()
        self.weight, self.bias, self.stride = conv.weight, conv.bias, conv.stride[0]
        kernel = tuple(conv.weight.shape[-2:])
        self.plan = Plan((input_size, input_size), kernel, self.stride, conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fourier_conv2d(x, self.weight, self.stride, self.plan) + self.bias.view(1, -1, 1, 1)


def time_training_step(batch: int, rounds: int = 6, steps: int = 4) -> dict[str, list[float]]:
    """Seconds per training step of the paper's CapsNet (fp32, fused Adam), its PrimaryCaps
    convolution done by :mod:`capsnet.conv` or the Fourier way, alternating in ``rounds`` rounds of
    ``steps`` steps so that a change in the machine's speed affects both alike."""
    torch.manual_seed(0)
    model = CapsNet()
    optimizer = adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    layers = {"capsnet.conv": model.primary.conv, "Fourier": FourierConv(model.primary.conv, 20)}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = batch_loss(model, x, y, 0.0005, train=True)
        loss.backward()
        optimizer.step()

    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(rounds):
        for name, layer in layers.items():
            model.primary.conv = layer
            step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append((time.perf_counter() - start) / steps)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batches", nargs="*", type=int, default=[32, 128], help="batch sizes to time")
    args = parser.parse_args()
    error = largest_error(3, 5, 4, (20, 21), (9, 8), 2)
    print(f"largest difference from F.conv2d in float64 (output and gradients): {error:.1e}")
    print(f"instructions: {torch.backends.cpu.get_cpu_capability()}; threads: {torch.get_num_threads()}")
    for batch in args.batches:
        seconds = time_primary_caps(batch)
        print(
            f"batch {batch}, forward + backward: " + ", ".join(f"{k} {v:.3f} s" for k, v in seconds.items())
        )
        steps = time_training_step(batch)
        print(
            f"batch {batch}, training step (best of {len(steps['Fourier'])} alternating rounds): "
            + ", ".join(f"{k} {min(v):.3f} s" for k, v in steps.items())
        )


if __name__ == "__main__":
    main()
