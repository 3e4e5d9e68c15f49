"""Tests of capsnet.layers: PrimaryCapsules grouping and the fully connected RoutingCapsules."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from capsnet import PrimaryCapsules, RoutingCapsules, capsule_length, dynamic_routing_reference, squash
from capsnet.layers import conv_output_size


class FixedOutput(nn.Module):
    """Stands in for a convolution: returns a fixed tensor whatever its input."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out


def labelled_feature_map(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """A conv output whose every value names its example, channel and position (all distinct, > 0)."""
    n, c, y, x = torch.meshgrid(
        torch.arange(batch), torch.arange(channels), torch.arange(height), torch.arange(width), indexing="ij"
    )
    return (1 + n * 1_000_000 + c * 10_000 + y * 100 + x).double()


def test_primary_capsules_group_channels_at_one_position() -> None:
    types, dim, batch, height, width = 3, 4, 2, 5, 6
    layer = PrimaryCapsules(in_channels=1, capsule_types=types, capsule_dim=dim, kernel_size=1, stride=1)
    feature_map = labelled_feature_map(batch, types * dim, height, width)
    layer.conv = FixedOutput(feature_map)
    out = layer(torch.zeros(batch, 1, height, width))
    assert out.shape == (batch, types * height * width, dim)
    # Capsule (type t, row y, column x) is channels t*dim ... t*dim + dim - 1 at that one position,
    # ordered by type, then row, then column. view(batch, -1, dim) on the NCHW output would instead
    # take `dim` neighbouring pixels of a single channel.
    expected = torch.empty(batch, types * height * width, dim, dtype=torch.float64)
    for n in range(batch):
        for t in range(types):
            for y in range(height):
                for x in range(width):
                    channels = feature_map[n, t * dim : (t + 1) * dim, y, x]
                    expected[n, (t * height + y) * width + x] = squash(channels)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    wrong = squash(feature_map.view(batch, -1, dim))
    assert not torch.allclose(out, wrong)


def test_primary_capsules_grouping_with_constant_channels() -> None:
    # Zero weights and bias = channel index: every capsule of type t must be squash(t*8 ... t*8+7).
    layer = PrimaryCapsules(in_channels=2, capsule_types=4, capsule_dim=8, kernel_size=3, stride=2)
    with torch.no_grad():
        layer.conv.weight.zero_()
        layer.conv.bias.copy_(torch.arange(32, dtype=torch.float32))
    out = layer(torch.randn(2, 2, 9, 9))
    side = conv_output_size(9, 3, 2)
    assert out.shape == (2, 4 * side * side, 8)
    per_type = squash(torch.arange(32, dtype=torch.float32).view(4, 8))
    expected = per_type.repeat_interleave(side * side, dim=0).expand(2, -1, -1)
    torch.testing.assert_close(out, expected)


def test_primary_capsules_paper_shapes() -> None:
    torch.manual_seed(0)
    layer = PrimaryCapsules()
    assert layer.num_capsules(20) == 1152
    out = layer(torch.relu(torch.randn(2, 256, 20, 20)))
    assert out.shape == (2, 1152, 8)
    assert (capsule_length(out) < 1).all()


def test_conv_output_size() -> None:
    assert conv_output_size(28, 9) == 20
    assert conv_output_size(20, 9, 2) == 6
    assert conv_output_size(36, 9) == 28 and conv_output_size(28, 9, 2) == 10
    with pytest.raises(ValueError, match=r"input of size 8 is too small for a 9x9 kernel with stride 1"):
        conv_output_size(8, 9)


def small_routing_layer(**kwargs: object) -> RoutingCapsules:
    torch.manual_seed(1)
    return RoutingCapsules(in_caps=5, in_dim=3, out_caps=4, out_dim=6, init_std=1.0, **kwargs).double()


def test_predictions_equal_explicit_matrix_products() -> None:
    layer = small_routing_layer()
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (2, 5, 4, 6)
    for n in range(2):
        for i in range(5):
            for j in range(4):
                torch.testing.assert_close(u_hat[n, i, j], layer.weight[i, j] @ u[n, i])


def test_forward_routes_the_predictions() -> None:
    layer = small_routing_layer(iterations=2)
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    v, c = layer(u)
    v_ref, c_ref = dynamic_routing_reference(layer.predictions(u), 2, gradient="last")
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(c, c_ref)


def test_paper_parameter_count() -> None:
    layer = RoutingCapsules()
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert layer.weight.shape == (1152, 10, 16, 8)
    assert sum(p.numel() for p in layer.parameters()) == 1152 * 10 * 16 * 8 == 1_474_560


def test_weight_is_shared_across_the_batch() -> None:
    layer = small_routing_layer()
    shape_before = tuple(layer.weight.shape)
    u = torch.randn(3, 5, 3, dtype=torch.float64)
    v3, c3 = layer(u)
    for n in range(3):
        v1, c1 = layer(u[n : n + 1])
        torch.testing.assert_close(v3[n : n + 1], v1)
        torch.testing.assert_close(c3[n : n + 1], c1)
    # No per-example copy: the parameter has no batch axis and is unchanged by forward passes.
    assert tuple(layer.weight.shape) == shape_before == (5, 4, 6, 3)


@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 6, 3), (5, 3), (1, 2, 5, 3)], ids=str)
def test_wrong_input_shapes_raise(shape: tuple[int, ...]) -> None:
    layer = small_routing_layer()
    with pytest.raises(ValueError, match=re.escape(f"shape (batch, 5, 3), got {shape}")):
        layer(torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize("iterations", [0, 2.0, False])
def test_bad_iterations_raise(iterations: object) -> None:
    with pytest.raises(ValueError, match=rf"iterations must be an integer >= 1, got {iterations!r}"):
        RoutingCapsules(in_caps=2, iterations=iterations)  # type: ignore[arg-type]


def test_primary_capsules_without_squash():
    torch.manual_seed(0)
    squashed = PrimaryCapsules(8, 2, 4, 3, 2)
    raw = PrimaryCapsules(8, 2, 4, 3, 2, squashed=False)
    raw.load_state_dict(squashed.state_dict())
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(squash(raw(x)), squashed(x))
    assert (capsule_length(raw(x)) > 1).any()
