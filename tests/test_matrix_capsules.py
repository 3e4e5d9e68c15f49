"""Tests of capsnet.matrix_capsules (primary, convolutional and class matrix capsules, MatrixCapsNet)
and of the spread loss with its margin schedule (Hinton, Sabour & Frosst 2018)."""

from __future__ import annotations

import os
import re

import pytest
import torch

from capsnet import (
    ClassMatrixCapsules,
    ConvMatrixCapsules,
    MatrixCapsNet,
    MatrixCapsNetOutput,
    PrimaryMatrixCapsules,
    em_routing,
    spread_loss,
    spread_loss_margin,
)
from capsnet.matrix_capsules import coordinate_offsets

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = {"channels": 8, "primary_types": 4, "caps1_types": 3, "caps2_types": 5}


pytestmark = pytest.mark.usefixtures("one_thread")


def capsule_grid(
    batch: int, size: int, types: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    poses = torch.randn(batch, size, size, types, 4, 4, generator=gen).to(dtype)
    activations = torch.rand(batch, size, size, types, generator=gen).to(dtype)
    return poses, activations


def expected_parameters(a: int, b: int, c: int, d: int, e: int = 10, k: int = 3) -> int:
    """Conv1 (5x5, 1 channel) + PrimaryCaps (1x1, 16 pose + 1 activation per type) + ConvCaps1/2
    (a 4x4 W per kernel position and type pair, beta_v and beta_a per type) + class capsules."""
    conv1 = 25 * a + a
    primary = (a + 1) * b * 17
    conv_caps = k * k * (b * c + c * d) * 16 + 2 * (c + d)
    class_caps = d * e * 16 + 2 * e
    return conv1 + primary + conv_caps + class_caps


def test_primary_capsules_group_channels_per_position() -> None:
    layer = PrimaryMatrixCapsules(in_channels=6, types=3)
    x = torch.randn(2, 6, 5, 7)
    poses, activations = layer(x)
    assert poses.shape == (2, 5, 7, 3, 4, 4) and activations.shape == (2, 5, 7, 3)
    assert ((activations > 0) & (activations < 1)).all()
    # Capsule (row 4, column 2, type 1) is channels 16..31 of the 1x1 convolution at that pixel.
    channels = layer.pose(x)[1, 16:32, 4, 2]
    torch.testing.assert_close(poses[1, 4, 2, 1], channels.view(4, 4))
    torch.testing.assert_close(activations[1, 4, 2, 1], torch.sigmoid(layer.activation(x)[1, 1, 4, 2]))
    assert sum(p.numel() for p in layer.parameters()) == (6 + 1) * 3 * 17


@pytest.mark.parametrize(("size", "kernel", "stride", "out_size"), [(7, 3, 2, 3), (5, 3, 1, 3), (4, 1, 1, 4)])
def test_conv_capsule_votes_and_outputs(size: int, kernel: int, stride: int, out_size: int) -> None:
    layer = ConvMatrixCapsules(in_types=2, out_types=3, kernel_size=kernel, stride=stride)
    poses, activations = capsule_grid(2, size, 2, dtype=torch.float64)
    layer = layer.double()
    votes = layer.votes(poses)
    assert votes.shape == (2, out_size, out_size, kernel * kernel * 2, 3, 4, 4)
    # Child (ky, kx, b) of output position (y, x) votes M W[ky, kx, b, c] for type c.
    y, x, ky, kx, b, c = out_size - 1, 0, kernel - 1, kernel // 2, 1, 2
    child = (ky * kernel + kx) * 2 + b
    pose = poses[1, y * stride + ky, x * stride + kx, b]
    torch.testing.assert_close(votes[1, y, x, child, c], pose @ layer.weight[ky, kx, b, c])
    out_poses, out_act = layer(poses, activations)
    assert out_poses.shape == (2, out_size, out_size, 3, 4, 4) and out_act.shape == (2, out_size, out_size, 3)
    # Each output position is EM routing over its own receptive field, with the layer's betas.
    patch = activations[1, y * stride : y * stride + kernel, x * stride : x * stride + kernel]
    routed = em_routing(votes[1, y, x].flatten(-2)[None], patch.reshape(1, -1), layer.beta_v, layer.beta_a)
    torch.testing.assert_close(out_poses[1, y, x], routed.poses[0].view(3, 4, 4))
    torch.testing.assert_close(out_act[1, y, x], routed.activations[0])
    assert sum(p.numel() for p in layer.parameters()) == kernel * kernel * 2 * 3 * 16 + 2 * 3


def test_conv_capsules_see_only_their_receptive_field() -> None:
    layer = ConvMatrixCapsules(in_types=2, out_types=2, kernel_size=3, stride=2)
    poses, activations = capsule_grid(1, 7, 2, seed=1)
    out_poses, out_act = layer(poses, activations)
    changed_poses, changed_act = poses.clone(), activations.clone()
    changed_poses[0, 6, 6] += 5.0  # only output position (2, 2) sees input (6, 6)
    changed_act[0, 6, 6] = 1 - changed_act[0, 6, 6]
    new_poses, new_act = layer(changed_poses, changed_act)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[2, 2] = False
    torch.testing.assert_close(new_poses[0][mask], out_poses[0][mask])
    torch.testing.assert_close(new_act[0][mask], out_act[0][mask])
    assert not torch.allclose(new_act[0, 2, 2], out_act[0, 2, 2])


def test_coordinate_offsets() -> None:
    offsets = coordinate_offsets(2, 4, dtype=torch.float64)
    assert offsets.shape == (2, 4, 4, 4)
    torch.testing.assert_close(offsets[:, :, 0, 3], torch.tensor([[0.125, 0.375, 0.625, 0.875]] * 2).double())
    torch.testing.assert_close(offsets[:, :, 1, 3], torch.tensor([[0.25] * 4, [0.75] * 4]).double())
    rest = offsets.clone()
    rest[:, :, :2, 3] = 0
    assert (rest == 0).all()


def test_class_capsules_share_transformations_and_add_coordinates() -> None:
    poses, activations = capsule_grid(2, 3, 4, seed=2)
    poses[:, 2, 1] = poses[:, 0, 0]  # the same capsules at two positions
    plain = ClassMatrixCapsules(in_types=4, classes=5, coordinate_addition=False)
    added = ClassMatrixCapsules(in_types=4, classes=5)
    added.load_state_dict(plain.state_dict())
    votes_plain, votes_added = plain.votes(poses), added.votes(poses)
    assert votes_plain.shape == (2, 3, 3, 4, 5, 4, 4)
    # One W per (type, class), shared across positions: equal poses give equal votes ...
    torch.testing.assert_close(votes_plain[:, 2, 1], votes_plain[:, 0, 0])
    torch.testing.assert_close(votes_plain[0, 1, 2, 3, 4], poses[0, 1, 2, 3] @ plain.weight[3, 4])
    # ... until coordinate addition adds each position's scaled (x, y) to the last column's top two.
    difference = votes_added - votes_plain
    expected = coordinate_offsets(3, 3).view(1, 3, 3, 1, 1, 4, 4).expand_as(difference)
    torch.testing.assert_close(difference, expected)
    assert not torch.allclose(votes_added[:, 2, 1], votes_added[:, 0, 0])
    out_poses, out_act = added(poses, activations)
    assert out_poses.shape == (2, 5, 4, 4) and out_act.shape == (2, 5)
    assert sum(p.numel() for p in added.parameters()) == 4 * 5 * 16 + 2 * 5


@pytest.mark.parametrize(
    "config",
    [
        {},
        SMALL,
        {"channels": 64, "primary_types": 8, "caps1_types": 16, "caps2_types": 16},  # the paper's small model
    ],
    ids=["default", "small", "paper-small"],
)
def test_parameter_count(config: dict[str, int]) -> None:
    model = MatrixCapsNet(**config)
    count = sum(p.numel() for p in model.parameters())
    sizes = {"channels": 32, "primary_types": 8, "caps1_types": 8, "caps2_types": 8, **config}
    expected = expected_parameters(*sizes.values())
    print(f"MatrixCapsNet({config}): {count:,} parameters")
    assert count == expected


def test_default_model_size_matches_docstring() -> None:
    count = sum(p.numel() for p in MatrixCapsNet().parameters())
    assert f"{count:,} parameters" in MatrixCapsNet.__doc__


@pytest.mark.parametrize(("size", "channels", "classes"), [(28, 1, 10), (32, 2, 5)])
def test_model_outputs(size: int, channels: int, classes: int) -> None:
    torch.manual_seed(0)
    model = MatrixCapsNet(size, channels, classes, **SMALL)
    out = model(torch.rand(3, channels, size, size))
    assert isinstance(out, MatrixCapsNetOutput)
    assert out.activations.shape == (3, classes) and out.poses.shape == (3, classes, 4, 4)
    assert ((out.activations > 0) & (out.activations < 1)).all()


def test_every_parameter_gets_a_finite_gradient() -> None:
    torch.manual_seed(1)
    model = MatrixCapsNet(**SMALL)
    out = model(torch.rand(4, 1, 28, 28))
    loss = spread_loss(out.activations, torch.tensor([0, 3, 7, 9]), 0.9) + out.poses.square().mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_model_routes_each_example_on_its_own() -> None:
    torch.manual_seed(2)
    model = MatrixCapsNet(**SMALL).double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    out, permuted = model(x), model(x[perm])
    torch.testing.assert_close(permuted.activations, out.activations[perm])
    torch.testing.assert_close(permuted.poses, out.poses[perm])
    single = model(x[1:2])
    torch.testing.assert_close(single.activations, out.activations[1:2])


def test_spread_loss_by_hand() -> None:
    activations = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.4, 0.1]])
    target = torch.tensor([0, 1])
    # m = 0.9: example 0: (0.9 - 0.4)^2 + (0.9 - 0.7)^2 = 0.29; example 1: 0.8^2 + 0.6^2 = 1.0.
    assert float(spread_loss(activations, target, 0.9)) == pytest.approx((0.29 + 1.0) / 2)
    # m = 0.2: only class 0 of example 1 is within the margin: (0.2 - 0.1)^2 = 0.01.
    assert float(spread_loss(activations, target, 0.2)) == pytest.approx(0.01 / 2)
    # The target class itself is never penalised: equal activations cost (classes - 1) m^2.
    assert float(spread_loss(torch.full((2, 10), 0.5), target, 0.2)) == pytest.approx(9 * 0.04)
    # Gradients push the target up and the offending classes down.
    a = activations.clone().requires_grad_(True)
    spread_loss(a, target, 0.9).backward()
    assert (a.grad[[0, 1], [0, 1]] < 0).all() and (a.grad[[0, 0, 1, 1], [1, 2, 0, 2]] > 0).all()


