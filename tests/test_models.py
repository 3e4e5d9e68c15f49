"""Tests of capsnet.models: CapsNet (shapes, sizes, decoder masking, gradients, errors) and BaselineCNN."""

from __future__ import annotations

import re

import pytest
import torch

from capsnet import BaselineCNN, CapsNet, dynamic_routing, margin_loss, reconstruction_loss
from capsnet.models import build_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(batch: int, size: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def small_capsnet(**kwargs: object) -> CapsNet:
    """A few-thousand-parameter CapsNet on 16x16 images: 12x12 conv map, 2 x 4 x 4 = 32 primary capsules.

    Its primary and class weights are scaled up so that, untrained, the class capsules have lengths
    of about 0.02-0.5 and differ between images (with the default init they are about 1e-7).
    """
    torch.manual_seed(0)
    options: dict[str, object] = dict(
        input_size=16, conv_channels=8, primary_types=2, primary_dim=4, class_dim=6, kernel_size=5
    )
    options["decoder_hidden"] = (16,)
    options.update(kwargs)
    model = CapsNet(**options)  # type: ignore[arg-type]
    with torch.no_grad():
        model.primary.conv.weight.mul_(3.0)
        model.digit.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def paper_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet()


def test_paper_model_outputs(paper_model: CapsNet) -> None:
    out = paper_model(images(2), torch.tensor([3, 7]), return_couplings=True)
    assert out.lengths.shape == (2, 10)
    assert out.poses.shape == (2, 10, 16)
    assert out.reconstructions.shape == (2, 1, 28, 28)
    assert out.couplings.shape == (2, 1152, 10)
    torch.testing.assert_close(out.couplings.sum(dim=2), torch.ones(2, 1152))
    assert ((out.lengths >= 0) & (out.lengths < 1)).all()
    torch.testing.assert_close(out.lengths, out.poses.norm(dim=-1))
    assert ((out.reconstructions > 0) & (out.reconstructions < 1)).all()
    assert paper_model(images(2)).couplings is None


@pytest.mark.parametrize(
    ("kwargs", "count"),
    [({}, 8_215_568), ({"decoder": False}, 6_804_224), ({"input_size": 36}, 11_361_808)],
    ids=["default", "no-decoder", "multimnist-36"],
)
def test_paper_parameter_counts(kwargs: dict[str, object], count: int) -> None:
    assert n_params(CapsNet(**kwargs)) == count  # type: ignore[arg-type]


def test_parameter_count_formula() -> None:
    # conv1 + primary conv + W_ij + decoder, written out for the 28x28 model.
    conv1 = 256 * 81 + 256
    primary = 256 * 256 * 81 + 256
    digit = 1152 * 10 * 16 * 8
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert conv1 + primary + digit + decoder == 8_215_568
    assert conv1 + primary + digit == 6_804_224


def test_paper_model_without_decoder() -> None:
    torch.manual_seed(0)
    model = CapsNet(decoder=False)
    assert model.decoder is None
    out = model(images(2), torch.tensor([0, 1]))
    assert out.reconstructions is None and out.lengths.shape == (2, 10)
    with pytest.raises(RuntimeError, match="decoder=False"):
        model.reconstruct(out.poses, torch.tensor([0, 1]))


@pytest.mark.parametrize(("size", "primary_caps"), [(36, 32 * 10 * 10), (40, 32 * 12 * 12)])
def test_larger_inputs(size: int, primary_caps: int) -> None:
    torch.manual_seed(0)
    model = CapsNet(input_size=size)
    assert model.digit.in_caps == primary_caps
    out = model(images(2, size), return_couplings=True)
    assert out.reconstructions.shape == (2, 1, size, size)
    assert out.couplings.shape == (2, primary_caps, 10)
    assert out.lengths.shape == (2, 10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"classes": 5},
        {"primary_dim": 6, "class_dim": 3},
        {"primary_types": 3, "class_dim": 12},
        {"in_channels": 3},
        {"routing_iterations": 1},
        {"routing_iterations": 2},
        {"routing_iterations": 4},
        {"routing_iterations": 5, "routing_gradient": "all"},
        {"coupling": "uniform"},
        {"coupling": "random"},
    ],
    ids=str,
)
def test_output_shapes_of_variants(kwargs: dict[str, object]) -> None:
    model = small_capsnet(**kwargs)
    classes, channels = model.classes, model.in_channels
    primary_caps = model.primary.capsule_types * 4 * 4
    class_dim = model.digit.out_dim
    x = images(3, 16, channels)
    out = model(x, torch.arange(3) % classes, return_couplings=True)
    assert out.lengths.shape == (3, classes)
    assert out.poses.shape == (3, classes, class_dim)
    assert out.reconstructions.shape == (3, channels, 16, 16)
    assert out.couplings.shape == (3, primary_caps, classes)
    torch.testing.assert_close(out.couplings.sum(dim=2), torch.ones(3, primary_caps))


