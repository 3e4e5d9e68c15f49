"""Data sets built from MNIST digits for the paper's robustness and segmentation experiments.

* :func:`translated_mnist`: each digit pasted at a random place on a 40x40 black canvas, the
  training set of the paper's affNIST experiment (Sabour et al. 2017, section 5.2).
* :func:`affnist_style`: digits under random affine maps within affNIST's ranges on a 40x40
  canvas. This is an *affNIST-style* test set generated here, not the published affNIST.
* :func:`multi_mnist`: two overlapping digits of different classes on a 36x36 canvas, the
  paper's MultiMNIST recipe (section 6), with each digit kept separately for scoring
  reconstructions.

Every function takes a split's uint8 images ``(n, 1, H, W)`` (H, W = 28 for MNIST) with their
labels ``(n,)``, works on the images' device and returns uint8 images on that device. Randomness
comes from a CPU :class:`torch.Generator` seeded with ``seed``, so a seed gives the same data on
every device (bilinear resampling in :func:`affnist_style` may differ in the last bit of rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["AffineTransforms", "MultiMNIST", "affnist_style", "multi_mnist", "translated_mnist"]

_CHUNK = 4096  # images warped at once by affnist_style (bounds the memory of the sampling grid)


class MultiMNIST(NamedTuple):
    """Output of :func:`multi_mnist`; unpacks as ``images, labels, parts``.

    Attributes:
        images: ``(n, 1, canvas, canvas)`` uint8, the two digits overlaid, ``min(a + b, 255)``.
        labels: ``(n, 2)`` int64, the classes of the two digits (always different).
        parts: ``(n, 2, 1, canvas, canvas)`` uint8, each digit alone, shifted as in ``images``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    parts: torch.Tensor


@dataclass(frozen=True)
class AffineTransforms:
    """The random affine maps :func:`affnist_style` applied, one per image.

    A point ``p = (x, y)`` of the input digit, in pixels from the digit's centre (x to the right,
    y down), lands at ``matrix[:, :, :2] @ p + matrix[:, :, 2]`` in pixels from the canvas centre,
    where ``matrix[:, :, :2] = rotation @ shear @ scale`` and ``matrix[:, :, 2] = translation``.

    Attributes:
        rotation: ``(n,)`` angles in degrees (positive turns clockwise on screen, since y points down).
        shear: ``(n,)`` horizontal shear factors: ``x -> x + shear * y``.
        scale: ``(n, 2)`` scale factors along x and y.
        translation: ``(n, 2)`` where the digit's centre lands, in pixels from the canvas centre.
        matrix: ``(n, 2, 3)`` the whole map ``[A | t]`` described above.
    """

    rotation: torch.Tensor
    shear: torch.Tensor
    scale: torch.Tensor
    translation: torch.Tensor
    matrix: torch.Tensor


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_digits(images: object, labels: object, canvas: int) -> None:
    """Raise TypeError/ValueError unless ``images`` is uint8 ``(n, 1, H, W)`` with H, W <= ``canvas``
    and ``labels`` holds ``n`` integer class indices."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"images must be uint8 (pixel values 0..255, as load_dataset gives), got {images.dtype}"
        )
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (n, 1, H, W), got {tuple(images.shape)}")
    if images.shape[2] > canvas or images.shape[3] > canvas:
        raise ValueError(
            f"images of size {images.shape[2]}x{images.shape[3]} do not fit on a {canvas}x{canvas} canvas"
        )
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"labels must hold integer class indices, got {labels.dtype}")
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must have shape ({len(images)},) to match the images, got {tuple(labels.shape)}"
        )


def _cpu_generator(seed: object) -> torch.Generator:
    return torch.Generator().manual_seed(_check_int(seed, "seed", 0))


def _paste(images: torch.Tensor, canvas: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Copy each ``(1, H, W)`` image into a zero ``(1, canvas, canvas)`` canvas with its top-left
    pixel at ``(top[i], left[i])``. Shapes: ``(n, 1, H, W)``, ``(n,)``, ``(n,)`` -> ``(n, 1, canvas,
    canvas)``. The offsets must keep every image inside the canvas."""
    n, _, height, width = images.shape
    device = images.device
    rows = top.to(device)[:, None] + torch.arange(height, device=device)  # (n, H)
    cols = left.to(device)[:, None] + torch.arange(width, device=device)  # (n, W)
    out = images.new_zeros(n, 1, canvas, canvas)
    index = torch.arange(n, device=device)[:, None, None]
    out[:, 0][index, rows[:, :, None], cols[:, None, :]] = images[:, 0]
    return out


