"""Matrix capsules with EM routing (Hinton, Sabour & Frosst 2018, Sec. 3, Fig. 1): layers and a
small model.

A matrix capsule has a 4x4 pose matrix ``M`` and a logistic activation ``a``. Capsule grids are
stored channels last: poses ``(batch, H, W, types, 4, 4)`` and activations
``(batch, H, W, types)``. A child ``i`` votes for a parent ``j`` with ``V_ij = M_i W_ij``, and
:func:`capsnet.em_routing` turns votes and activations into the parents' poses and activations.

The architecture (Fig. 1): ReLU Conv1 (A channels, 5x5, stride 2) -> PrimaryCaps (B types, 1x1) ->
ConvCaps1 (C types, 3x3, stride 2) -> ConvCaps2 (D types, 3x3, stride 1) -> Class capsules (one
per class, transformations shared across positions, coordinate addition). On 28x28 MNIST the
capsule grids are 12x12, 5x5 and 3x3.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from .layers import conv_output_size
from .models import check_images
from .routing_em import DEFAULT_EPS, em_routing, routing_settings

__all__ = [
    "ClassMatrixCapsules",
    "ConvMatrixCapsules",
    "MatrixCapsNet",
    "MatrixCapsNetOutput",
    "PrimaryMatrixCapsules",
]

POSE = 4  # poses are POSE x POSE matrices
POSE_DIM = POSE * POSE


def _check_capsules(poses: torch.Tensor, activations: torch.Tensor, types: int, layer: str) -> None:
    """Raise unless ``poses (batch, H, W, types, 4, 4)`` and ``activations (batch, H, W, types)`` match."""
    for name, value in (("poses", poses), ("activations", activations)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{layer}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if poses.dim() != 6 or tuple(poses.shape[3:]) != (types, POSE, POSE):
        raise ValueError(
            f"{layer}: poses must have shape (batch, H, W, {types}, {POSE}, {POSE}), got {tuple(poses.shape)}"
        )
    if tuple(activations.shape) != tuple(poses.shape[:4]):
        raise ValueError(
            f"{layer}: activations must have shape {tuple(poses.shape[:4])} to match the poses, "
            f"got {tuple(activations.shape)}"
        )


class PrimaryMatrixCapsules(nn.Module):
    """PrimaryCaps: a 1x1 convolution gives each position ``types`` capsules, each a 4x4 pose
    (16 linear channels) and an activation (one channel through a logistic).

    Shapes: ``(batch, in_channels, H, W) -> poses (batch, H, W, types, 4, 4), activations
    (batch, H, W, types)``. Parameters: ``(in_channels + 1) * types * 17``.
    """

    def __init__(self, in_channels: int, types: int) -> None:
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * POSE_DIM, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = x.shape
        poses = self.pose(x).view(batch, self.types, POSE, POSE, height, width)
        activations = torch.sigmoid(self.activation(x))  # (batch, types, H, W)
        return poses.permute(0, 4, 5, 1, 2, 3), activations.permute(0, 2, 3, 1)


class _EMRouted(nn.Module):
    """What both routed capsule layers share: ``beta_v``, ``beta_a`` per output type (starting at
    0), and EM routing with ``iterations``, inverse temperatures ``lambdas`` (default
    :func:`capsnet.inverse_temperatures`) and ``eps``, checked here once."""

    def __init__(self, out_types: int, iterations: int, lambdas: Sequence[float] | None, eps: float) -> None:
        super().__init__()
        self.lambdas = routing_settings(iterations, lambdas, eps)
        self.out_types, self.iterations, self.eps = out_types, iterations, eps
        self.beta_v = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))

    def route(self, votes: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``votes (groups, children, out_types, 4, 4)``, ``activations (groups, children)`` ->
        poses ``(groups, out_types, 4, 4)`` and activations ``(groups, out_types)``."""
        out = em_routing(
            votes.flatten(-2),
            activations,
            self.beta_v,
            self.beta_a,
            self.iterations,
            lambdas=self.lambdas,
            eps=self.eps,
        )
        return out.poses.unflatten(-1, (POSE, POSE)), out.activations