def test_routing_iterations_and_coupling_reach_the_routing() -> None:
    x = images(2, 16)
    uniform = small_capsnet(coupling="uniform")(x, return_couplings=True).couplings
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 10))
    one = small_capsnet(routing_iterations=1)(x, return_couplings=True).couplings
    torch.testing.assert_close(one, uniform)
    three = small_capsnet(routing_iterations=3)
    u = three.primary(torch.relu(three.conv1(x)))
    _, expected = dynamic_routing(three.digit.predictions(u), 3)
    torch.testing.assert_close(three(x, return_couplings=True).couplings, expected)
    model = small_capsnet(coupling="random")
    first = model(x, return_couplings=True, generator=torch.Generator().manual_seed(1))
    again = model(x, return_couplings=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first.couplings, again.couplings, rtol=0, atol=0)
    assert not torch.allclose(first.couplings, uniform)


def test_decoder_is_masked_by_true_label_in_training() -> None:
    model = small_capsnet()
    x = images(4, 16)
    out = model(x)
    predicted = out.lengths.argmax(dim=1)
    labels = (predicted + 1) % 10  # differs from the prediction for every image
    trained = model(x, labels)
    torch.testing.assert_close(trained.reconstructions, model.reconstruct(trained.poses, labels))
    assert not torch.allclose(trained.reconstructions, model.reconstruct(trained.poses, predicted))
    # A 0/1 mask target does the same as indices.
    mask = torch.nn.functional.one_hot(labels, 10)
    torch.testing.assert_close(model(x, mask).reconstructions, trained.reconstructions)


def test_decoder_uses_longest_capsule_without_target() -> None:
    model = small_capsnet()
    x = images(4, 16)
    out = model(x)
    predicted = out.lengths.argmax(dim=1)
    torch.testing.assert_close(out.reconstructions, model.reconstruct(out.poses, predicted))
    other = (predicted + 1) % 10
    assert not torch.allclose(out.reconstructions, model.reconstruct(out.poses, other))


def test_decoder_sees_only_the_selected_capsule() -> None:
    model = small_capsnet()
    poses = torch.randn(2, 10, 6)
    labels = torch.tensor([2, 5])
    recon = model.reconstruct(poses, labels)
    others = poses.clone()
    keep = torch.nn.functional.one_hot(labels, 10).bool()
    others[~keep] = torch.randn(int((~keep).sum()), 6)
    torch.testing.assert_close(model.reconstruct(others, labels), recon)
    changed = poses.clone()
    changed[keep] += 1.0
    assert not torch.allclose(model.reconstruct(changed, labels), recon)


def test_every_parameter_gets_a_gradient(paper_model: CapsNet) -> None:
    paper_model.zero_grad()
    x = images(2, seed=3)
    labels = torch.tensor([4, 9])
    out = paper_model(x, labels)
    loss = margin_loss(out.lengths, labels) + 0.0005 * reconstruction_loss(out.reconstructions, x)
    loss.backward()
    for name, p in paper_model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    paper_model.zero_grad()