def test_spread_loss_margin_schedule() -> None:
    # The paper's 0.2 -> 0.9 in steps of 0.1: ramp_steps=7 counted in epochs.
    margins = [spread_loss_margin(epoch, 7) for epoch in range(10)]
    assert margins == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    assert spread_loss_margin(500, 1000) == pytest.approx(0.55)
    assert spread_loss_margin(3, 4, start=0.0, end=1.0) == pytest.approx(0.75)


def test_spread_loss_errors() -> None:
    activations = torch.rand(2, 3)
    with pytest.raises(TypeError, match="activations must be a floating point torch.Tensor"):
        spread_loss(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]), 0.2)
    with pytest.raises(
        ValueError, match=re.escape("activations must have shape (batch, num_classes), got (6,)")
    ):
        spread_loss(activations.flatten(), torch.tensor([0, 1]), 0.2)
    with pytest.raises(
        ValueError, match=re.escape("target must be class indices of shape (batch,), got (2, 3)")
    ):
        spread_loss(activations, torch.zeros(2, 3), 0.2)
    with pytest.raises(ValueError, match=re.escape("labels must lie in [0, 2], got values from 0 to 3")):
        spread_loss(activations, torch.tensor([0, 3]), 0.2)
    with pytest.raises(TypeError, match="class indices must be an integer tensor"):
        spread_loss(activations, torch.tensor([0.0, 1.0]), 0.2)
    with pytest.raises(ValueError, match="target has 3 examples but activations has 2"):
        spread_loss(activations, torch.tensor([0, 1, 2]), 0.2)
    with pytest.raises(ValueError, match=re.escape("margin must be a number in [0, 1], got 1.5")):
        spread_loss(activations, torch.tensor([0, 1]), 1.5)
    with pytest.raises(TypeError, match="ramp_steps must be an integer, got 7.0"):
        spread_loss_margin(1, 7.0)
    with pytest.raises(ValueError, match="need step >= 0 and ramp_steps >= 1, got step=-1, ramp_steps=7"):
        spread_loss_margin(-1, 7)


