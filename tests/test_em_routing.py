"""Tests of capsnet.em_routing: EM routing of matrix capsules (Hinton, Sabour & Frosst 2018, Procedure 1)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from capsnet import EMRoutingOutput, em_routing, em_routing_reference, inverse_temperatures

# (batch, in_caps, out_caps, pose_dim), including one child, one parent and both at once.
SHAPES = [(2, 5, 3, 4), (3, 1, 4, 2), (2, 6, 1, 3), (1, 1, 1, 16), (2, 7, 4, 16)]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_inputs(
    shape: tuple[int, int, int, int], seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Votes N(0, 1), child activations U(0, 1), beta_v and beta_a N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    batch, in_caps, out_caps, pose_dim = shape
    votes = torch.randn(shape, dtype=dtype, generator=gen)
    activations = torch.rand(batch, in_caps, dtype=dtype, generator=gen)
    beta_v = torch.randn(out_caps, dtype=dtype, generator=gen)
    beta_a = torch.randn(out_caps, dtype=dtype, generator=gen)
    return votes, activations, beta_v, beta_a


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_vectorised_equals_reference(shape: tuple[int, int, int, int], iterations: int) -> None:
    inputs = [x.requires_grad_(True) for x in random_inputs(shape, seed=iterations)]
    # Large lambdas so that the activations, and through them the E-step, depend visibly on the costs.
    lambdas = [0.05 * (t + 1) for t in range(iterations)]
    gen = torch.Generator().manual_seed(100 + iterations)
    weights = [torch.randn(out.shape, dtype=torch.float64, generator=gen) for out in em_routing(*inputs, 1)]

    def values_and_gradients(routing) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        out = routing(*inputs, iterations, lambdas=lambdas)
        assert isinstance(out, EMRoutingOutput)
        # A random scalar function of every output, the assignments included.
        objective = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
        return [o.detach() for o in out], torch.autograd.grad(objective, inputs)

    values, grads = values_and_gradients(em_routing)
    values_ref, grads_ref = values_and_gradients(em_routing_reference)
    for value, value_ref in zip(values, values_ref, strict=True):
        torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=1e-13)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)
    # The gradients reach every input (the assignments depend on all of them after an E-step).
    assert all(grad.abs().sum() > 0 for grad in grads)


def test_reference_agrees_with_default_schedule_and_eps() -> None:
    inputs = random_inputs((2, 6, 3, 16), seed=7)
    for eps in (1e-6, 1e-2):
        out, ref = em_routing(*inputs, eps=eps), em_routing_reference(*inputs, eps=eps)
        for value, value_ref in zip(out, ref, strict=True):
            torch.testing.assert_close(value, value_ref, rtol=1e-12, atol=1e-13)


def test_one_iteration_matches_the_m_step_by_hand() -> None:
    """Uniform R, one M-step, computed with NumPy from the paper's equations."""
    votes, act, beta_v, beta_a = random_inputs((1, 4, 2, 3), seed=8)
    out = em_routing(votes, act, beta_v, beta_a, 1, lambdas=[0.5], eps=1e-9)
    V, a, bv, ba = votes[0].numpy(), act[0].numpy(), beta_v.numpy(), beta_a.numpy()
    for j in range(2):
        r = 0.5 * a  # R_ij = 1/2, times a_i
        mu = (r[:, None] * V[:, j]).sum(0) / r.sum()
        var = (r[:, None] * (V[:, j] - mu) ** 2).sum(0) / r.sum() + 1e-9
        cost = ((bv[j] + np.log(np.sqrt(var))) * r.sum()).sum()
        activation = 1 / (1 + np.exp(-0.5 * (ba[j] - cost)))
        np.testing.assert_allclose(out.poses[0, j].numpy(), mu, rtol=1e-12)
        np.testing.assert_allclose(out.variances[0, j].numpy(), var, rtol=1e-12)
        np.testing.assert_allclose(float(out.activations[0, j]), activation, rtol=1e-12)
    torch.testing.assert_close(out.assignments, torch.full((1, 4, 2), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_assignments_sum_to_one_over_parents(shape: tuple[int, int, int, int], iterations: int) -> None:
    out = em_routing(*random_inputs(shape, seed=9), iterations)
    batch, in_caps, out_caps, pose_dim = shape
    assert out.activations.shape == (batch, out_caps)
    assert out.poses.shape == out.variances.shape == (batch, out_caps, pose_dim)
    assert out.assignments.shape == (batch, in_caps, out_caps)
    assert (out.assignments >= 0).all() and (out.variances > 0).all()
    assert ((out.activations > 0) & (out.activations < 1)).all()
    torch.testing.assert_close(out.assignments.sum(dim=2), torch.ones(batch, in_caps, dtype=torch.float64))
    if iterations == 1:  # the returned R are those of the last M-step: uniform after one iteration
        torch.testing.assert_close(out.assignments, torch.full_like(out.assignments, 1 / out_caps))
    elif out_caps > 1:  # would fail for a normalisation over the children instead of the parents
        assert not torch.allclose(
            out.assignments.sum(dim=1), torch.ones(batch, out_caps, dtype=torch.float64)
        )


def cluster_example(dissenters: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """12 active children, 3 parents, equal betas: only agreement tells the parents apart.

    The children's votes for parent 0 form a tight cluster (spread 0.05) around a random centre,
    except for the last ``dissenters`` children, whose votes for it lie far off (centre + 5,
    spread 1). All votes for parents 1 and 2 scatter (N(0, 1)).
    """
    gen = torch.Generator().manual_seed(10)
    centre = torch.randn(16, dtype=torch.float64, generator=gen)
    votes = torch.randn(1, 12, 3, 16, dtype=torch.float64, generator=gen)
    agree = 12 - dissenters
    votes[0, :agree, 0] = centre + 0.05 * votes[0, :agree, 0]
    votes[0, agree:, 0] = centre + 5 + votes[0, agree:, 0]
    activations = torch.ones(1, 12, dtype=torch.float64)
    zeros = torch.zeros(3, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (votes, activations, zeros, zeros))


def test_tight_cluster_wins() -> None:
    inputs = cluster_example()
    # One M-step (uniform R): the tight parent has the smallest sigma in every pose entry, hence
    # the lowest cost and the highest activation.
    out = em_routing(*inputs, 1, lambdas=[0.01])
    a, var = out.activations[0], out.variances[0]
    assert (var[0] < var[1]).all() and (var[0] < var[2]).all()
    assert a[0] > a[1] and a[0] > a[2]
    # With routing every child goes to parent 0, whose mean is the cluster's centre.
    out = em_routing(*inputs, 3, lambdas=[0.01] * 3)
    a = out.activations[0]
    assert a[0] > a[1] and a[0] > a[2]
    assert (out.assignments[0, :, 0] > 0.99).all()
    torch.testing.assert_close(out.poses[0, 0], inputs[0][0, :, 0].mean(dim=0))


def test_routing_sets_dissenters_apart() -> None:
    """4 of 12 children vote far from parent 0's cluster: with uniform R they make it the widest,
    least active parent; EM assigns them elsewhere and parent 0 ends up tight and most active."""
    inputs = cluster_example(dissenters=4)
    before = em_routing(*inputs, 1, lambdas=[0.01])
    after = em_routing(*inputs, 3, lambdas=[0.01] * 3)
    assert before.activations[0].argmin() == 0 and (before.variances[0, 0] > 1).all()
    assert after.activations[0].argmax() == 0 and (after.variances[0, 0] < 0.01).all()
    shares = after.assignments[0, :, 0]
    assert (shares[:8] > 0.99).all() and (shares[8:] < 0.01).all()
    torch.testing.assert_close(after.poses[0, 0], inputs[0][0, :8, 0].mean(dim=0), atol=1e-4, rtol=0)


def test_inactive_children_do_not_vote() -> None:
    """R_ij is scaled by a_i: a child with activation 0 does not move the mean, however far off it votes."""
    votes, activations, beta_v, beta_a = cluster_example()
    outlier = torch.full((1, 1, 3, 16), 100.0, dtype=torch.float64)
    with_outlier = em_routing(
        torch.cat([votes, outlier], dim=1), torch.cat([activations, torch.zeros(1, 1)], dim=1), beta_v, beta_a
    )
    without = em_routing(votes, activations, beta_v, beta_a)
    torch.testing.assert_close(with_outlier.poses, without.poses)
    torch.testing.assert_close(with_outlier.activations, without.activations)
    # The same child active drags parent 0's mean towards it.
    active = em_routing(
        torch.cat([votes, outlier], dim=1), torch.cat([activations, torch.ones(1, 1)], dim=1), beta_v, beta_a
    )
    assert not torch.allclose(active.poses, without.poses, atol=1e-3)


def test_betas_shift_activations_the_right_way() -> None:
    votes, activations, beta_v, beta_a = random_inputs((2, 9, 4, 16), seed=15)
    base = em_routing(votes, activations, beta_v, beta_a, 1).activations
    raised_beta_a = em_routing(votes, activations, beta_v, beta_a + 50, 1).activations
    raised_beta_v = em_routing(votes, activations, beta_v + 1, beta_a, 1).activations
    assert (raised_beta_a > base).all()  # -beta_a is the cost of activating a parent
    assert (raised_beta_v < base).all()  # beta_v is a cost per pose entry of describing the votes


def test_routing_is_per_example() -> None:
    inputs = random_inputs((5, 6, 3, 16), seed=11)
    out = em_routing(*inputs)
    perm = torch.tensor([3, 0, 4, 2, 1])
    permuted = em_routing(inputs[0][perm], inputs[1][perm], inputs[2], inputs[3])
    for value, value_perm in zip(out, permuted, strict=True):
        torch.testing.assert_close(value_perm, value[perm])
    # Changing one example leaves the others' results unchanged.
    votes = inputs[0].clone()
    votes[2] = 10 * votes[2]
    changed = em_routing(votes, *inputs[1:])
    keep = [0, 1, 3, 4]
    for value, value_changed in zip(out, changed, strict=True):
        torch.testing.assert_close(value_changed[keep], value[keep])
    assert not torch.allclose(changed.activations[2], out.activations[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case", ["identical votes", "one child", "no active child", "huge votes", "tiny activations"]
)
def test_numerically_safe(dtype: torch.dtype, case: str) -> None:
    votes, activations, beta_v, beta_a = random_inputs((2, 9, 4, 16), seed=12, dtype=dtype)
    if case == "identical votes":  # sigma = 0 for every parent without eps
        votes = votes[:, :1].expand_as(votes).clone()
    elif case == "one child":
        votes, activations = votes[:, :1], activations[:, :1]
    elif case == "no active child":  # sum_i R_ij = 0
        activations = torch.zeros_like(activations)
    elif case == "huge votes":
        votes = 1e4 * votes
    else:
        activations = torch.full_like(activations, 1e-30 if dtype == torch.float32 else 1e-300)
    leaves = [x.requires_grad_(True) for x in (votes, activations, beta_v, beta_a)]
    out = em_routing(*leaves, 3, lambdas=[0.01, 0.1, 1.0])
    for value in out:
        assert value.dtype == dtype and torch.isfinite(value).all()
    torch.testing.assert_close(out.assignments.sum(dim=2), torch.ones(out.assignments.shape[:2], dtype=dtype))
    objective = sum(value.sum() for value in out)
    for grad in torch.autograd.grad(objective, leaves):
        assert torch.isfinite(grad).all()


def test_float32_close_to_float64() -> None:
    inputs = random_inputs((3, 8, 4, 16), seed=13)
    out64 = em_routing(*inputs)
    out32 = em_routing(*(x.float() for x in inputs))
    for value32, value64 in zip(out32, out64, strict=True):
        torch.testing.assert_close(value32.double(), value64, rtol=1e-4, atol=1e-5)


def test_inverse_temperature_schedule() -> None:
    assert inverse_temperatures(3) == pytest.approx((0.001, 0.002, 0.003))
    assert inverse_temperatures(1, base=0.01) == pytest.approx((0.01,))
    schedule = inverse_temperatures(5)
    assert all(later > earlier for earlier, later in zip(schedule, schedule[1:], strict=False))
    # The default schedule is what em_routing uses when no lambdas are given.
    inputs = random_inputs((2, 5, 3, 16), seed=14)
    torch.testing.assert_close(
        em_routing(*inputs).activations, em_routing(*inputs, lambdas=schedule[:3]).activations
    )
    with pytest.raises(ValueError, match="base inverse temperature must be > 0, got 0"):
        inverse_temperatures(3, base=0)


def test_activations_sharpen_with_lambda() -> None:
    """A larger inverse temperature pushes the activations further from 1/2, in the same direction."""
    inputs = random_inputs((2, 9, 4, 16), seed=16)
    soft = em_routing(*inputs, 1, lambdas=[0.01]).activations - 0.5
    sharp = em_routing(*inputs, 1, lambdas=[0.1]).activations - 0.5
    assert (torch.sign(soft) == torch.sign(sharp)).all() and (sharp.abs() > soft.abs()).all()


def test_bad_inputs() -> None:
    votes, activations, beta_v, beta_a = random_inputs((2, 5, 3, 16))
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, "votes must be a torch.Tensor, got list", {"votes": [[1.0]]}),
        (TypeError, "votes must be floating point, got dtype torch.int64", {"votes": votes.long()}),
        (
            TypeError,
            "activations must be floating point, got dtype torch.bool",
            {"activations": activations > 0},
        ),
        (
            ValueError,
            "votes must have shape (batch, in_caps, out_caps, pose_dim), got 3 dimensions: (2, 5, 48)",
            {"votes": votes.flatten(2)},
        ),
        (
            ValueError,
            "activations must have shape (batch, in_caps) = (2, 5) to match the votes, got (2, 5, 1)",
            {"activations": activations.unsqueeze(-1)},
        ),
        (
            ValueError,
            "beta_v must have one value per parent, shape (3,), got (1, 3)",
            {"beta_v": beta_v[None]},
        ),
        (
            ValueError,
            "beta_a must have one value per parent, shape (3,), got (4,)",
            {"beta_a": torch.zeros(4)},
        ),
        (ValueError, "iterations must be an integer >= 1, got 0", {"iterations": 0}),
        (ValueError, "iterations must be an integer >= 1, got True", {"iterations": True}),
        (ValueError, "iterations must be an integer >= 1, got 2.0", {"iterations": 2.0}),
        (ValueError, "eps must be a number > 0, got 0.0", {"eps": 0.0}),
        (
            ValueError,
            "lambdas must be 3 positive finite inverse temperatures (one per iteration), got (0.1, 0.2)",
            {"lambdas": [0.1, 0.2]},
        ),
        (
            ValueError,
            "positive finite inverse temperatures (one per iteration), got (1.0, -2.0, 3.0)",
            {"lambdas": [1, -2, 3]},
        ),
        (TypeError, "lambdas must be a sequence of numbers, got float", {"lambdas": 0.01}),
    ]
    for error, message, change in cases:
        kwargs: dict[str, object] = {
            "votes": votes,
            "activations": activations,
            "beta_v": beta_v,
            "beta_a": beta_a,
            "iterations": 3,
            **change,
        }
        for routing in (em_routing, em_routing_reference):
            with pytest.raises(error, match=re.escape(message)):
                routing(**kwargs)


def test_nan_lambda_rejected() -> None:
    with pytest.raises(ValueError, match="positive finite"):
        em_routing(*random_inputs((1, 2, 2, 4)), 1, lambdas=[math.nan])
