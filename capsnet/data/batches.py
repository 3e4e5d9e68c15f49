"""Batches drawn from a whole data set kept on the training device.

A GPU epoch of MNIST takes seconds; a Python data loader that decodes and copies every batch
would be the bottleneck. Instead the whole split lives on the device as one uint8 tensor and each
batch is an index into it, converted to float and augmented there.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["DeviceBatches", "random_shift"]


def random_shift(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shift each image by its own random whole-pixel offset in ``[-max_shift, max_shift]`` per axis,
    filling the uncovered border with zeros: the paper's only augmentation (up to 2 pixels).

    Shapes: ``(batch, channels, H, W) -> (batch, channels, H, W)``; works for any dtype and on any
    device (the offsets are drawn with ``generator``, which must live on the images' device).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (batch, channels, H, W), got {tuple(images.shape)}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    offsets = torch.randint(
        0, 2 * max_shift + 1, (2, batch), generator=generator, device=images.device
    )  # start row / column of the crop inside the padded image
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (B, W)
    index = torch.arange(batch, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class DeviceBatches:
    """Iterate over ``(images, labels)`` batches of a data set held on ``device``.

    Args:
        images: uint8 ``(n, channels, H, W)`` (or float in ``[0, 1]``), any device.
        labels: ``(n,)`` class indices, or ``(n, classes)`` 0/1 masks.
        batch_size: examples per batch; the last batch may be smaller.
        device: where the data set is kept and batches are made.
        shuffle: draw a new order every epoch.
        max_shift: random translation in pixels applied to every image (0 = none).
        seed: makes order and shifts reproducible; epoch ``e`` uses the generator seeded with
            ``seed * 1000003 + e``, so a resumed run sees exactly the batches it would have seen.

    Yields float32 images in ``[0, 1]`` of shape ``(b, channels, H, W)`` and labels, on ``device``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        shuffle: bool = False,
        max_shift: int = 0,
        seed: int = 0,
    ) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (n, channels, H, W), got {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.max_shift, self.seed = batch_size, shuffle, max_shift, seed
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's order and shifts the next iteration produces."""
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        return gen

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = self._generator()
        n = len(self.labels)
        order = (
            torch.randperm(n, generator=gen, device=self.device)
            if self.shuffle
            else torch.arange(n, device=self.device)
        )
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            if self.max_shift:
                x = random_shift(x, self.max_shift, gen)
            yield x, self.labels[idx]
