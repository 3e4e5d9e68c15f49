"""Capsule layers: primary capsules (a grouped convolution) and a fully connected capsule layer.

Capsules are stored as ``(batch, n_capsules, capsule_dim)`` tensors throughout.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv import Conv2d
from .routing import CouplingMode, GradientMode, dynamic_routing
from .squashing import squash

__all__ = ["PrimaryCapsules", "RoutingCapsules", "conv_output_size"]


def conv_output_size(size: int, kernel_size: int, stride: int = 1) -> int:
    """Spatial size after a convolution without padding: ``(size - kernel) // stride + 1``."""
    out = (size - kernel_size) // stride + 1
    if out < 1:
        raise ValueError(
            f"input of size {size} is too small for a {kernel_size}x{kernel_size} kernel with stride {stride}"
        )
    return out


class PrimaryCapsules(nn.Module):
    """The paper's PrimaryCaps: a convolution whose channels are grouped into capsules.

    The convolution has ``capsule_types * capsule_dim`` output channels. Channel
    ``t * capsule_dim + k`` is component ``k`` of capsule type ``t``, so the capsule of type ``t``
    at position ``(y, x)`` is the vector of channels ``t*capsule_dim ... t*capsule_dim + dim-1``
    at that one position. (Grouping with ``view(batch, -1, capsule_dim)`` on the NCHW output
    instead would make a "capsule" out of 8 neighbouring pixels of one channel.)

    Shapes: ``(batch, in_channels, H, W) -> (batch, capsule_types * H' * W', capsule_dim)``,
    capsules ordered by type, then row, then column. With the paper's sizes a 20x20x256 input
    gives 32 x 6 x 6 = 1152 capsules of 8 dimensions. ``squashed=False`` leaves the capsules
    unsquashed (an ablation, chapter 12).
    """

    def __init__(
        self,
        in_channels: int = 256,
        capsule_types: int = 32,
        capsule_dim: int = 8,
        kernel_size: int = 9,
        stride: int = 2,
        *,
        squashed: bool = True,
    ) -> None:
        super().__init__()
        self.squashed = squashed
        self.capsule_types = capsule_types
        self.capsule_dim = capsule_dim
        # nn.Conv2d with its gradients computed the faster way on this machine (capsnet.conv)
        self.conv = Conv2d(in_channels, capsule_types * capsule_dim, kernel_size, stride)

    def num_capsules(self, input_size: int) -> int:
        """Number of capsules produced from a square ``input_size x input_size`` feature map."""
        conv = self.conv
        side = conv_output_size(input_size, conv.kernel_size[0], conv.stride[0])
        return self.capsule_types * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (B, T*D, H, W)
        batch, _, height, width = out.shape
        out = out.view(batch, self.capsule_types, self.capsule_dim, height, width)
        out = out.permute(0, 1, 3, 4, 2)  # (B, T, H, W, D): components last
        out = out.reshape(batch, -1, self.capsule_dim)
        return squash(out) if self.squashed else out


class RoutingCapsules(nn.Module):
    """A fully connected capsule layer with routing by agreement (the paper's DigitCaps).

    Each input capsule ``i`` predicts each output capsule ``j`` through its own transformation
    matrix: ``u_hat_j|i = W_ij u_i`` (Eq. 2). One ``W`` is shared by all examples: the
    predictions come from a single einsum, never from a per-example copy of ``W``. They are
    stored parents first, the order in which :func:`capsnet.dynamic_routing` reads them.

    Shapes: ``(batch, in_caps, in_dim) -> v (batch, out_caps, out_dim), c (batch, in_caps, out_caps)``.
    Parameters: ``in_caps * out_caps * out_dim * in_dim`` (1152 x 10 x 16 x 8 = 1,474,560 in
    the paper); the routing logits are per-example state, not parameters.

    ``W`` starts as N(0, ``init_std``^2). The default 0.05 gives untrained class capsules long
    enough that the margin loss's gradient is not lost in squash's flat region near 0 (with 0.01
    MNIST training starts visibly slower).
    """

    def __init__(
        self,
        in_caps: int = 1152,
        in_dim: int = 8,
        out_caps: int = 10,
        out_dim: int = 16,
        iterations: int = 3,
        *,
        gradient: GradientMode = "last",
        coupling: CouplingMode = "dynamic",
        init_std: float = 0.05,
        squashed: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        self.in_caps, self.in_dim = in_caps, in_dim
        self.out_caps, self.out_dim = out_caps, out_dim
        self.iterations, self.gradient, self.coupling = iterations, gradient, coupling
        self.squashed = squashed
        self.weight = nn.Parameter(init_std * torch.randn(in_caps, out_caps, out_dim, in_dim))

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """``u_hat_j|i = W_ij u_i``: ``(batch, in_caps, in_dim) -> (batch, in_caps, out_caps, out_dim)``.

        The result is a transposed view of a contiguous ``(batch, out_caps, in_caps, out_dim)``
        tensor: routing sums over the children of one parent at a time, so it reads each
        parent's predictions as one block of memory.
        """
        if u.dim() != 3 or u.shape[1:] != (self.in_caps, self.in_dim):
            raise ValueError(
                f"expected input capsules of shape (batch, {self.in_caps}, {self.in_dim}), "
                f"got {tuple(u.shape)}"
            )
        parents_first = torch.einsum("ijdk,bik->bjid", self.weight.to(u.dtype), u).contiguous()
        return parents_first.transpose(1, 2)

    def forward(
        self, u: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return dynamic_routing(
            self.predictions(u),
            self.iterations,
            gradient=self.gradient,
            coupling=self.coupling,
            generator=generator,
            squashed=self.squashed,
        )

    def extra_repr(self) -> str:
        return (
            f"in_caps={self.in_caps}, in_dim={self.in_dim}, out_caps={self.out_caps}, "
            f"out_dim={self.out_dim}, iterations={self.iterations}, coupling={self.coupling!r}"
        )