class ConvMatrixCapsules(_EMRouted):
    """ConvCaps: a convolutional capsule layer with EM routing.

    Every output position looks at the ``K x K x in_types`` child capsules of its receptive field.
    Child ``(ky, kx, b)`` votes for output type ``c`` with ``V = M W[ky, kx, b, c]``: one learned
    4x4 transformation per kernel position and type pair, shared across positions like a
    convolution kernel. Each output position then routes over its own children.

    Simplification: in the paper a child that lies in several overlapping receptive fields is
    assigned (E-step) across the parents at all those positions; here each receptive field is
    routed on its own, so a child's assignments sum to 1 over the ``out_types`` parents of each
    position it feeds, as most public re-implementations do.

    Shapes: poses ``(batch, H, W, in_types, 4, 4)``, activations ``(batch, H, W, in_types)`` ->
    ``(batch, H', W', out_types, 4, 4)``, ``(batch, H', W', out_types)`` with
    ``H' = (H - K) // stride + 1``. Parameters: ``K * K * in_types * out_types * 16 + 2 * out_types``.

    ``W`` starts as N(0, ``init_std``^2): with 0.5 each vote entry, a sum of 4 products, has
    about the scale of the pose entries (the paper gives no initialisation).
    """

    def __init__(
        self,
        in_types: int,
        out_types: int,
        kernel_size: int = 3,
        stride: int = 1,
        iterations: int = 3,
        *,
        lambdas: Sequence[float] | None = None,
        eps: float = DEFAULT_EPS,
        init_std: float = 0.5,
    ) -> None:
        super().__init__(out_types, iterations, lambdas, eps)
        self.in_types, self.kernel_size, self.stride = in_types, kernel_size, stride
        shape = (kernel_size, kernel_size, in_types, out_types, POSE, POSE)
        self.weight = nn.Parameter(init_std * torch.randn(shape))

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """``(batch, H, W, in_types, 4, 4) -> (batch, H', W', K*K*in_types, out_types, 4, 4)``."""
        k, s = self.kernel_size, self.stride
        conv_output_size(poses.shape[1], k, s)
        conv_output_size(poses.shape[2], k, s)
        # unfold the two spatial axes: (batch, H', W', in_types, 4, 4, K, K) -> kernel axes first
        patches = poses.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 6, 7, 3, 4, 5)
        weight = self.weight.to(poses.dtype)
        return torch.einsum("bxyuvtik,uvtcks->bxyuvtcis", patches, weight).flatten(3, 5)

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_capsules(poses, activations, self.in_types, type(self).__name__)
        k, s = self.kernel_size, self.stride
        votes = self.votes(poses)
        batch, height, width, children = votes.shape[:4]
        child_act = activations.unfold(1, k, s).unfold(2, k, s).permute(0, 1, 2, 4, 5, 3)
        out_poses, out_act = self.route(
            votes.reshape(batch * height * width, children, self.out_types, POSE, POSE),
            child_act.reshape(batch * height * width, children),
        )
        return (
            out_poses.view(batch, height, width, self.out_types, POSE, POSE),
            out_act.view(batch, height, width, self.out_types),
        )

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, out_types={self.out_types}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, iterations={self.iterations}"
        )


