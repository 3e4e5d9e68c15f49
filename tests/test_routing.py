"""Tests of capsnet.routing: routing by agreement (Procedure 1) and the fixed-coupling ablations."""

from __future__ import annotations

import pytest
import torch

from capsnet import dynamic_routing, dynamic_routing_reference, fixed_couplings, squash

# (batch, in_caps, out_caps, out_dim), including one child, one parent and both at once.
SHAPES = [(2, 5, 3, 4), (3, 1, 4, 2), (2, 6, 1, 3), (1, 1, 1, 2), (2, 7, 10, 16)]


def random_predictions(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_couplings_sum_to_one_over_parents(shape: tuple[int, ...], iterations: int) -> None:
    u_hat = random_predictions(shape)
    v, c = dynamic_routing(u_hat, iterations)
    batch, in_caps, out_caps, out_dim = shape
    assert v.shape == (batch, out_caps, out_dim)
    assert c.shape == (batch, in_caps, out_caps)
    assert (c >= 0).all()
    torch.testing.assert_close(c.sum(dim=2), torch.ones(batch, in_caps, dtype=torch.float64))
    assert (v.norm(dim=-1) < 1).all()


def test_softmax_is_over_parents_not_children() -> None:
    # Would fail for softmax over the child axis (dim 1): with 2 children and 5 parents each child's
    # couplings would sum to 5/2 over the parents instead of 1, and iteration 1 would give 1/2.
    u_hat = random_predictions((3, 2, 5, 4), seed=1)
    for iterations in (1, 3):
        _, c = dynamic_routing(u_hat, iterations)
        torch.testing.assert_close(c.sum(dim=2), torch.ones(3, 2, dtype=torch.float64))
        assert not torch.allclose(c.sum(dim=1), torch.ones(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_iteration_is_uniform(shape: tuple[int, ...]) -> None:
    u_hat = random_predictions(shape, seed=2)
    v, c = dynamic_routing(u_hat, 1)
    out_caps = shape[2]
    torch.testing.assert_close(c, torch.full_like(c, 1 / out_caps))
    torch.testing.assert_close(v, squash(u_hat.sum(dim=1) / out_caps))


@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
@pytest.mark.parametrize("gradient", ["last", "all"])
def test_vectorised_equals_reference(shape: tuple[int, ...], iterations: int, gradient: str) -> None:
    u_hat = random_predictions(shape, seed=iterations).requires_grad_(True)
    generator = torch.Generator().manual_seed(100 + iterations)
    v_weight = torch.randn(shape[0], shape[2], shape[3], dtype=torch.float64, generator=generator)
    c_weight = torch.randn(shape[:3], dtype=torch.float64, generator=generator)

    def value_and_gradient(routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v, c = routing(u_hat, iterations, gradient=gradient)
        # A random scalar function of both outputs; with gradient="last" c is a constant.
        objective = (v * v_weight).sum() + (v.square() * v_weight).sum() + (c * c_weight).sum()
        (grad,) = torch.autograd.grad(objective, u_hat)
        return v.detach(), c.detach(), grad

    v, c, grad = value_and_gradient(dynamic_routing)
    v_ref, c_ref, grad_ref = value_and_gradient(dynamic_routing_reference)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-12)


def test_gradient_modes_differ_only_when_routing() -> None:
    u_hat = random_predictions((2, 4, 3, 5), seed=3).requires_grad_(True)
    weight = random_predictions((2, 3, 5), seed=4)
    grads = {}
    for iterations in (1, 3):
        for gradient in ("last", "all"):
            v, c = dynamic_routing(u_hat, iterations, gradient=gradient)
            assert c.requires_grad == (gradient == "all" and iterations > 1)
            (grads[iterations, gradient],) = torch.autograd.grad((v * weight).sum(), u_hat)
    torch.testing.assert_close(grads[1, "last"], grads[1, "all"])
    assert not torch.allclose(grads[3, "last"], grads[3, "all"])


def agreement_example() -> torch.Tensor:
    """20 children: for parent 0 all but two predict the same vector, for parent 1 they scatter.

    Every prediction has length 1, so the only difference between the parents is agreement.
    """
    gen = torch.Generator().manual_seed(5)
    agreed = torch.nn.functional.normalize(torch.randn(8, dtype=torch.float64, generator=gen), dim=0)
    u_hat = torch.empty(1, 20, 2, 8, dtype=torch.float64)
    u_hat[0, :, 0] = agreed
    u_hat[0, :2, 0] = -agreed  # two dissenters
    u_hat[0, :, 1] = torch.nn.functional.normalize(
        torch.randn(20, 8, dtype=torch.float64, generator=gen), dim=1
    )
    return u_hat


def test_agreement_raises_coupling_to_agreeing_parent() -> None:
    u_hat = agreement_example()
    couplings = [dynamic_routing(u_hat, r)[1][0, :, 0] for r in (1, 2, 3, 4)]
    torch.testing.assert_close(couplings[0], torch.full((20,), 0.5, dtype=torch.float64))
    agreeing = couplings[-1][2:]
    assert (agreeing > 0.6).all()
    # More iterations route more of each agreeing child to parent 0 ...
    for before, after in zip(couplings, couplings[1:], strict=False):
        assert (after[2:] > before[2:]).all()
    # ... and less of the two dissenters, whose prediction points the other way.
    assert (couplings[-1][:2] < 0.5).all()
    # The agreeing parent ends up longer (more likely present) than the scattered one.
    v, _ = dynamic_routing(u_hat, 3)
    lengths = v[0].norm(dim=-1)
    assert lengths[0] > lengths[1]


def test_routing_is_independent_per_example() -> None:
    u_hat = random_predictions((4, 6, 3, 5), seed=6)
    v, c = dynamic_routing(u_hat, 3)
    perm = torch.tensor([2, 0, 3, 1])
    v_perm, c_perm = dynamic_routing(u_hat[perm], 3)
    torch.testing.assert_close(v_perm, v[perm])
    torch.testing.assert_close(c_perm, c[perm])
    # A batch of 2 equals two batches of 1: no routing logits are shared across the batch.
    v_pair, c_pair = dynamic_routing(u_hat[:2], 3)
    for n in range(2):
        v_one, c_one = dynamic_routing(u_hat[n : n + 1], 3)
        torch.testing.assert_close(v_pair[n : n + 1], v_one)
        torch.testing.assert_close(c_pair[n : n + 1], c_one)


def test_uniform_coupling_ignores_agreement() -> None:
    u_hat = agreement_example()
    for iterations in (1, 3):
        v, c = dynamic_routing(u_hat, iterations, coupling="uniform")
        torch.testing.assert_close(c, torch.full_like(c, 0.5))
        v_one, _ = dynamic_routing(u_hat, 1)
        torch.testing.assert_close(v, v_one)
    torch.testing.assert_close(
        fixed_couplings(u_hat, "uniform"), torch.full((1, 20, 2), 0.5, dtype=torch.float64)
    )


def test_random_coupling_is_reproducible_and_normalised() -> None:
    u_hat = random_predictions((3, 7, 4, 2), seed=7)
    v1, c1 = dynamic_routing(u_hat, coupling="random", generator=torch.Generator().manual_seed(8))
    v2, c2 = dynamic_routing(u_hat, coupling="random", generator=torch.Generator().manual_seed(8))
    _, c3 = dynamic_routing(u_hat, coupling="random", generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert not torch.allclose(c1, c3)
    assert c1.dtype == u_hat.dtype and c1.shape == (3, 7, 4)
    torch.testing.assert_close(c1.sum(dim=2), torch.ones(3, 7, dtype=torch.float64))
    assert c1.std() > 0.05  # not uniform
    torch.testing.assert_close(v1, squash(torch.einsum("bij,bijd->bjd", c1, u_hat)))


@pytest.mark.parametrize("iterations", [0, -1, 1.5, True, "3"])
def test_rejects_bad_iterations(iterations: object) -> None:
    u_hat = random_predictions((1, 2, 3, 4))
    with pytest.raises(ValueError, match=rf"iterations must be an integer >= 1, got {iterations!r}"):
        dynamic_routing(u_hat, iterations)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(2, 3, 4), (5,), (1, 2, 3, 4, 5)], ids=str)
def test_rejects_wrong_rank(shape: tuple[int, ...]) -> None:
    with pytest.raises(
        ValueError, match=rf"\(batch, in_caps, out_caps, out_dim\).*got {len(shape)} dimensions"
    ):
        dynamic_routing(torch.zeros(shape))


def test_rejects_non_float_predictions() -> None:
    with pytest.raises(TypeError, match=r"floating point, got dtype torch\.int64"):
        dynamic_routing(torch.zeros(1, 2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"torch\.Tensor, got list"):
        dynamic_routing([[[[0.0]]]])  # type: ignore[arg-type]


def test_rejects_bad_mode_strings() -> None:
    u_hat = random_predictions((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"gradient must be 'last' or 'all', got 'first'"):
        dynamic_routing(u_hat, gradient="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'dynamic', 'uniform' or 'random', got 'agreement'"):
        dynamic_routing(u_hat, coupling="agreement")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'uniform' or 'random', got 'dynamic'"):
        fixed_couplings(u_hat, "dynamic")  # type: ignore[arg-type]


def test_without_squash_the_parents_are_the_weighted_sums():
    u_hat = torch.randn(3, 7, 4, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 1, squashed=False)  # one iteration: uniform couplings 1/4
    assert torch.allclose(c, torch.full_like(c, 0.25))
    assert torch.allclose(v, u_hat.sum(dim=1) / 4)
    v3, _ = dynamic_routing(u_hat, 3, squashed=False)
    squashed, _ = dynamic_routing(u_hat, 3)
    assert not torch.allclose(v3, squashed)
    for coupling in ("uniform", "random"):
        v, c = dynamic_routing(u_hat, coupling=coupling, squashed=False, generator=torch.Generator())
        assert torch.allclose(v, torch.einsum("bij,bijd->bjd", c, u_hat))


def test_random_couplings_are_drawn_on_the_generators_device(monkeypatch) -> None:
    # A CUDA generator cannot draw CPU numbers (and vice versa): the draw must happen where the
    # generator lives, whatever device the predictions are on. Checked on the CPU by recording
    # the device torch.randn is asked for.
    u_hat = random_predictions((2, 5, 3, 4), seed=7)
    asked = []
    randn = torch.randn

    def recording_randn(*args, **kwargs):
        asked.append(torch.device(kwargs.get("device") or "cpu"))
        return randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", recording_randn)
    first = fixed_couplings(u_hat, "random", torch.Generator().manual_seed(0))
    again = fixed_couplings(u_hat, "random", torch.Generator().manual_seed(0))
    assert asked == [torch.device("cpu")] * 2
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first.sum(dim=-1), torch.ones(2, 5, dtype=u_hat.dtype))
