"""Linear probes: how precisely a straight line through a representation recovers a quantity.

A probe fits ``y ~ w . z + b`` by ridge regression on some examples, where ``z`` are the features
standardised on those examples, and is scored on *other* examples (held-out rows), so that a
representation with many numbers cannot look good by fitting its own examples. Chapter 1 builds it
to read a face's position off pooled feature maps; chapter 10 reads a digit's shift off the class
capsules and off a CNN's hidden layer.

The penalty is relative to the features' scale: ``strength * trace(Z Z^T) / n`` (``n`` fitted
rows), so one ``strength`` means the same for 64 features as for 1,152. With several strengths,
the one with the lowest k-fold cross-validated error on the fitted rows is used; ``groups`` keeps
related rows (the shifted copies of one image) in the same fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["readout_error", "ridge_readout"]


def ridge_readout(
    x: torch.Tensor, y: torch.Tensor, strength: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fit a ridge read-out of ``y (n,)`` from ``x (n, d)``; returns it as ``(m, d) -> (m,)``.

    Solved in its dual form, ``alpha = (Z Z^T + lambda I)^-1 (y - mean(y))`` and ``w = Z^T alpha``,
    which is the same read-out as the primal one and costs an ``n x n`` solve (cheap for many
    features). ``lambda = strength * trace(Z Z^T) / n``.
    """
    if x.dim() != 2 or y.shape != x.shape[:1]:
        raise ValueError(f"expected x (n, d) and y (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if strength <= 0:
        raise ValueError(f"strength must be positive, got {strength!r}")
    mean, std, y_mean = x.mean(0), x.std(0) + 1e-6, y.mean()
    z = (x - mean) / std
    gram = z @ z.T
    ridge = strength * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    w = z.T @ torch.linalg.solve(gram + ridge, y - y_mean)
    return lambda new_x: ((new_x - mean) / std) @ w + y_mean


def _rms(predicted: torch.Tensor, y: torch.Tensor) -> float:
    return (predicted - y).pow(2).mean().sqrt().item()


def readout_error(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    strengths: Sequence[float] = (1e-2,),
    *,
    folds: int = 5,
    groups: torch.Tensor | None = None,
) -> float:
    """Root-mean-square error on ``(test_x, test_y)`` of a ridge read-out fitted on
    ``(train_x, train_y)``, in the units of ``y``.

    With one strength it is used as given. With several, each is scored by ``folds``-fold
    cross-validation on the training rows (rows assigned to folds by ``groups (n,)``, integer labels
    such as the index of the image a row came from, or row by row) and the best is refitted on all
    of them: the test rows play no part in the choice.
    """
    if not strengths:
        raise ValueError("strengths must name at least one penalty strength")
    if len(strengths) == 1:
        return _rms(ridge_readout(train_x, train_y, strengths[0])(test_x), test_y)
    labels = torch.arange(len(train_x)) if groups is None else groups.to("cpu")
    if labels.shape != train_x.shape[:1]:
        raise ValueError(f"groups must hold one label per training row, got shape {tuple(labels.shape)}")
    fold = labels % folds
    if len(fold.unique()) < folds:
        raise ValueError(f"cross-validation needs at least {folds} groups of training rows")

    def cross_validated(strength: float) -> float:
        squared = 0.0
        for k in range(folds):
            held = (fold == k).to(train_x.device)
            read = ridge_readout(train_x[~held], train_y[~held], strength)
            squared += (read(train_x[held]) - train_y[held]).pow(2).sum().item()
        return squared

    best = min(strengths, key=cross_validated)
    return _rms(ridge_readout(train_x, train_y, best)(test_x), test_y)
