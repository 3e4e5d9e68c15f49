"""Tests of capsnet.losses: the margin loss (Eq. 4), the reconstruction loss and target masks."""

from __future__ import annotations

import pytest
import torch

from capsnet import margin_loss, reconstruction_loss, spread_loss
from capsnet.losses import as_target_mask

# L_k = T_k max(0, 0.9 - |v_k|)^2 + 0.5 (1 - T_k) max(0, |v_k| - 0.1)^2, summed over k.
#
# Example A, label 0, lengths (0.95, 0.05, 0.30):
#   k=0 present: 0.95 > 0.9, so max(0, -0.05)^2 = 0
#   k=1 absent:  0.05 < 0.1, so 0
#   k=2 absent:  0.5 * (0.30 - 0.10)^2 = 0.5 * 0.04 = 0.02         -> L = 0.02
# Example B, label 1, lengths (0.50, 0.60, 0.10):
#   k=1 present: (0.9 - 0.6)^2 = 0.09
#   k=0 absent:  0.5 * (0.5 - 0.1)^2 = 0.5 * 0.16 = 0.08
#   k=2 absent:  exactly at the margin, 0                            -> L = 0.17
# Batch (A, B): mean of 0.02 and 0.17 = 0.095.
# Example C, two objects (MultiMNIST), mask (1, 1, 0), lengths (0.8, 1.0, 0.2):
#   k=0: (0.9 - 0.8)^2 = 0.01; k=1: 0; k=2: 0.5 * (0.2 - 0.1)^2 = 0.005   -> L = 0.015
# Example B with m+ = 0.8, m- = 0.2, lambda = 1:
#   (0.8 - 0.6)^2 + (0.5 - 0.2)^2 + 0 = 0.04 + 0.09 = 0.13
LENGTHS_A = [0.95, 0.05, 0.30]
LENGTHS_B = [0.50, 0.60, 0.10]


def lengths(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_margin_loss_hand_computed_single_examples() -> None:
    assert float(margin_loss(lengths(LENGTHS_A), torch.tensor([0]))) == pytest.approx(0.02, abs=1e-12)
    assert float(margin_loss(lengths(LENGTHS_B), torch.tensor([1]))) == pytest.approx(0.17, abs=1e-12)


def test_margin_loss_is_averaged_over_the_batch() -> None:
    loss = margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(0.095, abs=1e-12)


def test_margin_loss_with_several_objects_per_image() -> None:
    mask = torch.tensor([[1, 1, 0]])
    assert float(margin_loss(lengths([0.8, 1.0, 0.2]), mask)) == pytest.approx(0.015, abs=1e-12)


def test_margin_loss_custom_margins() -> None:
    loss = margin_loss(lengths(LENGTHS_B), torch.tensor([1]), m_pos=0.8, m_neg=0.2, lam=1.0)
    assert float(loss) == pytest.approx(0.13, abs=1e-12)


def test_margin_loss_is_zero_when_all_margins_are_met() -> None:
    loss = margin_loss(lengths([0.05, 0.92, 0.1], [0.99, 0.0, 0.02]), torch.tensor([1, 0]))
    assert float(loss) == 0.0


def test_index_and_mask_targets_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    caps_lengths = torch.rand(6, 10, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,), generator=gen)
    by_index = margin_loss(caps_lengths, labels)
    one_hot = torch.nn.functional.one_hot(labels, 10)
    for mask in (one_hot, one_hot.float(), one_hot.bool()):
        torch.testing.assert_close(margin_loss(caps_lengths, mask), by_index)
    torch.testing.assert_close(as_target_mask(labels, 10), one_hot.float())


def test_margin_loss_gradient_pushes_lengths_across_the_margins() -> None:
    caps_lengths = lengths(LENGTHS_B).requires_grad_(True)
    margin_loss(caps_lengths, torch.tensor([1])).backward()
    # d/d|v_1| of (0.9 - |v_1|)^2 = -2 * 0.3; d/d|v_0| of 0.5 (|v_0| - 0.1)^2 = 0.4; |v_2| at the margin: 0.
    torch.testing.assert_close(caps_lengths.grad, lengths([0.4, -0.6, 0.0]))


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]], ids=str)
def test_labels_out_of_range_raise(labels: list[int]) -> None:
    lo, hi = min(labels), max(labels)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, 2\], got values from {lo} to {hi}"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor(labels))


def test_float_or_bool_labels_raise() -> None:
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.float32"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch\.bool"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor([True, False]))
    with pytest.raises(TypeError, match=r"torch\.Tensor, got list"):
        margin_loss(lengths(LENGTHS_A), [0])  # type: ignore[arg-type]


def test_wrong_batch_size_raises() -> None:
    with pytest.raises(ValueError, match=r"target has 3 examples but lengths has 2"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"target has 1 examples but lengths has 2"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.tensor([[1, 0, 0]]))


def test_wrong_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"mask of shape \(batch, 3\), got shape \(2, 4\)"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"lengths must have shape \(batch, num_classes\), got \(3,\)"):
        margin_loss(torch.tensor(LENGTHS_A), torch.tensor([0]))


def test_reconstruction_loss_is_summed_per_image_and_averaged_over_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(3, 1, 28, 28, generator=gen)
    recon = torch.rand(3, 784, generator=gen)
    per_image = [float(((recon[n] - images[n].flatten()) ** 2).sum()) for n in range(3)]
    expected = sum(per_image) / 3
    assert float(reconstruction_loss(recon, images)) == pytest.approx(expected, rel=1e-6)
    # The decoder's image-shaped output gives the same value.
    assert float(reconstruction_loss(recon.view(3, 1, 28, 28), images)) == pytest.approx(expected, rel=1e-6)
    assert float(reconstruction_loss(images.flatten(1), images)) == 0.0


def test_scaled_reconstruction_loss_equals_0392_mse() -> None:
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(4, 1, 28, 28, generator=gen, dtype=torch.float64)
    recon = torch.rand(4, 784, generator=gen, dtype=torch.float64)
    mse = torch.nn.functional.mse_loss(recon, images.flatten(1))
    torch.testing.assert_close(0.0005 * reconstruction_loss(recon, images), 0.392 * mse)


def test_reconstruction_loss_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match=r"reconstructions have \(2, 784\).*images have \(2, 1296\)"):
        reconstruction_loss(torch.zeros(2, 784), torch.zeros(2, 1, 36, 36))


@pytest.mark.parametrize("bad", [2.0, 0.5, -1.0])
def test_masks_with_values_other_than_0_and_1_raise(bad: float) -> None:
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, bad, 1.0]])
    with pytest.raises(ValueError, match=rf"mask must hold only 0 and 1, got {bad}"):
        margin_loss(lengths(LENGTHS_A, LENGTHS_B), mask)
    with pytest.raises(ValueError, match="only 0 and 1, got 3"):
        as_target_mask(torch.tensor([[0, 3, 0]]), 3)


def test_losses_of_an_empty_batch_are_zero_not_nan() -> None:
    empty_lengths = torch.zeros(0, 3, requires_grad=True)
    loss = margin_loss(empty_lengths, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert empty_lengths.grad.shape == (0, 3)
    assert margin_loss(empty_lengths, torch.zeros(0, 3)).item() == 0.0
    assert reconstruction_loss(torch.zeros(0, 784), torch.zeros(0, 1, 28, 28)).item() == 0.0
    assert spread_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0.2).item() == 0.0
