"""The models of Sabour, Frosst & Hinton (2017): CapsNet with its decoder, and the baseline CNN."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import nn

from .conv import Conv2d
from .layers import PrimaryCapsules, RoutingCapsules, conv_output_size
from .losses import as_target_mask
from .routing import CouplingMode, GradientMode
from .squashing import capsule_length

__all__ = [
    "CapsNet",
    "CapsNetOutput",
    "Decoder",
    "BaselineCNN",
    "MODELS",
    "build_model",
    "check_images",
    "flop_matched_cnn",
    "small_cnn",
]


def check_images(x: torch.Tensor, channels: int, size: int) -> None:
    """Raise a clear error unless ``x`` is a float batch of shape ``(batch, channels, size, size)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"images must be floating point in [0, 1], got dtype {x.dtype} "
            "(convert uint8 images with x.float() / 255)"
        )
    expected = (channels, size, size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"images must have shape (batch, {channels}, {size}, {size}), got {tuple(x.shape)}")


class CapsNetOutput(NamedTuple):
    """What :class:`CapsNet` returns.

    lengths: ``(batch, classes)``, each class capsule's length, the probability of that class.
    poses: ``(batch, classes, capsule_dim)``, the class capsules' output vectors ``v_j``.
    reconstructions: ``(batch, channels, H, W)`` from the decoder, or ``None`` without one.
    couplings: ``(batch, primary_caps, classes)`` final coupling coefficients, if asked for.
    """

    lengths: torch.Tensor
    poses: torch.Tensor
    reconstructions: torch.Tensor | None
    couplings: torch.Tensor | None


