"""Two overlapping digits: the two-hot targets, the loss (margin with both classes present plus
one reconstruction per digit), the both-digits accuracy, and the training loop."""

from __future__ import annotations

import pytest
import torch

import capsnet
from capsnet.data import multi_mnist
from capsnet.losses import margin_loss, reconstruction_loss
from capsnet.multidigit import evaluate_two_digits, fit_two_digits, top_two, two_digit_loss, two_hot

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"input_size": 36, "conv_channels": 16, "primary_types": 4, "decoder_hidden": (32, 64)}


def _pairs(n: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return multi_mnist(digits, torch.arange(40) % 10, n, seed)


def test_two_hot_and_top_two():
    mask = two_hot(torch.tensor([[1, 3], [9, 0]]), 10)
    assert mask.tolist()[0] == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert mask.sum(dim=1).tolist() == [2, 2]
    lengths = torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.7, 0.1, 0.95, 0.3]])
    assert top_two(lengths).tolist() == [[1, 3], [0, 2]]


def test_two_digit_loss_by_hand():
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY)
    data = _pairs(6)
    x, digits = data.images.float() / 255, data.parts.float() / 255
    loss, lengths, recons = two_digit_loss(model, x, data.labels, digits, recon_weight=0.01)
    poses, _ = model.encode(x)
    assert torch.allclose(lengths, poses.norm(dim=-1), atol=1e-6)
    expected = margin_loss(lengths, two_hot(data.labels, 10))
    for k in range(2):
        recon = model.reconstruct(poses, data.labels[:, k])  # only digit k's capsule is kept
        assert torch.allclose(recons[:, k], recon)
        expected = expected + 0.01 * reconstruction_loss(recon, digits[:, k])
    assert torch.allclose(loss, expected)
    with pytest.raises(ValueError, match="needs a CapsNet with a decoder"):
        two_digit_loss(capsnet.CapsNet(**{**TINY, "decoder": False}), x, data.labels, digits)


def test_evaluate_two_digits_matches_a_hand_count():
    torch.manual_seed(1)
    model = capsnet.CapsNet(**TINY)
    data = _pairs(30)
    result = evaluate_two_digits(model, data, batch_size=7)
    with torch.no_grad():
        lengths = model(data.images.float() / 255).lengths
    top = lengths.topk(2, dim=1).indices
    both = found = 0
    for guess, truth in zip(top.tolist(), data.labels.tolist(), strict=True):
        both += set(guess) == set(truth)
        found += len(set(guess) & set(truth))
    assert result["accuracy"] == both / 30
    assert result["digit_accuracy"] == found / 60
    assert result["error"] == pytest.approx(100 * (1 - both / 30))


def test_fit_two_digits_trains():
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY)
    before = [p.detach().clone() for p in model.parameters()]
    history = fit_two_digits(
        model, _pairs(32), _pairs(16, seed=1), epochs=2, batch_size=16, precision="fp32", progress=False
    )
    assert [m["epoch"] for m in history] == [1, 2]
    assert {"train_loss", "test_accuracy", "test_error", "test_digit_accuracy", "seconds"} <= set(history[0])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
