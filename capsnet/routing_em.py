"""EM routing of matrix capsules (Hinton, Sabour & Frosst 2018, Sec. 2-3, Procedure 1).

Every child capsule ``i`` (activation ``a_i``) casts a vote ``V_ij`` (its 4x4 pose times a
learned 4x4 transformation, flattened to ``h = 1..16``) for every parent ``j``. Each parent is a
Gaussian cluster with an axis-aligned covariance; EM fits the clusters to the votes, and a parent
becomes active when many active children agree on it (a tight cluster is cheap to describe):

    R_ij = 1 / n_parents                                  (every example starts uniform)
    repeat for t = 1 .. iterations:
      M-step, for every parent j:
        R_ij   <- R_ij a_i                                (only active children count)
        mu_j^h      = sum_i R_ij V_ij^h / sum_i R_ij
        (sig_j^h)^2 = sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij   (+ eps)
        cost_j^h    = (beta_v + log sig_j^h) sum_i R_ij
        a_j         = logistic(lambda_t (beta_a - sum_h cost_j^h))
      E-step, for every child i (except after the last M-step):
        p_ij = prod_h N(V_ij^h; mu_j^h, (sig_j^h)^2)
        R_ij = a_j p_ij / sum_k a_k p_ik                  (sums to 1 over the parents)

The last E-step of the paper's Procedure 1 changes nothing that is returned (``a`` and ``mu`` come
from the last M-step), so it is skipped: the returned assignments are those the last M-step
used, and one iteration means "no routing" (uniform ``R``), as in :func:`capsnet.dynamic_routing`.

What the paper leaves open, and the choices made here:

- Inverse temperature ``lambda``: the paper gives no values for it. The default
  (:func:`inverse_temperatures`) rises linearly, ``lambda_t = 0.001 t``: 0.001, 0.002, 0.003 for
  three iterations, so the last (output) iteration is the sharpest. Public re-implementations use
  values between 1e-4 and 1e-2. The costs are sums over 16 pose entries weighted by
  ``sum_i R_ij`` (several children per parent), of order 100-1000 when the votes are small, so
  ``lambda`` sets how soon the logistic saturates. In short MNIST runs of
  :class:`capsnet.MatrixCapsNet` (256 images, 40-150 Adam steps), a schedule starting at 0.01
  left the class activations near 1 and the spread loss at or above its value for equal
  activations; starting at 0.001 the loss fell well below it.
- ``eps`` (default 1e-6) is added to every variance, so that a parent whose votes coincide (or
  that has a single child) has a finite ``log sigma`` and density, and it is the smallest value
  ``sum_i R_ij`` is divided by, so that a parent no active child votes for gets mean 0, not NaN.
- The E-step runs in log space: ``log a_j + log p_ij`` normalised with a log-sum-exp (a
  softmax over the parents), with ``log a_j`` from ``logsigmoid``; products of 16 small densities
  never underflow.
- Gradients flow through every iteration (the paper trains "by backpropagation through unrolled
  iterations of EM"); ``beta_v`` and ``beta_a`` are one value per parent (capsule type).
- The costs are used as the paper writes them, not normalised across parents as some
  re-implementations do.

:func:`em_routing_reference` below is the same algorithm written as loops over examples, parents
and children, the way the paper's pseudo-code reads; the tests check that both agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "EMRoutingOutput",
    "em_routing",
    "em_routing_reference",
    "inverse_temperatures",
    "routing_settings",
]

DEFAULT_EPS = 1e-6


class EMRoutingOutput(NamedTuple):
    """What :func:`em_routing` returns.

    activations: ``(batch, out_caps)``, the parents' ``a_j`` from the last M-step.
    poses: ``(batch, out_caps, pose_dim)``, the parents' means ``mu_j`` (their poses, flattened).
    variances: ``(batch, out_caps, pose_dim)``, ``sigma_j^2`` including ``eps``.
    assignments: ``(batch, in_caps, out_caps)``, the ``R_ij`` the last M-step used (before it
        scaled them by ``a_i``); they sum to 1 over the parents for every child.
    """

    activations: torch.Tensor
    poses: torch.Tensor
    variances: torch.Tensor
    assignments: torch.Tensor


def inverse_temperatures(iterations: int, base: float = 0.001) -> tuple[float, ...]:
    """The default schedule of ``lambda``: ``base * t`` for ``t = 1 .. iterations``.

    The paper fixes a schedule without giving it; a rising ``lambda`` makes the activations of the
    early iterations soft and the last one (the layer's output) the most decisive.
    """
    _check_iterations(iterations)
    if not base > 0:
        raise ValueError(f"base inverse temperature must be > 0, got {base!r}")
    return tuple(base * (t + 1) for t in range(iterations))


def _check_iterations(iterations: object) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")


def routing_settings(iterations: int, lambdas: Sequence[float] | None, eps: float) -> tuple[float, ...]:
    """Check EM routing's settings; return the inverse temperature of each iteration.

    ``lambdas`` ``None`` means :func:`inverse_temperatures`; otherwise it must hold
    ``iterations`` positive finite numbers. ``eps`` must be a number > 0.
    """
    _check_iterations(iterations)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if lambdas is None:
        return inverse_temperatures(iterations)
    if isinstance(lambdas, str | torch.Tensor) or not isinstance(lambdas, Sequence):
        raise TypeError(f"lambdas must be a sequence of numbers, got {type(lambdas).__name__}")
    values = tuple(float(lam) for lam in lambdas)
    if len(values) != iterations or not all(lam > 0 and math.isfinite(lam) for lam in values):
        raise ValueError(
            f"lambdas must be {iterations} positive finite inverse temperatures (one per iteration), "
            f"got {values}"
        )
    return values


def _check_tensors(
    votes: torch.Tensor, activations: torch.Tensor, beta_v: torch.Tensor, beta_a: torch.Tensor
) -> None:
    for name, value in (
        ("votes", votes),
        ("activations", activations),
        ("beta_v", beta_v),
        ("beta_a", beta_a),
    ):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be floating point, got dtype {value.dtype}")
    if votes.dim() != 4:
        raise ValueError(
            "votes must have shape (batch, in_caps, out_caps, pose_dim), "
            f"got {votes.dim()} dimensions: {tuple(votes.shape)}"
        )
    batch, in_caps, out_caps, _ = votes.shape
    if tuple(activations.shape) != (batch, in_caps):
        raise ValueError(
            f"activations must have shape (batch, in_caps) = {(batch, in_caps)} to match the votes, "
            f"got {tuple(activations.shape)}"
        )
    for name, beta in (("beta_v", beta_v), ("beta_a", beta_a)):
        if tuple(beta.shape) != (out_caps,):
            raise ValueError(
                f"{name} must have one value per parent, shape ({out_caps},), got {tuple(beta.shape)}"
            )


def _log_gaussian(votes: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``log p_ij = sum_h log N(V_ij^h; mu_j^h, var_j^h)``.

    ``votes (batch, in_caps, out_caps, pose_dim)``, ``mu, var (batch, out_caps, pose_dim)`` ->
    ``(batch, in_caps, out_caps)``.
    """
    mu, var = mu.unsqueeze(1), var.unsqueeze(1)
    return -0.5 * ((votes - mu).square() / var + torch.log(2 * math.pi * var)).sum(dim=-1)


def em_routing(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_v: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int = 3,
    *,
    lambdas: Sequence[float] | None = None,
    eps: float = DEFAULT_EPS,
) -> EMRoutingOutput:
    """Route votes to parent capsules by EM (Procedure 1), vectorised over examples and capsules.

    Each example (and, in a convolutional capsule layer, each output position folded into the
    batch) is routed on its own: nothing is shared across the batch dimension.

    Args:
        votes: ``V_ij``, shape ``(batch, in_caps, out_caps, pose_dim)`` (``pose_dim`` 16 for 4x4).
        activations: the children's ``a_i`` in ``[0, 1]``, shape ``(batch, in_caps)``.
        beta_v, beta_a: learned per-parent costs, shape ``(out_caps,)``: ``beta_v`` per pose entry
            of describing a parent's votes, ``-beta_a`` of activating it.
        iterations: EM iterations (the paper uses 3).
        lambdas: inverse temperature per iteration; default :func:`inverse_temperatures`.
        eps: added to the variances, and the floor of ``sum_i R_ij`` (see the module docstring).

    Returns:
        An :class:`EMRoutingOutput` (activations, poses, variances, assignments). Computed in
        ``votes``'s dtype.
    """
    _check_tensors(votes, activations, beta_v, beta_a)
    lambdas = routing_settings(iterations, lambdas, eps)
    batch, in_caps, out_caps, _ = votes.shape
    a_in = activations.to(votes.dtype).unsqueeze(-1)  # (batch, in_caps, 1)
    beta_v = beta_v.to(votes.dtype).unsqueeze(-1)  # (out_caps, 1)
    beta_a = beta_a.to(votes.dtype)
    r = votes.new_full((batch, in_caps, out_caps), 1.0 / out_caps)
    for t, lam in enumerate(lambdas):
        # M-step
        weights = r * a_in  # R_ij a_i
        total = weights.sum(dim=1).unsqueeze(-1)  # sum_i R_ij: (batch, out_caps, 1)
        denominator = total.clamp_min(eps)
        mu = torch.einsum("bij,bijh->bjh", weights, votes) / denominator
        var = torch.einsum("bij,bijh->bjh", weights, (votes - mu.unsqueeze(1)).square()) / denominator + eps
        cost = (beta_v + 0.5 * torch.log(var)) * total  # (beta_v + log sigma_j^h) sum_i R_ij
        logits = lam * (beta_a - cost.sum(dim=-1))  # (batch, out_caps)
        if t == len(lambdas) - 1:
            break
        # E-step, in log space: R_ij = softmax_j(log a_j + log p_ij)
        log_ap = F.logsigmoid(logits).unsqueeze(1) + _log_gaussian(votes, mu, var)
        r = torch.softmax(log_ap, dim=2)
    return EMRoutingOutput(torch.sigmoid(logits), mu, var, r)


def em_routing_reference(
    votes: torch.Tensor,
    activations: torch.Tensor,
    beta_v: torch.Tensor,
    beta_a: torch.Tensor,
    iterations: int = 3,
    *,
    lambdas: Sequence[float] | None = None,
    eps: float = DEFAULT_EPS,
) -> EMRoutingOutput:
    """Procedure 1 one example, one parent and one child at a time: the oracle for :func:`em_routing`.

    Slow on purpose; same arguments and results. The numbered comments follow the paper's
    pseudo-code (Procedure 1 and its M-step and E-step).
    """
    _check_tensors(votes, activations, beta_v, beta_a)
    lambdas = routing_settings(iterations, lambdas, eps)
    batch, n_in, n_out, pose_dim = votes.shape
    outputs: list[tuple[torch.Tensor, ...]] = []
    for n in range(batch):
        V, a = votes[n], activations[n].to(votes.dtype)
        # 1: for all i in layer L, j in layer L+1: R_ij <- 1 / |layer L+1|
        R = [[votes.new_tensor(1.0 / n_out) for _ in range(n_out)] for _ in range(n_in)]
        for t, lam in enumerate(lambdas):  # 2: for t iterations do
            R_used = [row[:] for row in R]
            a_out, mu, var = [], [], []
            for j in range(n_out):  # 3: for all j in layer L+1: M-STEP(a, R, V, j)
                # M1: for all i in layer L: R_ij <- R_ij a_i
                Ra = [R[i][j] * a[i] for i in range(n_in)]
                total = sum(Ra)
                denominator = torch.clamp(total, min=eps)
                # M2: for all h: mu_j^h <- sum_i R_ij V_ij^h / sum_i R_ij
                mu_j = sum(Ra[i] * V[i, j] for i in range(n_in)) / denominator
                # M3: for all h: (sigma_j^h)^2 <- sum_i R_ij (V_ij^h - mu_j^h)^2 / sum_i R_ij
                var_j = sum(Ra[i] * (V[i, j] - mu_j) ** 2 for i in range(n_in)) / denominator + eps
                # M4: cost^h <- (beta_v + log sigma_j^h) sum_i R_ij
                cost = (beta_v[j] + torch.log(torch.sqrt(var_j))) * total
                # M5: a_j <- logistic(lambda (beta_a - sum_h cost^h))
                a_out.append(torch.sigmoid(lam * (beta_a[j] - cost.sum())))
                mu.append(mu_j)
                var.append(var_j)
            if t == len(lambdas) - 1:
                break
            for i in range(n_in):  # 4: for all i in layer L: E-STEP(mu, sigma, a, V, i)
                # E1: for all j: p_j <- prod_h N(V_ij^h; mu_j^h, (sigma_j^h)^2), as a logarithm
                log_p = [
                    sum(
                        -((V[i, j, h] - mu[j][h]) ** 2) / (2 * var[j][h])
                        - 0.5 * torch.log(2 * math.pi * var[j][h])
                        for h in range(pose_dim)
                    )
                    for j in range(n_out)
                ]
                # E2: for all j: R_ij <- a_j p_j / sum_k a_k p_k, with a log-sum-exp
                log_ap = [torch.log(a_out[j]) + log_p[j] for j in range(n_out)]
                log_norm = torch.logsumexp(torch.stack(log_ap), dim=0)
                for j in range(n_out):
                    R[i][j] = torch.exp(log_ap[j] - log_norm)
        outputs.append(
            (
                torch.stack(a_out),
                torch.stack(mu),
                torch.stack(var),
                torch.stack([torch.stack(row) for row in R_used]),
            )
        )
    return EMRoutingOutput(*(torch.stack(parts) for parts in zip(*outputs, strict=True)))