class Decoder(nn.Module):
    """Reconstructs the image from the class capsules, all but one masked to zero.

    ``(batch, classes, capsule_dim)`` and a 0/1 mask ``(batch, classes)`` ->
    ``(batch, channels, size, size)``. The paper's: 160 -> 512 ReLU -> 1024 ReLU -> 784 sigmoid.
    """

    def __init__(
        self,
        classes: int = 10,
        capsule_dim: int = 16,
        hidden: tuple[int, ...] = (512, 1024),
        image_shape: tuple[int, int, int] = (1, 28, 28),
    ) -> None:
        super().__init__()
        self.image_shape = image_shape
        sizes = (classes * capsule_dim, *hidden)
        layers: list[nn.Module] = []
        for n_in, n_out in pairwise(sizes):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], image_shape[0] * image_shape[1] * image_shape[2])]
        layers += [nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, poses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        masked = poses * mask.to(poses.dtype).unsqueeze(-1)
        return self.net(masked.flatten(1)).view(poses.shape[0], *self.image_shape)


class CapsNet(nn.Module):
    """CapsNet of Sabour et al. 2017 (Fig. 1 and 2); the paper's MNIST model by default.

    Conv1 (256 @ 9x9, ReLU) -> PrimaryCaps (32 types x 8D, 9x9, stride 2, squashed) ->
    DigitCaps (``classes`` x 16D, routing by agreement) -> lengths; a decoder
    (512-1024-pixels, sigmoid) reconstructs the input from the class capsules.

    The default model has 8,215,568 parameters (6,804,224 without the decoder). With
    ``input_size=36`` (MultiMNIST) it has 11,361,808.

    Args:
        input_size: side of the square input images (28 MNIST, 36 MultiMNIST, 40 affNIST-style).
        in_channels: image channels.
        classes: number of class capsules.
        conv_channels: Conv1 output channels.
        primary_types, primary_dim: capsule types and their dimension in PrimaryCaps.
        class_dim: dimension of each class capsule.
        kernel_size: kernel of Conv1 and PrimaryCaps.
        routing_iterations, routing_gradient, coupling: see :func:`capsnet.dynamic_routing`.
        squashed: squash primary and class capsules (Eq. 1); ``False`` is an ablation.
        decoder: whether to build the reconstruction decoder.
        decoder_hidden: its hidden layer sizes.
    """

    def __init__(
        self,
        input_size: int = 28,
        in_channels: int = 1,
        classes: int = 10,
        *,
        conv_channels: int = 256,
        primary_types: int = 32,
        primary_dim: int = 8,
        class_dim: int = 16,
        kernel_size: int = 9,
        routing_iterations: int = 3,
        routing_gradient: GradientMode = "last",
        coupling: CouplingMode = "dynamic",
        squashed: bool = True,
        decoder: bool = True,
        decoder_hidden: tuple[int, ...] = (512, 1024),
    ) -> None:
        super().__init__()
        self.input_size, self.in_channels, self.classes = input_size, in_channels, classes
        self.conv1 = Conv2d(in_channels, conv_channels, kernel_size)  # nn.Conv2d, faster gradients
        self.primary = PrimaryCapsules(
            conv_channels, primary_types, primary_dim, kernel_size, 2, squashed=squashed
        )
        conv_side = conv_output_size(input_size, kernel_size)
        self.digit = RoutingCapsules(
            self.primary.num_capsules(conv_side),
            primary_dim,
            classes,
            class_dim,
            routing_iterations,
            gradient=routing_gradient,
            coupling=coupling,
            squashed=squashed,
        )
        image_shape = (in_channels, input_size, input_size)
        self.decoder = Decoder(classes, class_dim, decoder_hidden, image_shape) if decoder else None

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> class capsules ``v`` ``(batch, classes, class_dim)`` and couplings ``c``
        ``(batch, primary_caps, classes)``; an empty batch gives empty ones."""
        check_images(x, self.in_channels, self.input_size)
        if x.shape[0] == 0:  # the capsule layers cannot reshape an empty batch
            caps = self.digit
            return x.new_zeros(0, caps.out_caps, caps.out_dim), x.new_zeros(0, caps.in_caps, caps.out_caps)
        u = self.primary(torch.relu(self.conv1(x)))
        return self.digit(u, generator)

    def reconstruct(self, poses: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Decode the capsules of the classes in ``target`` (indices or a 0/1 class mask)."""
        if self.decoder is None:
            raise RuntimeError("this CapsNet was built with decoder=False: it cannot reconstruct")
        return self.decoder(poses, as_target_mask(target, self.classes))

    def forward(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        return_couplings: bool = False,
        generator: torch.Generator | None = None,
    ) -> CapsNetOutput:
        """Classify ``x`` and reconstruct it.

        Args:
            x: images ``(batch, in_channels, input_size, input_size)``, floats in ``[0, 1]``.
            target: labels used to mask the decoder's input (training, Sec. 4.1); if ``None``
                the longest capsule is used (test time). Indices ``(batch,)`` or a 0/1 mask.
            return_couplings: also return the final coupling coefficients.
            generator: random source for ``coupling="random"``.
        """
        poses, couplings = self.encode(x, generator)
        lengths = capsule_length(poses)
        reconstructions = None
        if self.decoder is not None:
            if target is None:
                target = lengths.argmax(dim=1)
            elif target.shape[0] != x.shape[0]:
                raise ValueError(f"got {target.shape[0]} labels for a batch of {x.shape[0]} images")
            reconstructions = self.reconstruct(poses, target)
        return CapsNetOutput(lengths, poses, reconstructions, couplings if return_couplings else None)


class BaselineCNN(nn.Module):
    """The paper's baseline CNN (Sec. 5): three 5x5 convolutions with 256, 256 and 128 channels
    (stride 1, padded to keep the size), fully connected layers of 328 and 192 units, dropout,
    and a linear layer to the class logits. About 35.4M parameters on 28x28 inputs.

    Shapes: ``(batch, in_channels, size, size) -> logits (batch, classes)``.
    """

    def __init__(
        self,
        input_size: int = 28,
        in_channels: int = 1,
        classes: int = 10,
        channels: tuple[int, int, int] = (256, 256, 128),
        hidden: tuple[int, int] = (328, 192),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.input_size, self.in_channels, self.classes = input_size, in_channels, classes
        convs: list[nn.Module] = []
        for n_in, n_out in zip((in_channels, *channels[:-1]), channels, strict=True):
            convs += [nn.Conv2d(n_in, n_out, 5, padding=2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*convs)
        flat = channels[-1] * input_size * input_size
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, hidden[0]),
            nn.ReLU(inplace=True),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden[1], classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_channels, self.input_size)
        return self.classifier(self.features(x))


def small_cnn(**kwargs: object) -> BaselineCNN:
    """The baseline CNN with (32, 64, 32) channels instead of (256, 256, 128): 8.4M parameters on
    28x28 inputs, about as many as CapsNet's 8.2M, at a tenth of the baseline's compute."""
    return BaselineCNN(channels=(32, 64, 32), **kwargs)


def flop_matched_cnn(**kwargs: object) -> BaselineCNN:
    """The baseline CNN with (64, 100, 32) channels: on 28x28 inputs a training step costs 1.18
    GFLOP per image, 0.99 times CapsNet's 1.20, with 8.5M parameters against CapsNet's 8.2M. Matched
    to CapsNet in compute as well as in size (:func:`small_cnn` costs 0.45 times CapsNet's)."""
    return BaselineCNN(channels=(64, 100, 32), **kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "capsnet": CapsNet,
    "baseline": BaselineCNN,
    "cnn-small": small_cnn,
    "cnn-flops": flop_matched_cnn,
}


def build_model(kind: str, **kwargs: object) -> nn.Module:
    """Build a model by name (a key of :data:`MODELS`) with keyword arguments."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}: choose one of {', '.join(MODELS)}")
    return MODELS[kind](**kwargs)
