"""The fast recipe's pieces: the one-cycle learning-rate schedule, the validation split held out
of the training images, and ``--recipe`` on the command line."""

from __future__ import annotations

import math

import pytest
import torch

from capsnet import CapsNet
from capsnet.cli import _given, build_parser
from capsnet.data import DataError, DeviceBatches, locate_file
from capsnet.hardware import cpu_isa, describe
from capsnet.train import RECIPES, ConfigError, TrainConfig, _digits, _one_cycle, fit, make_more_tests

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_cycle_warms_up_then_decays_to_zero() -> None:
    factor = _one_cycle(100)
    values = [factor(step) for step in range(101)]
    assert values[0] == pytest.approx(0.04)
    assert values[15] == pytest.approx(1.0)  # the peak after 15% of the budget
    assert all(a < b for a, b in zip(values[:15], values[1:16], strict=True))  # rising
    assert all(a >= b for a, b in zip(values[15:-1], values[16:], strict=True))  # then falling
    assert values[100] == pytest.approx(0.0, abs=1e-12)
    assert values[57] == pytest.approx(0.5 * (1 + math.cos(math.pi * 42 / 85)))


def _tiny_capsnet() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(16, 32))


def test_fit_follows_the_one_cycle_schedule_over_its_step_budget() -> None:
    model = _tiny_capsnet()
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8)
    batches = DeviceBatches(images, torch.arange(48) % 10, 8, shuffle=True, seed=0)
    history = fit(model, batches, epochs=3, max_steps=10, lr=2e-3, lr_schedule="onecycle", progress=False)
    factor = _one_cycle(10)
    assert [m["step"] for m in history] == [6, 10]
    assert [m["lr"] for m in history] == pytest.approx([2e-3 * factor(6), 0.0], abs=1e-15)
    assert all(m["train_seconds"] > 0 for m in history)
    with pytest.raises(ValueError, match="lr_schedule must be one of paper, onecycle"):
        fit(model, batches, epochs=1, lr_schedule="triangle", progress=False)


@pytest.fixture
def mnist_available() -> None:
    try:
        locate_file("mnist", "train-labels-idx1-ubyte", download=False)
    except DataError:
        pytest.skip("MNIST is not available offline (set CAPSNET_DATA)")


def test_validation_images_are_held_out_and_the_same_for_every_run(mnist_available) -> None:
    config = TrainConfig(profile="smoke", val_size=500, train_size=0).resolved()
    val_images, val_labels = _digits(config, "val", None)
    train_images, _ = _digits(config, "train", None)
    assert len(val_labels) == 500 and len(train_images) == 60_000 - 500
    # no validation image is also a training image (compared as whole images)
    train_set = {bytes(image.numpy()) for image in train_images}
    assert not any(bytes(image.numpy()) in train_set for image in val_images)
    other_seed = TrainConfig(profile="smoke", val_size=500, seed=7).resolved()
    torch.testing.assert_close(_digits(other_seed, "val", None)[0], val_images, rtol=0, atol=0)
    small = TrainConfig(profile="smoke", val_size=500, train_size=1000).resolved()
    assert len(_digits(small, "train", None)[1]) == 1000
    assert set(make_more_tests(config, torch.device("cpu"))) == {"val"}
    assert make_more_tests(TrainConfig(profile="smoke").resolved(), torch.device("cpu")) == {}


def test_schedule_and_validation_size_are_checked() -> None:
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="cyclic").resolved()
    with pytest.raises(ConfigError, match="val_size"):
        TrainConfig(val_size=-1).resolved()


def test_a_recipe_sets_options_and_options_given_beside_it_win() -> None:
    parser = build_parser()
    given = _given(parser.parse_args(["train", "--recipe", "fast", "--steps", "7"]))
    assert given == {**RECIPES["fast"], "steps": 7}
    assert given["lr_schedule"] == "onecycle" and given["val_size"] > 0 and given["test_size"] == 0
    assert _given(parser.parse_args(["train", "--lr", "0.002"])) == {"lr": 0.002}
    TrainConfig(**RECIPES["fast"]).resolved()  # a valid configuration


def test_the_hardware_line_names_the_vector_instructions_in_use() -> None:
    assert cpu_isa() in describe(torch.device("cpu"))


def _trained(epochs: int, **kwargs) -> CapsNet:
    """A tiny CapsNet trained on 3 batches per epoch with the paper's schedule (which does not
    depend on the budget, so runs of different lengths share their first steps)."""
    model = _tiny_capsnet()
    images = torch.randint(
        0, 256, (24, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    batches = DeviceBatches(images, torch.arange(24) % 10, 8, shuffle=True, seed=0)
    fit(model, batches, epochs=epochs, lr=1e-2, precision="fp32", progress=False, **kwargs)
    return model


def test_conv1_frozen_after_half_the_budget_keeps_the_weights_it_had_then() -> None:
    half = _trained(1)  # 3 steps
    frozen = _trained(2, freeze_conv1_after=0.5)  # frozen from step 3 of 6
    whole = _trained(2)
    torch.testing.assert_close(frozen.conv1.weight, half.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(frozen.conv1.bias, half.conv1.bias, rtol=0, atol=0)
    assert not torch.equal(frozen.conv1.weight, whole.conv1.weight)
    assert not torch.equal(frozen.primary.conv.weight, half.primary.conv.weight)  # the rest trained on
    assert frozen.conv1.weight.grad is None  # the last steps computed no gradient for it
    assert all(p.requires_grad for p in frozen.parameters())  # trainable again afterwards


def test_conv1_frozen_from_the_start_keeps_its_initial_weights() -> None:
    never = _trained(1, freeze_conv1_after=0.0)
    torch.testing.assert_close(never.conv1.weight, _tiny_capsnet().conv1.weight, rtol=0, atol=0)


def test_a_resumed_run_keeps_conv1_frozen(tmp_path) -> None:
    """4 steps frozen after 1, resumed to 6: Conv1 still holds what one step made of it."""
    one_step = _trained(1, max_steps=1)
    _trained(2, max_steps=4, freeze_conv1_after=0.25, out_dir=tmp_path)
    resumed = _trained(2, max_steps=6, freeze_conv1_after=0.25, out_dir=tmp_path, resume=True)
    torch.testing.assert_close(resumed.conv1.weight, one_step.conv1.weight, rtol=0, atol=0)


def test_freezing_conv1_is_checked() -> None:
    with pytest.raises(ValueError, match=r"freeze_conv1_after must lie in \[0, 1\], got 1.5"):
        _trained(1, freeze_conv1_after=1.5)
    with pytest.raises(ValueError, match="needs a model with a conv1 layer"):
        fit(
            torch.nn.Linear(2, 2),
            DeviceBatches(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 2),
            epochs=1,
            freeze_conv1_after=0.5,
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"freeze_conv1_after \(--freeze-conv1-after\) is a fraction"):
        TrainConfig(freeze_conv1_after=2.0).resolved()
    with pytest.raises(ConfigError, match="--model baseline has none"):
        TrainConfig(model="baseline", freeze_conv1_after=0.5).resolved()
    TrainConfig(freeze_conv1_after=0.3).resolved()  # a valid configuration