def coordinate_offsets(
    height: int, width: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Coordinate addition's offsets, shape ``(H, W, 4, 4)``: zero except entries ``(0, 3)`` and
    ``(1, 3)`` (the first two of the last column), which hold the scaled ``x = (col + 0.5) / W``
    and ``y = (row + 0.5) / H`` of the centre of the grid cell, the child's receptive field."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    offsets = torch.zeros(height, width, POSE, POSE, device=device, dtype=dtype)
    offsets[:, :, 0, 3] = xs.view(1, width)
    offsets[:, :, 1, 3] = ys.view(height, 1)
    return offsets


class ClassMatrixCapsules(_EMRouted):
    """Class capsules: every child capsule of the grid votes for every class capsule.

    The transformation depends on the child's type only: ``V = M W[type, class]``, shared across
    positions. With coordinate addition the child's position (see :func:`coordinate_offsets`) is
    added to the first two entries of the last column of each vote, so the class poses can still
    say where things are although the transformations do not.

    Shapes: poses ``(batch, H, W, in_types, 4, 4)``, activations ``(batch, H, W, in_types)`` ->
    ``(batch, classes, 4, 4)``, ``(batch, classes)``. Parameters: ``in_types * classes * 16 + 2 * classes``.
    ``W`` starts as N(0, ``init_std``^2), as in :class:`ConvMatrixCapsules`.
    """

    def __init__(
        self,
        in_types: int,
        classes: int,
        iterations: int = 3,
        *,
        coordinate_addition: bool = True,
        lambdas: Sequence[float] | None = None,
        eps: float = DEFAULT_EPS,
        init_std: float = 0.5,
    ) -> None:
        super().__init__(classes, iterations, lambdas, eps)
        self.in_types, self.coordinate_addition = in_types, coordinate_addition
        self.weight = nn.Parameter(init_std * torch.randn(in_types, classes, POSE, POSE))

    def votes(self, poses: torch.Tensor) -> torch.Tensor:
        """``(batch, H, W, in_types, 4, 4) -> (batch, H, W, in_types, classes, 4, 4)``."""
        votes = torch.einsum("bxytik,tcks->bxytcis", poses, self.weight.to(poses.dtype))
        if self.coordinate_addition:
            _, height, width = poses.shape[:3]
            offsets = coordinate_offsets(height, width, device=poses.device, dtype=poses.dtype)
            votes = votes + offsets.view(1, height, width, 1, 1, POSE, POSE)
        return votes

    def forward(self, poses: torch.Tensor, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_capsules(poses, activations, self.in_types, type(self).__name__)
        batch = poses.shape[0]
        votes = self.votes(poses).reshape(batch, -1, self.out_types, POSE, POSE)
        return self.route(votes, activations.reshape(batch, -1))

    def extra_repr(self) -> str:
        return (
            f"in_types={self.in_types}, classes={self.out_types}, iterations={self.iterations}, "
            f"coordinate_addition={self.coordinate_addition}"
        )


class MatrixCapsNetOutput(NamedTuple):
    """What :class:`MatrixCapsNet` returns.

    activations: ``(batch, classes)``, each class capsule's activation in ``(0, 1)``: the scores
    the spread loss compares and whose argmax is the prediction.
    poses: ``(batch, classes, 4, 4)``, the class capsules' pose matrices.
    """

    activations: torch.Tensor
    poses: torch.Tensor


class MatrixCapsNet(nn.Module):
    """The matrix capsule network of Fig. 1, sized for a CPU by default.

    ReLU Conv1 (``channels`` = A, 5x5, stride 2) -> PrimaryCaps (``primary_types`` = B) ->
    ConvCaps1 (``caps1_types`` = C, 3x3, stride 2) -> ConvCaps2 (``caps2_types`` = D, 3x3,
    stride 1) -> class capsules (``classes`` = E, coordinate addition). The paper's small
    smallNORB model has A=64, B=8, C=D=16 and the large one A=B=C=D=32; the default here,
    A=32, B=C=D=8, has 25,084 parameters on MNIST.

    Parameters (``K = 3``): ``26 A + 17 (A + 1) B + 16 K^2 (B C + C D) + 16 D E + 2 (C + D + E)``,
    counting a single input channel (Conv1 has ``25 * in_channels * A + A``).

    Shapes: images ``(batch, in_channels, input_size, input_size)`` -> :class:`MatrixCapsNetOutput`.
    ``iterations``, ``lambdas`` and ``eps`` go to every routed layer (see :func:`capsnet.em_routing`).
    """

    def __init__(
        self,
        input_size: int = 28,
        in_channels: int = 1,
        classes: int = 10,
        *,
        channels: int = 32,
        primary_types: int = 8,
        caps1_types: int = 8,
        caps2_types: int = 8,
        iterations: int = 3,
        coordinate_addition: bool = True,
        lambdas: Sequence[float] | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.input_size, self.in_channels, self.classes = input_size, in_channels, classes
        try:
            conv_output_size(conv_output_size(conv_output_size(input_size, 5, 2), 3, 2), 3, 1)
        except ValueError as err:
            raise ValueError(
                "input_size must be at least 17 so that Conv1 (5x5, stride 2), ConvCaps1 (3x3, stride 2) "
                f"and ConvCaps2 (3x3) each leave at least one position, got {input_size}"
            ) from err
        self.conv1 = nn.Conv2d(in_channels, channels, 5, stride=2)
        self.primary = PrimaryMatrixCapsules(channels, primary_types)
        routing = {"lambdas": lambdas, "eps": eps}
        self.caps1 = ConvMatrixCapsules(primary_types, caps1_types, 3, 2, iterations, **routing)
        self.caps2 = ConvMatrixCapsules(caps1_types, caps2_types, 3, 1, iterations, **routing)
        self.class_caps = ClassMatrixCapsules(
            caps2_types, classes, iterations, coordinate_addition=coordinate_addition, **routing
        )

    def forward(self, x: torch.Tensor) -> MatrixCapsNetOutput:
        """Classify images ``x`` (floats in ``[0, 1]``)."""
        check_images(x, self.in_channels, self.input_size)
        poses, activations = self.primary(torch.relu(self.conv1(x)))
        poses, activations = self.caps1(poses, activations)
        poses, activations = self.caps2(poses, activations)
        poses, activations = self.class_caps(poses, activations)
        return MatrixCapsNetOutput(activations, poses)