def test_capsnet_input_errors() -> None:
    model = small_capsnet()
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 16, 16), got (2, 1, 28, 28)")):
        model(images(2, 28))
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 16, 16), got (2, 3, 16, 16)")):
        model(images(2, 16, channels=3))
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 16, 16), got (1, 16, 16)")):
        model(images(1, 16)[0])
    with pytest.raises(TypeError, match=r"floating point in \[0, 1\], got dtype torch\.uint8"):
        model((images(2, 16) * 255).to(torch.uint8))
    with pytest.raises(TypeError, match=r"floating point in \[0, 1\], got dtype torch\.int64"):
        model(torch.zeros(2, 1, 16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor, got ndarray"):
        model(images(2, 16).numpy())


def test_capsnet_label_errors() -> None:
    model = small_capsnet()
    x = images(2, 16)
    with pytest.raises(ValueError, match="got 3 labels for a batch of 2 images"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=re.escape("labels must lie in [0, 9], got values from 0 to 10")):
        model(x, torch.tensor([0, 10]))
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.float32"):
        model(x, torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("iterations", [0, -2, 1.5])
def test_capsnet_iteration_errors(iterations: object) -> None:
    with pytest.raises(ValueError, match=rf"iterations must be an integer >= 1, got {iterations!r}"):
        small_capsnet(routing_iterations=iterations)


def test_capsnet_input_too_small() -> None:
    with pytest.raises(ValueError, match="input of size 8 is too small for a 9x9 kernel"):
        CapsNet(input_size=8)


def test_baseline_parameter_count() -> None:
    assert n_params(BaselineCNN()) == 35_445_522


@pytest.mark.parametrize(("size", "channels", "classes"), [(28, 1, 10), (36, 1, 10), (16, 3, 5)])
def test_baseline_logits(size: int, channels: int, classes: int) -> None:
    torch.manual_seed(0)
    model = BaselineCNN(size, channels, classes, channels=(8, 8, 4), hidden=(16, 12)).eval()
    logits = model(images(3, size, channels))
    assert logits.shape == (3, classes)
    assert torch.isfinite(logits).all()


def test_baseline_errors() -> None:
    model = BaselineCNN(channels=(8, 8, 4), hidden=(16, 12))
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 28, 28), got (2, 1, 32, 32)")):
        model(images(2, 32))
    with pytest.raises(ValueError, match=re.escape("shape (batch, 1, 28, 28), got (2, 3, 28, 28)")):
        model(images(2, 28, channels=3))
    with pytest.raises(TypeError, match=r"got dtype torch\.uint8"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward_and_routing_on_device(device: str) -> None:
    model = small_capsnet().to(device)
    x = images(2, 16).to(device)
    labels = torch.tensor([1, 8], device=device)
    out = model(x, labels, return_couplings=True)
    assert out.lengths.device.type == out.reconstructions.device.type == out.couplings.device.type == device
    loss = margin_loss(out.lengths, labels) + 0.0005 * reconstruction_loss(out.reconstructions, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The same numbers as on the CPU.
    cpu_out = model.cpu()(x.cpu(), labels.cpu())
    torch.testing.assert_close(out.lengths.cpu(), cpu_out.lengths, rtol=1e-4, atol=1e-5)
    # Routing alone, in every coupling mode, with a CPU generator for the random one.
    u_hat = torch.randn(2, 6, 3, 4, device=device)
    for coupling in ("dynamic", "uniform", "random"):
        v, c = dynamic_routing(u_hat, 3, coupling=coupling, generator=torch.Generator().manual_seed(0))
        assert v.device.type == c.device.type == device
        torch.testing.assert_close(c.sum(dim=2), torch.ones(2, 6, device=device))


def test_small_cnn_is_about_as_large_as_capsnet():
    model = build_model("cnn-small")
    assert sum(p.numel() for p in model.parameters()) == 8_397_618
    assert build_model("cnn-small", input_size=40)(torch.rand(2, 1, 40, 40)).shape == (2, 10)


def test_the_flop_matched_cnn_matches_capsnet_in_compute_and_size():
    from capsnet.bench import flops_per_image, layer_multiply_adds

    model, capsnet = build_model("cnn-flops"), CapsNet()
    macs = layer_multiply_adds(model, 28)  # a training step: about 3 passes, 2 for the first layer
    training = 2 * (2 * macs[0] + 3 * sum(macs[1:]))
    assert 0.95 < training / flops_per_image(capsnet)["training"] < 1.05
    size = sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in capsnet.parameters())
    assert 0.95 < size < 1.05
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_capsnet_without_squash_is_built_and_runs():
    torch.manual_seed(0)
    model = CapsNet(squashed=False, conv_channels=16, primary_types=4, decoder=False)
    assert not model.primary.squashed and not model.digit.squashed
    assert model(torch.rand(2, 1, 28, 28)).lengths.shape == (2, 10)
