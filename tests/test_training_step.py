"""The training step's loss path: no host-device synchronisation (nothing reads a tensor's value
on the host, so a GPU never waits and torch.compile sees no graph break), and empty batches.

A value read on the host (``.item()``, ``int()``, ``float()``, ``bool()``) makes the CPU wait for a
GPU; on the CPU the same call is free, so these tests catch it on the CPU by making those methods
raise while the loss is computed."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest
import torch

import capsnet
from capsnet.data import DeviceBatches
from capsnet.losses import as_target_mask, margin_loss, reconstruction_loss
from capsnet.train import batch_loss, fit

TINY_CAPSNET = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": (32, 64)}
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Every way of reading a tensor's value on the host raises ``AssertionError`` inside."""

    def refuse(name: str):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value on the host")

        return method

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def test_the_guard_catches_host_reads() -> None:
    with no_host_reads():
        for read in (lambda t: t.item(), int, float, bool):
            with pytest.raises(AssertionError, match="read a value on the host"):
                read(torch.tensor(1))


@pytest.mark.parametrize("loss", ["margin", "cross_entropy"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_the_loss_path_reads_nothing_on_the_host(loss: str, train: bool) -> None:
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 9])
    with no_host_reads():
        value, scores = batch_loss(model, x, y, 5e-4, train=train, loss=loss)
        value.backward()
        margin_loss(scores, torch.nn.functional.one_hot(y, 10))  # a mask target, checked too
        reconstruction_loss(torch.rand(4, 784), x)
    assert model.conv1.weight.grad is not None


def test_the_baseline_loss_path_reads_nothing_on_the_host() -> None:
    model = capsnet.BaselineCNN(channels=(4, 4, 4), hidden=(8, 8))
    with no_host_reads():
        batch_loss(model, torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2]), 0.0, train=True)[0].backward()


def _sync_warnings_of_fit(steps: int) -> int:
    """How often a CUDA training run of ``steps`` steps makes the host wait for the GPU, counted by
    ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising call warns)."""
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET).cuda()
    images = torch.randint(
        0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    batches = DeviceBatches(images, torch.arange(48) % 10, 8, "cuda", shuffle=True, max_shift=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(model, batches, epochs=1, max_steps=steps, freeze_conv1_after=0.5, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_training_step_makes_the_host_wait_for_the_gpu() -> None:
    """A run of 6 steps synchronises exactly as often as a run of 2: only at the end of the epoch
    (its loss and accuracy sums, the finiteness check), never per step. Counted after a first run
    that pays the one-time initialisations; in the precision ``auto`` picks on this GPU."""
    _sync_warnings_of_fit(2)
    assert _sync_warnings_of_fit(6) == _sync_warnings_of_fit(2)


def test_bad_labels_are_still_refused_on_the_cpu() -> None:
    """The checks run on the device; on the CPU they fail at once, with the values found."""
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\], got values from 0 to 10"):
        as_target_mask(torch.tensor([0, 10]), 10)


def test_capsnet_on_an_empty_batch_gives_empty_results() -> None:
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET)
    out = model(torch.zeros(0, 1, 28, 28), return_couplings=True)
    assert out.lengths.shape == (0, 10) and out.poses.shape == (0, 10, 16)
    assert out.reconstructions.shape == (0, 1, 28, 28)
    assert out.couplings.shape == (0, model.digit.in_caps, 10)
    loss, scores = batch_loss(model, torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), 5e-4, True)
    assert loss.item() == 0.0 and scores.shape == (0, 10)
