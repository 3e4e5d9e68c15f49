"""Tests of capsnet.faces: the cartoon faces toy data of chapters 1 and 2."""

from __future__ import annotations

import math

import pytest
import torch

from capsnet.faces import PART_IN_FACE, PARTS, make_faces, pose_matrix, render_parts


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def in_face_offsets(faces) -> torch.Tensor:
    """``(n, 5, 2)``: where each part sits in its face's frame (face units)."""
    return (torch.linalg.inv(faces.face_poses)[:, None] @ faces.part_poses)[..., :2, 2]


@pytest.mark.parametrize("size", [16, 32, 48])
@pytest.mark.parametrize("kind", [{}, {"scrambled": True}, {"missing_parts": True}])
def test_shapes_dtypes_and_range(size: int, kind: dict) -> None:
    faces = make_faces(7, size, generator=seeded(), **kind)
    assert faces.images.shape == (7, 1, size, size) and faces.images.dtype == torch.float32
    assert faces.part_poses.shape == (7, len(PARTS), 3, 3)
    assert faces.present.shape == (7, len(PARTS)) and faces.present.dtype == torch.bool
    assert faces.face_poses.shape == (7, 3, 3)
    assert faces.images.min() >= 0.0 and faces.images.max() <= 1.0
    assert (faces.images.flatten(1).amax(dim=1) > 0.5).all(), "every image has ink"


def test_same_seed_same_faces_other_seed_other_faces() -> None:
    a, b, c = (make_faces(5, scrambled=True, missing_parts=True, generator=seeded(s)) for s in (3, 3, 4))
    for field in ("images", "part_poses", "present", "face_poses"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.images, c.images)


def test_real_face_parts_follow_the_fixed_part_whole_transforms() -> None:
    faces = make_faces(20, part_jitter=0.0, generator=seeded())
    torch.testing.assert_close(faces.part_poses, faces.face_poses[:, None] @ PART_IN_FACE)
    # So each part alone predicts the face's pose: part_pose @ inverse(part-in-face).
    predicted = faces.part_poses @ torch.linalg.inv(PART_IN_FACE)
    torch.testing.assert_close(predicted, faces.face_poses[:, None].expand_as(predicted), atol=1e-4, rtol=0)
    assert faces.present.all()


def test_part_jitter_bounds_how_far_parts_move() -> None:
    jitter = 0.05
    faces = make_faces(200, part_jitter=jitter, generator=seeded())
    moved = in_face_offsets(faces) - PART_IN_FACE[:, :2, 2]
    assert moved.abs().max() <= jitter + 1e-4
    assert moved.abs().max() > jitter / 2


def test_faces_turn_at_most_max_rotation() -> None:
    faces = make_faces(300, max_rotation=20.0, generator=seeded())
    angles = torch.atan2(faces.face_poses[:, 1, 0], faces.face_poses[:, 0, 0])
    assert angles.abs().max() <= math.radians(20.0) + 1e-5
    assert angles.abs().max() > math.radians(15.0)
    upright = make_faces(10, max_rotation=0.0, generator=seeded())
    assert torch.atan2(upright.face_poses[:, 1, 0], upright.face_poses[:, 0, 0]).abs().max() < 1e-6


def test_scrambled_faces_keep_the_same_parts_in_other_places() -> None:
    faces = make_faces(100, scrambled=True, part_jitter=0.0, generator=seeded())
    assert faces.present.all()
    # Same parts: each part keeps its shape's size and orientation relative to the face ...
    torch.testing.assert_close(
        (torch.linalg.inv(faces.face_poses)[:, None] @ faces.part_poses)[..., :2, :2],
        PART_IN_FACE[:, :2, :2].expand(100, -1, -1, -1),
    )
    # ... and the parts occupy exactly the real face's slots, permuted, the outline fixed.
    offsets = in_face_offsets(faces)
    slots = PART_IN_FACE[:, :2, 2]
    torch.testing.assert_close(offsets[:, 0], slots[0].expand(100, 2))
    distance = torch.cdist(offsets, slots[None].expand(100, -1, -1))  # (n, part, slot)
    assert (distance.amin(dim=2) < 1e-4).all(), "every part sits on a slot"
    assert (distance.argmin(dim=2).sort(dim=1).values == torch.arange(len(PARTS))).all(), "a permutation"
    mouth = PARTS.index("mouth")
    assert (distance[:, mouth, mouth] > 0.1).all(), "the mouth always leaves its place"


def test_missing_parts_drop_one_or_two_parts_and_do_not_draw_them() -> None:
    faces = make_faces(400, missing_parts=True, generator=seeded())
    dropped = (~faces.present).sum(dim=1)
    assert set(dropped.tolist()) == {1, 2}
    assert (~faces.present).any(dim=0).all(), "every part goes missing sometimes"
    all_parts = render_parts(faces.part_poses, torch.ones_like(faces.present), 32)
    assert torch.equal(faces.images, render_parts(faces.part_poses, faces.present, 32))
    assert (all_parts.sum(dim=(1, 2, 3)) > faces.images.sum(dim=(1, 2, 3))).all()


def test_pose_matrix_maps_points_and_composes() -> None:
    m = pose_matrix(1.0, 2.0, math.pi / 2, 2.0)
    torch.testing.assert_close(m @ torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 4.0, 1.0]))
    a, b = torch.tensor([0.3, -1.2]), torch.tensor([0.5, 2.0])
    torch.testing.assert_close(pose_matrix(0, 0, a) @ pose_matrix(0, 0, b), pose_matrix(0, 0, a + b))
    assert pose_matrix(torch.zeros(4, 1), torch.zeros(3), 0.0).shape == (4, 3, 3, 3)


def test_rendering_is_equivariant_to_whole_pixel_shifts() -> None:
    faces = make_faces(4, 48, generator=seeded())
    shifted = render_parts(pose_matrix(3.0, -2.0) @ faces.part_poses, faces.present, 48)
    torch.testing.assert_close(shifted, torch.roll(faces.images, shifts=(-2, 3), dims=(2, 3)))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": 0}, ValueError),
        ({"n": 2.5}, ValueError),
        ({"n": True}, ValueError),
        ({"n": 3, "size": 8}, ValueError),
        ({"n": 3, "max_rotation": -1.0}, ValueError),
        ({"n": 3, "part_jitter": -0.1}, ValueError),
        ({"n": 3, "generator": 0}, TypeError),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        make_faces(**kwargs)


def test_render_parts_rejects_bad_shapes() -> None:
    faces = make_faces(2, generator=seeded())
    with pytest.raises(ValueError, match="part_poses"):
        render_parts(faces.part_poses[:, :3], faces.present, 32)
    with pytest.raises(ValueError, match="present"):
        render_parts(faces.part_poses, faces.present.float(), 32)
