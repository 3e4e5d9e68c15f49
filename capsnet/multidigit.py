"""Two overlapping digits (MultiMNIST, Sabour et al. 2017, section 6): the loss, the accuracy and
a training loop for a :class:`capsnet.CapsNet` that must find both digits of an image.

The paper's recipe: the margin loss with both classes present (``T_k = 1`` for each), and the
decoder run once per digit, masked by that digit's class capsule, its reconstruction compared
with that digit alone; an image counts as correct when its two longest class capsules are its
two classes.

The data come from :func:`capsnet.data.multi_mnist` (merged images, label pairs, the two
shifted digits). Batches index into them with :class:`capsnet.data.DeviceBatches` over example
numbers, so merged images, labels and digits stay together on the device.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import DeviceBatches, MultiMNIST
from .hardware import autocast, resolve_precision
from .losses import margin_loss, reconstruction_loss
from .models import CapsNet
from .squashing import capsule_length
from .train import NonFiniteLossError, adam

__all__ = ["fit_two_digits", "evaluate_two_digits", "two_digit_loss", "two_hot", "top_two"]


def two_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(batch, 2)`` class pairs -> ``(batch, classes)`` 0/1 masks with both classes set."""
    mask = torch.zeros(labels.shape[0], classes, device=labels.device)
    return mask.scatter_(1, labels.long(), 1.0)


def top_two(lengths: torch.Tensor) -> torch.Tensor:
    """The two classes with the longest capsules, ``(batch, classes) -> (batch, 2)``, sorted."""
    return lengths.topk(2, dim=1).indices.sort(dim=1).values


def _float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def two_digit_loss(
    model: CapsNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    digits: torch.Tensor,
    recon_weight: float = 5e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch of two-digit images.

    Args:
        model: a CapsNet with a decoder, built for the images' size (36 for MultiMNIST).
        images: merged images ``(batch, 1, H, W)`` in ``[0, 1]``.
        labels: ``(batch, 2)`` the two classes of each image.
        digits: ``(batch, 2, 1, H, W)`` in ``[0, 1]``, each digit alone, in the order of ``labels``.
        recon_weight: weight of the summed squared error of both reconstructions.

    Returns:
        ``(loss, lengths, reconstructions)``: the scalar loss, the class capsules' lengths
        ``(batch, classes)`` and the two reconstructions ``(batch, 2, 1, H, W)``.
    """
    if model.decoder is None:
        raise ValueError("two_digit_loss needs a CapsNet with a decoder (decoder=True)")
    poses, _ = model.encode(images)
    lengths = capsule_length(poses).float()
    loss = margin_loss(lengths, two_hot(labels, model.classes))
    recons = torch.stack([model.reconstruct(poses, labels[:, k]) for k in range(2)], dim=1)
    for k in range(2):
        loss = loss + recon_weight * reconstruction_loss(recons[:, k].float(), digits[:, k])
    return loss, lengths, recons


def _on(data: MultiMNIST, device: torch.device) -> MultiMNIST:
    """The same pairs on ``device`` (moved once, not at every epoch)."""
    return MultiMNIST(*(tensor.to(device) for tensor in data))


def _batches(data: MultiMNIST, batch_size: int, device: torch.device, shuffle: bool, seed: int, epoch: int):
    """Epoch ``epoch``'s ``(images, labels, digits)`` batches of ``data`` (already on ``device``),
    floats in ``[0, 1]``."""
    index = DeviceBatches(
        data.images, torch.arange(len(data.labels)), batch_size, device, shuffle=shuffle, seed=seed
    )
    index.set_epoch(epoch)
    for images, idx in index:
        yield images, data.labels[idx], _float(data.parts[idx])


@torch.no_grad()
def evaluate_two_digits(
    model: CapsNet, data: MultiMNIST, batch_size: int = 256, precision: str = "fp32"
) -> dict[str, float]:
    """``accuracy`` (both classes are the two longest capsules) and ``error`` (in %) on ``data``,
    and ``digit_accuracy``: the fraction of the individual digits found among the top two."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    data = _on(data, device)
    was_training = model.training
    model.eval()
    both = found = n = 0
    for images, labels, _ in _batches(data, batch_size, device, shuffle=False, seed=0, epoch=0):
        with autocast(precision, device):
            poses, _ = model.encode(images)
        guessed = top_two(capsule_length(poses).float())
        hits = (guessed.unsqueeze(2) == labels.unsqueeze(1)).any(dim=1)  # (batch, 2): label found?
        both += int(hits.all(dim=1).sum())
        found += int(hits.sum())
        n += len(labels)
    model.train(was_training)
    return {"accuracy": both / n, "error": 100.0 * (1 - both / n), "digit_accuracy": found / (2 * n)}


def fit_two_digits(
    model: CapsNet,
    train: MultiMNIST,
    test: MultiMNIST | None = None,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    recon_weight: float = 5e-4,
    precision: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` on two-digit images with Adam at a constant learning rate, in mixed
    precision as :func:`capsnet.train.fit` does. This differs from the paper, whose rate decays by
    0.96 every 2,000 steps: the book's short runs would barely feel that decay, but a run of the
    ``paper`` profile (about 94,000 steps) spans 47 decay periods, which this constant rate leaves
    out (the rate would end at 0.96**47, about 15% of its start). Returns one metrics
    dict per epoch (``epoch``, ``train_loss``, ``seconds`` and, with ``test``, ``test_accuracy``,
    ``test_error``, ``test_digit_accuracy``).

    Raises:
        NonFiniteLossError: the training loss became NaN or infinite.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    optimizer = adam(model.parameters(), lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    train = _on(train, device)
    test = _on(test, device) if test is not None else None
    history = []
    for epoch in range(epochs):
        started, loss_sum, seen = time.perf_counter(), 0.0, 0
        model.train()
        batches = _batches(train, batch_size, device, shuffle=True, seed=seed, epoch=epoch)
        total = -(-len(train.labels) // batch_size)
        for images, labels, digits in tqdm(
            batches, total=total, desc=f"epoch {epoch + 1}", disable=not progress
        ):
            with autocast(precision, device):
                loss, _, _ = two_digit_loss(model, images, labels, digits, recon_weight)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(
                    f"the training loss became {loss.item()} in epoch {epoch + 1}; "
                    "try a lower learning rate or precision='fp32'"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen}
        if test is not None:
            result = evaluate_two_digits(model, test, precision=precision)
            metrics.update({f"test_{k}": v for k, v in result.items()})
        metrics["seconds"] = time.perf_counter() - started
        history.append(metrics)
    return history
