"""Routing by agreement (Sabour et al. 2017, Procedure 1), vectorised over the batch.

Every child capsule ``i`` makes a prediction ``u_hat[i, j]`` for every parent ``j``. Routing
decides how much of each child's output goes to each parent: parents whose output agrees with a
child's prediction get a larger share of it on the next iteration.

    b_ij = 0                                   (for every example: routing is per example)
    repeat r times:
        c_i  = softmax_j(b_i)                  (Eq. 3: over the parents, so sum_j c_ij = 1)
        s_j  = sum_i c_ij u_hat_j|i            (Eq. 2)
        v_j  = squash(s_j)                     (Eq. 1)
        b_ij = b_ij + u_hat_j|i . v_j          (agreement)

With ``b = 0`` the first iteration gives uniform couplings ``c_ij = 1 / n_parents``, so one
iteration means "no routing at all". A loop-based version that reads like the pseudo-code is in
:mod:`capsnet.routing_reference`; the tests check that both agree.

The sums over children are computed parents first: predictions as ``(batch, out_caps, in_caps,
out_dim)`` and logits as ``(batch, out_caps, in_caps)``, so that each parent's weighted sum and
agreements are one matrix-vector product over a contiguous ``(in_caps, out_dim)`` block and the
softmax over the parents runs along a long axis. :meth:`capsnet.RoutingCapsules.predictions`
stores its predictions in that order, which makes the transpose below free.
"""

from __future__ import annotations

from typing import Literal

import torch

from .squashing import squash

__all__ = ["dynamic_routing", "fixed_couplings", "CouplingMode", "GradientMode"]

CouplingMode = Literal["dynamic", "uniform", "random"]
GradientMode = Literal["last", "all"]


def _check_predictions(u_hat: torch.Tensor) -> None:
    if not isinstance(u_hat, torch.Tensor):
        raise TypeError(f"u_hat must be a torch.Tensor, got {type(u_hat).__name__}")
    if u_hat.dim() != 4:
        raise ValueError(
            "u_hat must have shape (batch, in_caps, out_caps, out_dim), "
            f"got {u_hat.dim()} dimensions: {tuple(u_hat.shape)}"
        )
    if not u_hat.is_floating_point():
        raise TypeError(f"u_hat must be floating point, got dtype {u_hat.dtype}")


def fixed_couplings(
    u_hat: torch.Tensor,
    mode: Literal["uniform", "random"],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Coupling coefficients that ignore agreement, for ablations.

    ``uniform``: every child sends ``1 / n_parents`` of its output to every parent (what one
    routing iteration gives). ``random``: per example and child, a softmax over standard-normal
    logits, drawn from ``generator`` if given (on the generator's device: a CPU generator draws on
    the CPU, so a seeded run gives the same couplings on every device). Shape
    ``(batch, in_caps, out_caps)``.
    """
    batch, in_caps, out_caps, _ = u_hat.shape
    if mode == "uniform":
        return u_hat.new_full((batch, in_caps, out_caps), 1.0 / out_caps)
    if mode == "random":
        source = generator.device if generator is not None else u_hat.device
        logits = torch.randn((batch, in_caps, out_caps), generator=generator, device=source)
        logits = logits.to(device=u_hat.device, dtype=u_hat.dtype)
        return logits.softmax(dim=-1)
    raise ValueError(f"fixed coupling mode must be 'uniform' or 'random', got {mode!r}")


def _identity(s: torch.Tensor) -> torch.Tensor:
    return s


def _weighted_sum(c: torch.Tensor, u_hat: torch.Tensor) -> torch.Tensor:
    """``s_j = sum_i c_ij u_hat_j|i`` (Eq. 2), parents first.

    ``c (batch, out_caps, in_caps)`` and ``u_hat (batch, out_caps, in_caps, out_dim)`` ->
    ``s (batch, out_caps, out_dim)``.
    """
    return (c.unsqueeze(2) @ u_hat).squeeze(2)


def _agreement(u_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u_hat_j|i . v_j``, parents first.

    ``u_hat (batch, out_caps, in_caps, out_dim)`` and ``v (batch, out_caps, out_dim)`` ->
    ``(batch, out_caps, in_caps)``.
    """
    return (u_hat @ v.unsqueeze(-1)).squeeze(-1)


def dynamic_routing(
    u_hat: torch.Tensor,
    iterations: int = 3,
    *,
    gradient: GradientMode = "last",
    coupling: CouplingMode = "dynamic",
    generator: torch.Generator | None = None,
    squashed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route predictions to parent capsules by agreement (Procedure 1).

    Args:
        u_hat: predictions ``u_hat_j|i = W_ij u_i``, shape ``(batch, in_caps, out_caps, out_dim)``.
        iterations: routing iterations ``r >= 1`` (the paper uses 3).
        gradient: ``"last"`` (default) lets gradients reach ``u_hat`` only through the final
            weighted sum; the couplings of that sum are treated as constants computed from
            detached predictions. ``"all"`` backpropagates through every iteration, as the
            pseudo-code reads literally. ``"last"`` is the default because it treats routing
            as an inference step (like the E-step of EM) rather than something to optimise
            through, needs no autograd graph for the earlier iterations (less memory and a
            cheaper backward pass). Whether it trains to the same accuracy as ``"all"`` is tested
            only over short runs (chapter 6 compares both); not tested at the paper's scale.
        coupling: ``"dynamic"`` routes by agreement. ``"uniform"`` and ``"random"`` use fixed
            couplings (see :func:`fixed_couplings`) and ignore ``iterations``: ablations.
        generator: random source for ``coupling="random"``.
        squashed: apply :func:`capsnet.squash` to the parents (Eq. 1); ``False`` leaves
            ``v_j = s_j`` unbounded, an ablation (chapter 12).

    Returns:
        ``(v, c)``: parent outputs ``v`` of shape ``(batch, out_caps, out_dim)`` and the final
        coupling coefficients ``c`` of shape ``(batch, in_caps, out_caps)``, which sum to 1 over
        the parents for every child and example.
    """
    _check_predictions(u_hat)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if gradient not in ("last", "all"):
        raise ValueError(f"gradient must be 'last' or 'all', got {gradient!r}")
    if coupling not in ("dynamic", "uniform", "random"):
        raise ValueError(f"coupling must be 'dynamic', 'uniform' or 'random', got {coupling!r}")
    u_parents = u_hat.transpose(1, 2)  # (batch, out_caps, in_caps, out_dim)
    nonlinearity = squash if squashed else _identity
    if coupling != "dynamic":
        c = fixed_couplings(u_hat, coupling, generator)
        return nonlinearity(_weighted_sum(c.transpose(1, 2), u_parents)), c

    # Predictions used to compute agreement: detached unless gradients flow through all steps.
    u_route = u_parents if gradient == "all" else u_parents.detach()
    b = u_hat.new_zeros(u_parents.shape[:3])  # (batch, out_caps, in_caps): per-example logits
    for r in range(iterations):
        c = b.softmax(dim=1)  # Eq. 3, over the parents
        last = r == iterations - 1
        v = nonlinearity(_weighted_sum(c, u_parents if last else u_route))  # Eq. 2, Eq. 1
        if not last:
            b = b + _agreement(u_route, v)
    return v, c.transpose(1, 2)
