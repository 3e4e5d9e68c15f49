"""A toy world of cartoon faces for Part I of the book (chapters 1 and 2).

A face is five parts drawn as simple shapes: an oval ``outline``, two eyes (discs), a ``nose``
(a short vertical bar) and a ``mouth`` (a curved bar). Every part has a :term:`pose`: a 3x3
homogeneous matrix that maps the part's own coordinates to pixel coordinates ``(x, y)``, where x
is the column and y the row (y points down). A real face is built top-down, the way computer
graphics renders a scene: the face's pose times a fixed part-in-face transform gives each part's
pose,

    part_pose[p] = face_pose @ PART_IN_FACE[p]        (up to a little jitter),

so ``part_pose[p] @ inverse(PART_IN_FACE[p])`` gives back the face's pose from any single part:
the relation chapter 2 builds on and a capsule's transformation matrix ``W_ij`` learns
(Sabour et al. 2017, Eq. 2).

Two kinds of non-face: ``scrambled`` faces keep all five parts but swap where the eyes, nose and
mouth sit (the mouth never stays in its own slot); ``missing_parts`` faces leave out one or two
parts. The module is data only: it knows nothing of the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PARTS", "PART_IN_FACE", "Faces", "make_faces", "pose_matrix", "render_parts"]

PARTS: tuple[str, ...] = ("outline", "left eye", "right eye", "nose", "mouth")

# Where each part sits in the face's frame (face units: the outline is an oval of half-height 1)
# and how big it is. Rows follow PARTS.
_SLOTS = torch.tensor([[0.0, 0.0], [-0.34, -0.25], [0.34, -0.25], [0.0, 0.1], [0.0, 0.52]])
_PART_SCALES = torch.tensor([1.0, 0.13, 0.13, 0.2, 0.33])
_FACE_SCALE = 0.36  # the face's half-height as a fraction of the canvas size
_MAX_SHIFT = 0.06  # the face centre's largest shift from the canvas centre, as a fraction of the size
_SCALE_RANGE = (0.9, 1.1)  # the face's size varies by this factor


def pose_matrix(
    x: torch.Tensor | float,
    y: torch.Tensor | float,
    angle: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """The 2-D similarity transform ``translate(x, y) @ rotate(angle) @ scale(scale)``.

    Arguments broadcast against each other; ``angle`` is in radians. Returns ``(..., 3, 3)``:
    ``[[s cos a, -s sin a, x], [s sin a, s cos a, y], [0, 0, 1]]`` in float32.
    """
    x, y, angle, scale = torch.broadcast_tensors(
        *(torch.as_tensor(v, dtype=torch.float32) for v in (x, y, angle, scale))
    )
    c, s = scale * torch.cos(angle), scale * torch.sin(angle)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows = [torch.stack(r, dim=-1) for r in ((c, -s, x), (s, c, y), (zero, zero, one))]
    return torch.stack(rows, dim=-2)


PART_IN_FACE: torch.Tensor = pose_matrix(_SLOTS[:, 0], _SLOTS[:, 1], 0.0, _PART_SCALES)
"""``(5, 3, 3)``: each part's pose in the face's frame, the fixed part-whole relation."""


def _inside_margin(part: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """How far ``(u, v)`` (part coordinates) lies inside part ``part``'s shape; negative outside."""
    if part == 0:  # outline: an oval ring
        return 0.07 - (torch.sqrt((u / 0.85) ** 2 + v**2) - 1.0).abs()
    if part in (1, 2):  # eyes: unit discs
        return 1.0 - torch.sqrt(u**2 + v**2)
    if part == 3:  # nose: a vertical bar
        return torch.minimum(0.35 - u.abs(), 1.0 - v.abs())
    return torch.minimum(0.22 - (v + 0.3 * u**2).abs(), 1.0 - u.abs())  # mouth: a smile