def test_model_input_errors() -> None:
    model = MatrixCapsNet(**SMALL)
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 28, 28), got (2, 1, 32, 32)")):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match=r"got dtype torch\.uint8"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input_size must be at least 17 .* got 16"):
        MatrixCapsNet(input_size=16)
    assert MatrixCapsNet(input_size=17, **SMALL)(torch.rand(1, 1, 17, 17)).activations.shape == (1, 10)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        MatrixCapsNet(iterations=0)
    with pytest.raises(ValueError, match=re.escape("lambdas must be 3 positive finite inverse temperatures")):
        MatrixCapsNet(lambdas=[0.1])
    with pytest.raises(ValueError, match="eps must be a number > 0, got -1"):
        ConvMatrixCapsules(2, 2, eps=-1)


def test_layer_input_errors() -> None:
    poses, activations = capsule_grid(2, 5, 3)
    conv = ConvMatrixCapsules(in_types=3, out_types=2, kernel_size=3)
    with pytest.raises(
        ValueError, match=re.escape("ConvMatrixCapsules: poses must have shape (batch, H, W, 4, 4, 4)")
    ):
        ConvMatrixCapsules(in_types=4, out_types=2)(poses, activations)
    with pytest.raises(
        ValueError,
        match=re.escape("ConvMatrixCapsules: activations must have shape (2, 5, 5, 3) to match the poses"),
    ):
        conv(poses, activations[:, :4])
    with pytest.raises(TypeError, match="ClassMatrixCapsules: activations must be a torch.Tensor, got list"):
        ClassMatrixCapsules(3, 10)(poses, [0.5])
    with pytest.raises(ValueError, match="input of size 2 is too small for a 3x3 kernel with stride 1"):
        conv(poses[:, :2, :2], activations[:, :2, :2])


