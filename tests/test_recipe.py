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


def test_fit_follows_the_one_cycle_schedule_over_its_step_budget() -> None:
    torch.manual_seed(0)
    model = CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(16, 32))
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