def render_parts(part_poses: torch.Tensor, present: torch.Tensor, size: int) -> torch.Tensor:
    """Draw faces from their parts' poses: the "rendering" direction of computer graphics.

    part_poses: ``(n, 5, 3, 3)``, each part's pose (part coordinates -> pixel coordinates).
    present: ``(n, 5)`` bool, which parts to draw.
    Returns ``(n, 1, size, size)`` float32 images in [0, 1] with anti-aliased edges.
    """
    if part_poses.dim() != 4 or tuple(part_poses.shape[1:]) != (len(PARTS), 3, 3):
        raise ValueError(f"part_poses must have shape (n, {len(PARTS)}, 3, 3), got {tuple(part_poses.shape)}")
    if tuple(present.shape) != tuple(part_poses.shape[:2]) or present.dtype != torch.bool:
        raise ValueError(
            f"present must be a bool tensor of shape {tuple(part_poses.shape[:2])}, "
            f"got {present.dtype} {tuple(present.shape)}"
        )
    coords = torch.arange(size, dtype=torch.float32, device=part_poses.device)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    pixels = torch.stack([xx, yy, torch.ones_like(xx)]).flatten(1)  # (3, size*size)
    local = torch.linalg.inv(part_poses.float()) @ pixels  # (n, 5, 3, size*size)
    pixels_per_unit = torch.linalg.det(part_poses[..., :2, :2].float()).abs().sqrt()  # (n, 5)
    image = torch.zeros(part_poses.shape[0], size * size, device=part_poses.device)
    for p in range(len(PARTS)):
        margin = _inside_margin(p, local[:, p, 0], local[:, p, 1]) * pixels_per_unit[:, p, None]
        ink = (0.5 + margin).clamp(0.0, 1.0) * present[:, p, None]
        image = torch.maximum(image, ink)
    return image.view(-1, 1, size, size)


@dataclass(frozen=True)
class Faces:
    """A batch from :func:`make_faces`.

    images: ``(n, 1, size, size)`` float32 in [0, 1].
    part_poses: ``(n, 5, 3, 3)``, the pose of each part as drawn (rows follow :data:`PARTS`);
        a missing part keeps the pose it would have had.
    present: ``(n, 5)`` bool, which parts were drawn.
    face_poses: ``(n, 3, 3)``, the pose of the face the parts were placed from.
    """

    images: torch.Tensor
    part_poses: torch.Tensor
    present: torch.Tensor
    face_poses: torch.Tensor


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _scrambled_slots(n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``(n, 5)`` slot index per part: the outline keeps its slot, the four inner parts are permuted
    so that the mouth lands somewhere else."""
    slots = torch.arange(len(PARTS)).repeat(n, 1)
    for i in range(n):
        perm = torch.randperm(4, generator=generator)
        while perm[3] == 3:  # the mouth (inner part 3) must leave its slot
            perm = torch.randperm(4, generator=generator)
        slots[i, 1:] = 1 + perm
    return slots


def make_faces(
    n: int,
    size: int = 32,
    *,
    scrambled: bool = False,
    missing_parts: bool = False,
    max_rotation: float = 15.0,
    part_jitter: float = 0.04,
    generator: torch.Generator | None = None,
) -> Faces:
    """Draw ``n`` random cartoon faces, or non-faces made from the same parts.

    n: how many images.
    size: the canvas is ``size x size`` pixels (at least 16).
    scrambled: put the eyes, nose and mouth in each other's places (same parts, wrong places).
    missing_parts: leave out one or two of the five parts at random.
    max_rotation: the face turns by up to this many degrees either way.
    part_jitter: each part moves by up to this much (in face units) from its place in the face.
    generator: a seeded ``torch.Generator`` makes the batch reproducible.

    Each face is shifted by up to 6% of the canvas, scaled by 0.9 to 1.1 and rotated at random.
    Returns a :class:`Faces`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size must be an int of at least 16, got {size!r}")
    if max_rotation < 0 or part_jitter < 0:
        raise ValueError(
            f"max_rotation and part_jitter must be >= 0, got {max_rotation!r} and {part_jitter!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")

    centre, shift = (size - 1) / 2, _MAX_SHIFT * size
    face_poses = pose_matrix(
        centre + _uniform(n, -shift, shift, generator),
        centre + _uniform(n, -shift, shift, generator),
        _uniform(n, -1.0, 1.0, generator) * math.radians(max_rotation),
        _FACE_SCALE * size * _uniform(n, *_SCALE_RANGE, generator),
    )
    slots = _scrambled_slots(n, generator) if scrambled else torch.arange(len(PARTS)).repeat(n, 1)
    offsets = _SLOTS[slots] + part_jitter * (2 * torch.rand(n, len(PARTS), 2, generator=generator) - 1)
    offsets[:, 0] = 0.0  # the outline defines the face's frame
    in_face = pose_matrix(offsets[..., 0], offsets[..., 1], 0.0, _PART_SCALES)  # (n, 5, 3, 3)
    part_poses = face_poses[:, None] @ in_face

    present = torch.ones(n, len(PARTS), dtype=torch.bool)
    if missing_parts:
        dropped = 1 + torch.randint(2, (n,), generator=generator)  # one or two parts
        order = torch.rand(n, len(PARTS), generator=generator).argsort(dim=1)
        present[order < dropped[:, None]] = False

    return Faces(render_parts(part_poses, present, size), part_poses, present, face_poses)