@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward_on_device(device: str) -> None:
    torch.manual_seed(3)
    model = MatrixCapsNet(**SMALL).to(device)
    x = torch.rand(2, 1, 28, 28, device=device)
    out = model(x)
    assert out.activations.device.type == out.poses.device.type == device
    spread_loss(out.activations, torch.tensor([1, 8], device=device), 0.2).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(out.activations.cpu(), model.cpu()(x.cpu()).activations, rtol=1e-4, atol=1e-5)


def test_training_smoke() -> None:
    """A few dozen Adam steps on 256 MNIST digits lower the spread loss (m = 0.2) on those digits."""
    if not os.environ.get("CAPSNET_DATA"):
        pytest.skip("set CAPSNET_DATA to the folder with MNIST to run the training smoke test")
    from capsnet.data import load_dataset

    train = load_dataset("mnist", "train", download=False)
    images, labels = train.images[:256].float() / 255, train.labels[:256]
    torch.manual_seed(0)
    model = MatrixCapsNet(channels=16, primary_types=4, caps1_types=4, caps2_types=4)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = float(spread_loss(model(images).activations, labels, 0.2))
    for _ in range(60):
        batch = torch.randint(0, len(labels), (16,), generator=gen)
        loss = spread_loss(model(images[batch]).activations, labels[batch], 0.2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(spread_loss(model(images).activations, labels, 0.2))
    print(f"spread loss on the 256 training digits: {before:.3f} -> {after:.3f}")
    assert after < 0.8 * before
