"""Device and precision choices: ``auto`` precision for every kind of hardware (faked where this
machine has none of it), and the fp16 + gradient-scaling training path, run on CPU tensors."""

from __future__ import annotations

import pytest
import torch

import capsnet.hardware as hardware
import capsnet.train as train
from capsnet import CapsNet
from capsnet.data import DeviceBatches
from capsnet.hardware import resolve_precision

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 0), "fp16"),  # P100
        ((7, 0), "fp16"),  # V100
        ((7, 5), "fp16"),  # T4 (Colab's free GPU): bf16 only emulated there
        ((8, 0), "bf16"),  # A100
        ((8, 6), "bf16"),  # RTX 30xx
        ((8, 9), "bf16"),  # L4, RTX 40xx
        ((9, 0), "bf16"),  # H100 / H200
    ],
)
def test_auto_precision_on_cuda_follows_compute_capability(monkeypatch, capability, expected) -> None:
    monkeypatch.setattr(hardware, "_cuda_capability", lambda device: capability)
    # is_bf16_supported() says yes on a T4 (emulation): auto must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_needs_native_bf16(monkeypatch, native_bf16, expected) -> None:
    monkeypatch.setattr(hardware, "_cpu_has_bf16", lambda: native_bf16)
    assert resolve_precision("auto", CPU) == expected


def test_explicit_precisions_are_kept_or_refused() -> None:
    assert resolve_precision("fp32", CUDA) == "fp32"
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp16 autocast is for CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", CPU)


def test_fp16_training_with_gradient_scaling_runs_on_cpu_tensors(monkeypatch, one_thread) -> None:
    """The path a T4 takes (fp16 autocast + GradScaler), exercised through ``fit`` on the CPU,
    where torch's autocast and GradScaler also support float16."""
    monkeypatch.setattr(train, "resolve_precision", lambda precision, device: "fp16")
    torch.manual_seed(0)
    model = CapsNet(conv_channels=8, primary_types=2, decoder_hidden=(16, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    batches = DeviceBatches(images, labels, 16, CPU, shuffle=True, seed=0)
    history = train.fit(model, batches, batches, epochs=2, progress=False)
    assert [m["epoch"] for m in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in history)
    assert all(p.dtype == torch.float32 and p.isfinite().all() for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no optimiser step was taken (every fp16 step skipped by the scaler?)"


def test_describe_counts_threads_in_words(one_thread):
    from capsnet.hardware import describe

    text = describe(torch.device("cpu"))
    assert ", 1 thread of " in text and "1 threads" not in text
