"""Tests of capsnet.data.synthetic: translated MNIST, affNIST-style digits and MultiMNIST.

Most tests use small made-up digits; one checks real MNIST test digits when $CAPSNET_DATA is set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from capsnet.data import AffineTransforms, affnist_style, load_dataset, multi_mnist, translated_mnist

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blobs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-like digits: smooth ink in the central 20x20 of a 28x28 frame, and labels 0..9."""
    gen = torch.Generator().manual_seed(seed)
    seeds = (torch.rand(n, 1, 20, 20, generator=gen) > 0.85).float()
    ink = F.avg_pool2d(F.max_pool2d(seeds, 3, 1, 1), 3, 1, 1)
    images = F.pad((ink * 255).round().to(torch.uint8), (4, 4, 4, 4))
    return images, torch.arange(n) % 10


def full_frames(n: int, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits with ink (1..255) in every pixel, all different: where they land is unambiguous."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen), torch.arange(n) % classes


def placement(canvas_image: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """Top, left and the 28x28 crop of the only non-zero block of a ``(1, C, C)`` canvas."""
    rows = canvas_image[0].any(dim=1).nonzero().flatten()
    cols = canvas_image[0].any(dim=0).nonzero().flatten()
    top, left = int(rows[0]), int(cols[0])
    assert len(rows) == 28 and len(cols) == 28, "exactly one 28x28 block of ink"
    assert int(rows[-1]) == top + 27 and int(cols[-1]) == left + 27
    crop = canvas_image[:, top : top + 28, left : left + 28]
    assert int(canvas_image.sum(dtype=torch.long)) == int(crop.sum(dtype=torch.long)), "zeros elsewhere"
    return top, left, crop


def centroid(images: torch.Tensor) -> torch.Tensor:
    """``(n, 2)``: the ink's centre of mass ``(x, y)`` in pixels from the image centre."""
    weights = images[:, 0].double()
    height, width = weights.shape[1:]
    ys = torch.arange(height, dtype=torch.float64) - (height - 1) / 2
    xs = torch.arange(width, dtype=torch.float64) - (width - 1) / 2
    mass = weights.sum(dim=(1, 2))
    return torch.stack(
        [(weights * xs).sum(dim=(1, 2)) / mass, (weights * ys[:, None]).sum(dim=(1, 2)) / mass], 1
    )


# ------------------------------------------------------------------------------ translated MNIST


def test_translated_mnist_pastes_every_digit_whole() -> None:
    images, labels = full_frames(300)
    out, out_labels = translated_mnist(images, labels, seed=0)
    assert out.shape == (300, 1, 40, 40) and out.dtype == torch.uint8
    assert torch.equal(out_labels, labels)
    positions = []
    for x, y in zip(images, out, strict=True):
        top, left, crop = placement(y)
        assert torch.equal(crop, x)
        positions.append((top, left))
    tops, lefts = zip(*positions, strict=True)
    assert min(tops) == 0 and max(tops) == 12 and min(lefts) == 0 and max(lefts) == 12, (
        "the whole range is used"
    )
    assert len(set(positions)) > 100


def test_translated_mnist_seeds_and_canvas() -> None:
    images, labels = blobs(20)
    a, b, c = (translated_mnist(images, labels, seed=s)[0] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(translated_mnist(images, labels, 5, canvas=28)[0], images), "no room, no move"
    assert translated_mnist(images, labels, 5, canvas=33)[0].shape == (20, 1, 33, 33)


# ------------------------------------------------------------------------------ affNIST-style


@pytest.fixture(scope="module")
def warped() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AffineTransforms]:
    """200 made-up digits, their affNIST-style versions, the labels returned and the transforms."""
    images, labels = blobs(200)
    return images, labels, *affnist_style(images, labels, seed=0, return_transforms=True)


def test_affnist_style_shapes_and_seeds(warped) -> None:
    images, labels, out, out_labels, t = warped
    assert out.shape == (200, 1, 40, 40) and out.dtype == torch.uint8
    assert torch.equal(out_labels, labels)
    assert t.rotation.shape == (200,) and t.shear.shape == (200,)
    assert t.scale.shape == (200, 2) and t.translation.shape == (200, 2) and t.matrix.shape == (200, 2, 3)
    few, few_labels = images[:20], labels[:20]
    a, b, c = (affnist_style(few, few_labels, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert affnist_style(few, few_labels, 0, canvas=48)[0].shape == (20, 1, 48, 48)


def test_affnist_style_transforms_vary_within_affnist_ranges(warped) -> None:
    t = warped[-1]
    for values, low, high in ((t.rotation, -20, 20), (t.shear, -0.2, 0.2), (t.scale, 0.8, 1.2)):
        assert float(values.min()) >= low and float(values.max()) <= high
        margin = 0.05 * (high - low)
        assert float(values.min()) < low + margin and float(values.max()) > high - margin, "full range"
    assert abs(float(torch.corrcoef(t.scale.T)[0, 1])) < 0.2, "x and y scales are drawn independently"
    assert float(t.translation.std(dim=0).min()) > 3, "digits move around the canvas"
    angle = torch.deg2rad(t.rotation)
    rotate = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(-1, 2, 2)
    shear = torch.eye(2).repeat(200, 1, 1)
    shear[:, 0, 1] = t.shear
    assert torch.allclose(t.matrix[:, :, :2], rotate @ shear @ torch.diag_embed(t.scale), atol=1e-6)
    assert torch.equal(t.matrix[:, :, 2], t.translation)


def test_affnist_style_images_follow_their_transforms(warped) -> None:
    """The ink's centre of mass lands where the returned matrix sends it."""
    images, _, out, _, t = warped
    linear, shift = t.matrix[:, :, :2].double(), t.matrix[:, :, 2].double()
    expected = (linear @ centroid(images)[:, :, None]).squeeze(2) + shift
    assert float((centroid(out) - expected).abs().max()) < 0.3


def mass_ratio(images: torch.Tensor, out: torch.Tensor, t: AffineTransforms) -> torch.Tensor:
    """Ink out over ink in times the map's area factor (its determinant, the product of the scales)."""
    return out.flatten(1).double().sum(1) / (images.flatten(1).double().sum(1) * t.scale.double().prod(1))


def test_affnist_style_keeps_the_ink_on_the_canvas(warped) -> None:
    """Resampling keeps the ink's mass times the area factor: none falls off the canvas, although
    digits are placed all the way to its edges."""
    images, _, out, _, t = warped
    ratio = mass_ratio(images, out, t)
    assert float(ratio.min()) > 0.93 and float(ratio.max()) < 1.07
    for side in (out[:, 0, :2], out[:, 0, -2:], out[:, 0, :, :2], out[:, 0, :, -2:]):
        assert int((side.flatten(1).amax(1) > 0).sum()) > 3, "some digits reach every edge of the canvas"


def test_affnist_style_rotation_turns_the_digit() -> None:
    """A horizontal bar, rotated only: its principal axis turns by the returned angle (clockwise on
    screen for a positive angle, since y points down)."""
    bar = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    bar[..., 12:16, 3:25] = 255
    images, labels = bar.repeat(30, 1, 1, 1), torch.zeros(30, dtype=torch.long)
    out, _, t = affnist_style(
        images, labels, 7, max_shear=0.0, scale_range=(1.0, 1.0), return_transforms=True
    )
    weights = out[:, 0].double()
    grid_y, grid_x = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    mass = weights.sum(dim=(1, 2))
    mx, my = ((weights * g).sum(dim=(1, 2)) / mass for g in (grid_x, grid_y))
    dx, dy = grid_x - mx[:, None, None], grid_y - my[:, None, None]
    cxx, cyy, cxy = ((weights * a * b).sum(dim=(1, 2)) / mass for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    axis_angle = torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy))
    assert float((axis_angle - t.rotation.double()).abs().max()) < 1.0
    assert float(t.rotation.abs().max()) > 15


def test_affnist_style_on_real_mnist() -> None:
    folder = os.environ.get("CAPSNET_DATA")
    if not folder or not (Path(folder) / "mnist").is_dir():
        pytest.skip("set CAPSNET_DATA to a folder holding mnist/ to check real digits")
    test = load_dataset("mnist", "test", download=False)
    images, labels = test.images[:300], test.labels[:300]
    out, out_labels, t = affnist_style(images, labels, 0, return_transforms=True)
    ratio = mass_ratio(images, out, t)
    assert float(ratio.min()) > 0.93 and float(ratio.max()) < 1.07
    assert torch.equal(out_labels, labels)


def test_affnist_style_centres_a_digit_too_large_to_fit() -> None:
    images, labels = full_frames(10)
    out, _, t = affnist_style(
        images, labels, 0, max_rotation=0, max_shear=0, scale_range=(1.4, 1.4), return_transforms=True
    )
    assert torch.equal(t.translation, torch.zeros(10, 2))
    assert out[:, 0, 20, 20].min() > 0


# ------------------------------------------------------------------------------ MultiMNIST


def test_multi_mnist_recipe() -> None:
    images, labels = full_frames(40)
    data = multi_mnist(images, labels, n=200, seed=0)
    assert data.images.shape == (200, 1, 36, 36) and data.images.dtype == torch.uint8
    assert data.labels.shape == (200, 2) and data.labels.dtype == torch.int64
    assert data.parts.shape == (200, 2, 1, 36, 36) and data.parts.dtype == torch.uint8
    assert (data.labels[:, 0] != data.labels[:, 1]).all(), "the two digits are of different classes"
    merged = data.parts.sum(dim=1, dtype=torch.int32).clamp(max=255).to(torch.uint8)
    assert torch.equal(data.images, merged)
    assert int(data.images.max()) == 255, "overlapping ink is clipped"

    flat = images.flatten(1)
    shifts = []
    for parts, pair in zip(data.parts, data.labels, strict=True):
        for part, label in zip(parts, pair, strict=True):
            top, left, crop = placement(part)
            source = (flat == crop.flatten()).all(dim=1).nonzero().flatten()
            assert len(source) == 1, "each part is a whole digit of the split"
            assert int(labels[source]) == int(label)
            shifts.append((top - 4, left - 4))
    shifts_t = torch.tensor(shifts).view(200, 2, 2)
    assert int(shifts_t.abs().max()) == 4, "shifts reach but never pass 4 pixels"
    assert (shifts_t[:, 0] != shifts_t[:, 1]).any(dim=1).float().mean() > 0.9, "each digit has its own shift"
    assert len({tuple(s) for s in shifts}) > 70, "all 81 offsets are possible"


def test_multi_mnist_uses_every_digit_and_pairs_it_with_all_other_classes() -> None:
    images, labels = full_frames(30, classes=3)
    labels = torch.tensor([2, 5, 9])[labels]  # any class values work
    data = multi_mnist(images, labels, n=30, seed=1)
    flat = images.flatten(1)
    firsts = [int((flat == placement(p)[2].flatten()).all(dim=1).nonzero()) for p in data.parts[:, 0]]
    assert sorted(firsts) == list(range(30)), "n = len(split): every digit comes first exactly once"
    many = multi_mnist(images, labels, n=600, seed=2).labels
    for c in (2, 5, 9):
        partners = set(many[many[:, 0] == c, 1].tolist())
        assert partners == {2, 5, 9} - {c}


def test_multi_mnist_seeds_and_paper_sizes() -> None:
    images, labels = blobs(50)
    a, b, c = (multi_mnist(images, labels, 20, s) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.images, c.images)
    images_, labels_, parts_ = a  # unpacks like a tuple
    assert images_ is a.images and labels_ is a.labels and parts_ is a.parts
    wide = multi_mnist(images, labels, 5, 0, canvas=40, max_shift=6)
    assert wide.images.shape == (5, 1, 40, 40)


# ------------------------------------------------------------------------------ devices and errors


@pytest.mark.parametrize("device", DEVICES)
def test_same_data_on_every_device(device: str) -> None:
    images, labels = blobs(16)
    cpu_t, cpu_m = translated_mnist(images, labels, 0)[0], multi_mnist(images, labels, 8, 0)
    dev_t = translated_mnist(images.to(device), labels.to(device), 0)[0]
    dev_m = multi_mnist(images.to(device), labels.to(device), 8, 0)
    dev_a, dev_labels = affnist_style(images.to(device), labels.to(device), 0)
    assert (
        dev_t.device.type == dev_m.images.device.type == dev_a.device.type == dev_labels.device.type == device
    )
    assert torch.equal(dev_t.cpu(), cpu_t)
    assert all(torch.equal(x.cpu(), y) for x, y in zip(dev_m, cpu_m, strict=True))
    diff = (dev_a.cpu().int() - affnist_style(images, labels, 0)[0].int()).abs()
    assert int(diff.max()) <= 1


@pytest.mark.parametrize("make", ["translated", "affnist", "multi"])
def test_input_errors(make: str) -> None:
    images, labels = blobs(10)

    def call(images=images, labels=labels, seed=0, **kwargs):
        if make == "translated":
            return translated_mnist(images, labels, seed, **kwargs)
        if make == "affnist":
            return affnist_style(images, labels, seed, **kwargs)
        return multi_mnist(images, labels, 4, seed, **kwargs)

    with pytest.raises(TypeError, match="images must be uint8.*got torch.float32"):
        call(images=images.float() / 255)
    with pytest.raises(TypeError, match="images must be a torch.Tensor, got ndarray"):
        call(images=images.numpy())
    with pytest.raises(ValueError, match=r"\(n, 1, H, W\), got \(10, 28, 28\)"):
        call(images=images[:, 0])
    with pytest.raises(ValueError, match=r"\(n, 1, H, W\), got \(10, 3, 28, 28\)"):
        call(images=images.expand(10, 3, 28, 28))
    with pytest.raises(ValueError, match="28x28 do not fit on a 20x20 canvas"):
        call(canvas=20)
    with pytest.raises(TypeError, match="canvas must be an int, got float"):
        call(canvas=40.0)
    with pytest.raises(TypeError, match="labels must hold integer class indices, got torch.float32"):
        call(labels=labels.float())
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\).*got \(9,\)"):
        call(labels=labels[:9])
    with pytest.raises(TypeError, match="seed must be an int, got float"):
        call(seed=1.5)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        call(seed=-1)


def test_specific_errors() -> None:
    images, labels = blobs(10)
    with pytest.raises(ValueError, match="max_rotation and max_shear must be >= 0"):
        affnist_style(images, labels, 0, max_shear=-0.1)
    with pytest.raises(ValueError, match=r"scale_range must be \(low, high\) with 0 < low <= high"):
        affnist_style(images, labels, 0, scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="max_shift=5 would push 28x28 digits off a 36x36 canvas"):
        multi_mnist(images, labels, 4, 0, max_shift=5)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        multi_mnist(images, labels, 0, 0)
    with pytest.raises(ValueError, match="at least two classes"):
        multi_mnist(images, torch.zeros(10, dtype=torch.long), 4, 0)


def test_mathematical_helpers_are_consistent() -> None:
    """The test's own centroid agrees with a hand example (guards the checks above)."""
    image = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    image[0, 0, 0, 3] = 10
    assert centroid(image).tolist() == [[1.5, -1.5]]
