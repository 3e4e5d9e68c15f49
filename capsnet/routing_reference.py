"""Routing by agreement written as plainly as the paper's pseudo-code (Procedure 1).

This loops over examples, child capsules and parent capsules one at a time. It is slow on
purpose: chapter 5 teaches routing from it and the tests use it as the oracle that
:func:`capsnet.dynamic_routing` must match.
"""

from __future__ import annotations

import torch

from .squashing import squash

__all__ = ["dynamic_routing_reference"]


def dynamic_routing_reference(
    u_hat: torch.Tensor, iterations: int = 3, gradient: str = "all"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedure 1, one example, one capsule pair at a time.

    Args:
        u_hat: predictions, shape ``(batch, in_caps, out_caps, out_dim)``.
        iterations: number of routing iterations ``r``.
        gradient: ``"all"`` or ``"last"``, with the same meaning as in
            :func:`capsnet.dynamic_routing`.

    Returns:
        ``(v, c)`` with shapes ``(batch, out_caps, out_dim)`` and ``(batch, in_caps, out_caps)``.
    """
    batch, n_in, n_out, _ = u_hat.shape
    v_all, c_all = [], []
    for n in range(batch):
        pred = u_hat[n]
        route_pred = pred if gradient == "all" else pred.detach()
        # 2: for all capsule i in layer l and capsule j in layer (l+1): b_ij <- 0
        b = [[pred.new_zeros(()) for _ in range(n_out)] for _ in range(n_in)]
        for r in range(iterations):  # 3: for r iterations do
            last = r == iterations - 1
            use = pred if last else route_pred
            # 4: for all capsule i in layer l: c_i <- softmax(b_i)
            c = []
            for i in range(n_in):
                exps = [torch.exp(b[i][j]) for j in range(n_out)]
                total = sum(exps)
                c.append([e / total for e in exps])
            # 5: for all capsule j in layer (l+1): s_j <- sum_i c_ij u_hat_j|i
            s = [sum(c[i][j] * use[i, j] for i in range(n_in)) for j in range(n_out)]
            # 6: for all capsule j in layer (l+1): v_j <- squash(s_j)
            v = [squash(s[j]) for j in range(n_out)]
            # 7: for all i in layer l and j in layer (l+1): b_ij <- b_ij + u_hat_j|i . v_j
            if not last:
                for i in range(n_in):
                    for j in range(n_out):
                        b[i][j] = b[i][j] + torch.dot(route_pred[i, j], v[j])
        v_all.append(torch.stack(v))
        c_all.append(torch.stack([torch.stack(row) for row in c]))
    return torch.stack(v_all), torch.stack(c_all)
