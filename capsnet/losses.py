"""Losses of Sabour et al. 2017: the margin loss (Eq. 4) and the reconstruction loss; and the spread
loss of Hinton, Sabour & Frosst 2018 (matrix capsules)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["margin_loss", "reconstruction_loss", "as_target_mask", "spread_loss", "spread_loss_margin"]


def _require(condition: torch.Tensor, message: str, details: Callable[[], str]) -> None:
    """Raise ``ValueError(message, details())`` unless the 0-d bool tensor ``condition`` holds,
    without waiting for the device (no ``.item()``, ``int()`` or ``bool()`` on a tensor).

    On the CPU the check is immediate and ``details()`` (which may read tensors: only on failure)
    completes the message. On an accelerator it is a device-side assertion: the training step
    goes on at full speed, and the next call that waits for the device reports ``message``.
    """
    try:
        torch._assert_async(condition, message)
    except RuntimeError as err:  # raised at once where the check runs on the host
        raise ValueError(f"{message}, {details()}") from err


def as_target_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Turn labels into a ``(batch, num_classes)`` 0/1 float mask ``T_k``.

    ``target`` is either class indices of shape ``(batch,)`` or, for inputs with several objects
    (MultiMNIST), a 0/1 mask of shape ``(batch, num_classes)`` already. Labels outside
    ``[0, num_classes)`` and masks holding other values than 0 and 1 are refused (see
    :func:`_require`: checked without a host-device synchronisation).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dim() == 1:
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"class indices must be an integer tensor, got dtype {target.dtype}")
        _require(
            ((target >= 0) & (target < num_classes)).all(),
            f"labels must lie in [0, {num_classes - 1}]",
            lambda: f"got values from {int(target.min())} to {int(target.max())}",
        )
        return torch.nn.functional.one_hot(target.long(), num_classes).float()
    if target.dim() == 2 and target.shape[1] == num_classes:
        if target.dtype != torch.bool:
            _require(
                ((target == 0) | (target == 1)).all(),
                "a target mask must hold only 0 and 1",
                lambda: f"got {target[(target != 0) & (target != 1)][0].item()!r}",
            )
        return target.float()
    raise ValueError(
        f"target must be class indices of shape (batch,) or a mask of shape (batch, {num_classes}), "
        f"got shape {tuple(target.shape)}"
    )


def _batch_mean(per_example: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of ``(batch,)`` per-example losses; 0 for an empty batch (where a
    plain mean is NaN), still connected to the graph."""
    return per_example.mean() if per_example.shape[0] else per_example.sum()


def margin_loss(
    lengths: torch.Tensor,
    target: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Margin loss, Eq. 4, summed over classes and averaged over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2``

    Args:
        lengths: capsule lengths ``|v_k|``, shape ``(batch, num_classes)``.
        target: class indices ``(batch,)``, or a 0/1 mask ``(batch, num_classes)`` when an image
            holds several classes.
        m_pos, m_neg: the margins: a present class should have length above ``m_pos``, an
            absent one below ``m_neg``.
        lam: down-weights the absent classes so that early in training the lengths of all
            capsules are not pushed towards zero together.

    Returns:
        A scalar tensor (0 for an empty batch).
    """
    if lengths.dim() != 2:
        raise ValueError(f"lengths must have shape (batch, num_classes), got {tuple(lengths.shape)}")
    t = as_target_mask(target, lengths.shape[1]).to(lengths.dtype)
    if t.shape[0] != lengths.shape[0]:
        raise ValueError(f"target has {t.shape[0]} examples but lengths has {lengths.shape[0]}")
    present = t * (m_pos - lengths).clamp_min(0).square()
    absent = lam * (1.0 - t) * (lengths - m_neg).clamp_min(0).square()
    return _batch_mean((present + absent).sum(dim=1))


def reconstruction_loss(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, averaged over the batch.

    The paper scales this by 0.0005 so it does not dominate the margin loss: with 784 pixels
    that equals ``0.392 x`` the mean squared error per pixel.

    Args:
        reconstructions: decoder output, shape ``(batch, pixels)`` or the images' shape.
        images: the inputs, shape ``(batch, channels, height, width)``.

    Returns:
        A scalar tensor (0 for an empty batch).
    """
    flat_images, flat_recon = images.flatten(1), reconstructions.flatten(1)
    if flat_images.shape != flat_recon.shape:
        raise ValueError(
            f"reconstructions have {tuple(flat_recon.shape)} values per batch but images have "
            f"{tuple(flat_images.shape)}"
        )
    return _batch_mean((flat_recon - flat_images.to(flat_recon.dtype)).square().sum(dim=1))


def spread_loss(activations: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Spread loss of Hinton, Sabour & Frosst 2018 (Sec. 3.1), summed over classes, mean over the batch.

    ``L = sum_{i != t} max(0, m - (a_t - a_i))^2``: every wrong class ``i`` whose activation comes
    within ``m`` of the target's ``a_t`` is penalised by the squared shortfall. The paper starts
    with ``m = 0.2`` and raises it to 0.9 during training (:func:`spread_loss_margin`), which
    keeps capsules in the early layers from dying.

    Args:
        activations: class capsule activations ``a``, shape ``(batch, num_classes)``.
        target: class indices ``t``, shape ``(batch,)``, one class per example.
        margin: ``m``, a number in ``[0, 1]``.

    Returns:
        A scalar tensor (0 for an empty batch).
    """
    if not isinstance(activations, torch.Tensor) or not activations.is_floating_point():
        raise TypeError(f"activations must be a floating point torch.Tensor, got {activations!r:.80}")
    if activations.dim() != 2:
        raise ValueError(f"activations must have shape (batch, num_classes), got {tuple(activations.shape)}")
    if not isinstance(target, torch.Tensor) or target.dim() != 1:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be class indices of shape (batch,), got {shape}")
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not 0 <= margin <= 1:
        raise ValueError(f"margin must be a number in [0, 1], got {margin!r}")
    wrong = 1.0 - as_target_mask(target, activations.shape[1]).to(activations.dtype)
    if wrong.shape[0] != activations.shape[0]:
        raise ValueError(f"target has {wrong.shape[0]} examples but activations has {activations.shape[0]}")
    a_target = activations.gather(1, target.long().unsqueeze(1))  # (batch, 1)
    shortfall = (margin - (a_target - activations)).clamp_min(0).square()
    return _batch_mean((wrong * shortfall).sum(dim=1))


def spread_loss_margin(step: int, ramp_steps: int, start: float = 0.2, end: float = 0.9) -> float:
    """The spread loss's margin schedule: ``start`` at step 0, rising linearly to ``end`` at
    ``ramp_steps`` and staying there.

    The paper starts ``m`` at 0.2 and raises it linearly to 0.9 during training; it does not say
    over how many steps, so ``ramp_steps`` is ours to choose (``ramp_steps=7`` epochs, 0.1 per
    epoch, is one common choice in re-implementations). ``step`` and ``ramp_steps`` may count
    batches or epochs alike.
    """
    for name, value in (("step", step), ("ramp_steps", ramp_steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if step < 0 or ramp_steps < 1:
        raise ValueError(f"need step >= 0 and ramp_steps >= 1, got step={step}, ramp_steps={ramp_steps}")
    return start + (end - start) * min(step, ramp_steps) / ramp_steps