def translated_mnist(
    images: torch.Tensor, labels: torch.Tensor, seed: int, canvas: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste each digit at a uniformly random position on a black ``canvas x canvas`` image, the
    "translated MNIST" the paper trains on before testing on affNIST (section 5.2).

    Args:
        images: uint8 ``(n, 1, H, W)`` digits, any device, with ``H, W <= canvas``.
        labels: ``(n,)`` integer class indices.
        seed: makes the positions reproducible.
        canvas: side of the square output in pixels.

    Returns:
        uint8 images ``(n, 1, canvas, canvas)`` holding every input pixel unchanged, and the labels,
        both on the images' device.
    """
    canvas = _check_int(canvas, "canvas", 1)
    _check_digits(images, labels, canvas)
    gen = _cpu_generator(seed)
    n, _, height, width = images.shape
    top = torch.randint(0, canvas - height + 1, (n,), generator=gen)
    left = torch.randint(0, canvas - width + 1, (n,), generator=gen)
    return _paste(images, canvas, top, left), labels.to(images.device)


def _ink_box(images: torch.Tensor) -> torch.Tensor:
    """``(n, 4)`` float: ``(x_min, x_max, y_min, y_max)`` of the region where the bilinear
    interpolation of each ``(1, H, W)`` image can be non-zero, in pixels from the image centre
    (one pixel beyond the outermost non-zero pixel centres). A blank image gets the whole frame."""
    _, _, height, width = images.shape
    ink = images[:, 0] > 0

    def extent(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # mask: (n, L), first/last True
        length = mask.shape[1]
        first = mask.int().argmax(dim=1)
        last = length - 1 - mask.flip(1).int().argmax(dim=1)
        blank = ~mask.any(dim=1)
        first, last = torch.where(blank, 0, first), torch.where(blank, length - 1, last)
        centre = (length - 1) / 2
        return first.float() - 1 - centre, last.float() + 1 - centre

    x_min, x_max = extent(ink.any(dim=1))
    y_min, y_max = extent(ink.any(dim=2))
    return torch.stack([x_min, x_max, y_min, y_max], dim=1)


def _random_linear_maps(
    n: int,
    gen: torch.Generator,
    max_rotation: float,
    max_shear: float,
    scale_range: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw rotation (degrees), shear, per-axis scale and the ``(n, 2, 2)`` matrix ``R @ Sh @ S``."""
    rotation = (2 * torch.rand(n, generator=gen) - 1) * max_rotation
    shear = (2 * torch.rand(n, generator=gen) - 1) * max_shear
    low, high = scale_range
    scale = low + (high - low) * torch.rand(n, 2, generator=gen)
    angle = torch.deg2rad(rotation)
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(n), torch.ones(n)
    rotate = torch.stack([cos, -sin, sin, cos], dim=1).view(n, 2, 2)
    shear_matrix = torch.stack([one, shear, zero, one], dim=1).view(n, 2, 2)
    linear = rotate @ shear_matrix @ torch.diag_embed(scale)
    return rotation, shear, scale, linear


def affnist_style(
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    canvas: int = 40,
    *,
    max_rotation: float = 20.0,
    max_shear: float = 0.2,
    scale_range: tuple[float, float] = (0.8, 1.2),
    return_transforms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, AffineTransforms]:
    """Digits under random affine maps within affNIST's ranges, on a ``canvas x canvas`` image:
    an *affNIST-style* test set (generated here; not the published affNIST files).

    Each digit is scaled by independent factors along x and y drawn from ``scale_range``, sheared
    horizontally by a factor within ``+-max_shear``, rotated by an angle within ``+-max_rotation``
    degrees, then translated to a uniformly random place that keeps all of its ink inside the
    canvas (a digit too large to fit anywhere is centred instead). Pixels are resampled
    bilinearly and rounded back to uint8.

    Args:
        images: uint8 ``(n, 1, H, W)`` digits, any device, with ``H, W <= canvas``.
        labels: ``(n,)`` integer class indices.
        seed: makes the transforms reproducible.
        canvas: side of the square output in pixels.
        max_rotation: largest rotation in degrees, ``>= 0``.
        max_shear: largest shear factor, ``>= 0``.
        scale_range: ``(low, high)`` with ``0 < low <= high``.
        return_transforms: also return the :class:`AffineTransforms` that were applied.

    Returns:
        uint8 images ``(n, 1, canvas, canvas)`` and the labels, on the images' device, plus the
        transforms (on the CPU) if ``return_transforms``.
    """
    canvas = _check_int(canvas, "canvas", 1)
    _check_digits(images, labels, canvas)
    if not max_rotation >= 0 or not max_shear >= 0:
        raise ValueError(f"max_rotation and max_shear must be >= 0, got {max_rotation} and {max_shear}")
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    gen = _cpu_generator(seed)
    n, _, height, width = images.shape
    rotation, shear, scale, linear = _random_linear_maps(n, gen, max_rotation, max_shear, scale_range)

    # Where the ink can go once mapped by `linear`, then the translations that keep it on the canvas
    # (its pixel centres run from -(canvas - 1) / 2 to (canvas - 1) / 2 around the canvas centre).
    x_min, x_max, y_min, y_max = _ink_box(images).cpu().unbind(dim=1)
    corners = torch.stack(
        [torch.stack([x, y], dim=1) for x in (x_min, x_max) for y in (y_min, y_max)], dim=2
    )  # (n, 2, 4)
    mapped = linear @ corners
    half = (canvas - 1) / 2
    low, high = -half - mapped.amin(dim=2), half - mapped.amax(dim=2)  # (n, 2) each
    u = torch.rand(n, 2, generator=gen)
    translation = torch.where(high >= low, low + u * (high - low), (low + high) / 2)

    # grid_sample needs the inverse map, from output to input, in coordinates normalised to
    # [-1, 1] across the canvas. The digit is first pasted at the canvas centre, so its centre sits
    # `offset` pixels from the canvas centre (-0.5 when canvas - H is odd).
    top, left = (canvas - height) // 2, (canvas - width) // 2
    offset = torch.tensor([left + (width - 1) / 2 - half, top + (height - 1) / 2 - half])
    inverse = torch.linalg.inv(linear)
    shift = (offset - (inverse @ translation[:, :, None]).squeeze(2)) * (2 / canvas)
    theta = torch.cat([inverse, shift[:, :, None]], dim=2).to(images.device)
    centred = _paste(
        images, canvas, torch.full((n,), top, dtype=torch.long), torch.full((n,), left, dtype=torch.long)
    )
    out = torch.empty_like(centred)
    for start in range(0, n, _CHUNK):
        part = slice(start, start + _CHUNK)
        grid = F.affine_grid(theta[part], [len(theta[part]), 1, canvas, canvas], align_corners=False)
        warped = F.grid_sample(centred[part].float(), grid, mode="bilinear", align_corners=False)
        out[part] = warped.round().clamp(0, 255).to(torch.uint8)
    labels = labels.to(images.device)
    if not return_transforms:
        return out, labels
    matrix = torch.cat([linear, translation[:, :, None]], dim=2)
    return out, labels, AffineTransforms(rotation, shear, scale, translation, matrix)


def _partner_indices(labels: torch.Tensor, first: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each index in ``first``, a uniformly random index whose label differs from its label.

    Works without rejection: the examples are sorted by class, and a draw ``r`` among the ``n -
    count(c)`` examples of other classes skips over the block of class ``c``."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    block = torch.searchsorted(classes, labels[first])  # class position of each first digit
    others = len(labels) - counts[block]
    r = (torch.rand(len(first), generator=gen, dtype=torch.float64) * others).long()
    r = torch.minimum(r, others - 1)
    position = torch.where(r < starts[block], r, r + counts[block])
    return order[position]


def multi_mnist(
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    seed: int,
    canvas: int = 36,
    max_shift: int = 4,
) -> MultiMNIST:
    """Pairs of overlapping digits of different classes, the paper's MultiMNIST (section 6).

    The first digits run through the split in random order (a fresh order each time round, so every
    digit is used about ``n / len(images)`` times); each is paired with a uniformly random digit of
    another class from the same split. Both digits are padded to ``canvas x canvas`` (centred), each
    is shifted by its own whole-pixel offset within ``+-max_shift`` along each axis, and the two are
    overlaid with the sum clipped: ``min(a + b, 255)`` on uint8 (pixel values clipped to 1 in
    the paper's [0, 1] scale).

    Args:
        images: uint8 ``(N, 1, H, W)`` digits of one split, any device; ``(canvas - H) // 2`` and
            ``(canvas - W) // 2`` must be at least ``max_shift`` so shifted digits stay whole.
        labels: ``(N,)`` integer class indices with at least two classes.
        n: how many pairs to make.
        seed: makes the pairs and shifts reproducible.
        canvas: side of the square output in pixels (36 in the paper).
        max_shift: largest shift in pixels along each axis (4 in the paper).

    Returns:
        A :class:`MultiMNIST` ``(images, labels, parts)`` on the images' device: merged images
        ``(n, 1, canvas, canvas)`` uint8, labels ``(n, 2)`` int64 and the two shifted digits
        ``(n, 2, 1, canvas, canvas)`` uint8, so that ``images == min(parts.sum(1), 255)``.
    """
    n = _check_int(n, "n", 1)
    canvas = _check_int(canvas, "canvas", 1)
    max_shift = _check_int(max_shift, "max_shift", 0)
    _check_digits(images, labels, canvas)
    total, _, height, width = images.shape
    margin = min((canvas - height) // 2, (canvas - width) // 2)
    if max_shift > margin:
        raise ValueError(
            f"max_shift={max_shift} would push {height}x{width} digits off a {canvas}x{canvas} canvas "
            f"(at most {margin} fits)"
        )
    cpu_labels = labels.cpu().long()
    if len(torch.unique(cpu_labels)) < 2:
        raise ValueError("labels must contain at least two classes to pair digits of different classes")
    gen = _cpu_generator(seed)
    rounds = -(-n // total)
    first = torch.cat([torch.randperm(total, generator=gen) for _ in range(rounds)])[:n]
    second = _partner_indices(cpu_labels, first, gen)
    pairs = torch.stack([first, second], dim=1)  # (n, 2)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2, 2), generator=gen)  # (pair, digit, row/col)
    top = (canvas - height) // 2 + shifts[..., 0].flatten()
    left = (canvas - width) // 2 + shifts[..., 1].flatten()
    parts = _paste(images[pairs.flatten().to(images.device)], canvas, top, left)
    parts = parts.view(n, 2, 1, canvas, canvas)
    merged = parts.sum(dim=1, dtype=torch.int16).clamp(max=255).to(torch.uint8)
    return MultiMNIST(merged, cpu_labels[pairs].to(images.device), parts)
