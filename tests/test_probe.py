"""The linear probe: a ridge read-out, its dual form, and a strength chosen without the test rows."""

import pytest
import torch

from capsnet.probe import readout_error, ridge_readout


def _data(n=60, d=8, noise=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    y = x @ w + 1.5 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def test_a_linear_quantity_is_read_back_exactly():
    x, y = _data()
    read = ridge_readout(x[:40], y[:40], 1e-10)
    assert torch.allclose(read(x[40:]), y[40:], atol=1e-6)


def test_the_dual_form_is_the_primal_ridge_on_standardised_features():
    x, y = _data(n=30, d=12, noise=0.3)
    strength = 0.05
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    lam = strength * (z * z).sum() / len(z)
    w = torch.linalg.solve(z.T @ z + lam * torch.eye(12, dtype=z.dtype), z.T @ (y - y.mean()))
    new = _data(n=5, d=12, seed=1)[0]
    expected = ((new - mean) / std) @ w + y.mean()
    assert torch.allclose(ridge_readout(x, y, strength)(new), expected, atol=1e-10)


def _manual_cv_choice(x, y, strengths, groups, folds=5):
    def cv(s):
        total = 0.0
        for k in range(folds):
            held = groups % folds == k
            total += (ridge_readout(x[~held], y[~held], s)(x[held]) - y[held]).pow(2).sum().item()
        return total

    return min(strengths, key=cv)


@pytest.mark.parametrize("grouped", [False, True])
def test_several_strengths_are_chosen_by_cross_validation_on_the_fitted_rows(grouped):
    x, y = _data(n=40, d=30, noise=1.0)
    test_x, test_y = _data(n=20, d=30, noise=1.0, seed=3)
    strengths = (1e-6, 1e-2, 1.0, 100.0)
    groups = torch.arange(40) // 4 if grouped else None
    best = _manual_cv_choice(x, y, strengths, torch.arange(40) if groups is None else groups)
    expected = (ridge_readout(x, y, best)(test_x) - test_y).pow(2).mean().sqrt().item()
    assert readout_error(x, y, test_x, test_y, strengths, groups=groups) == pytest.approx(expected, rel=1e-12)
    # the test rows take no part in the choice: other test values, the same strength
    other_y = test_y + torch.randn(20, dtype=torch.float64)
    expected_other = (ridge_readout(x, y, best)(test_x) - other_y).pow(2).mean().sqrt().item()
    assert readout_error(x, y, test_x, other_y, strengths, groups=groups) == pytest.approx(
        expected_other, rel=1e-12
    )


def test_one_strength_is_used_as_given():
    x, y = _data(noise=0.5)
    expected = (ridge_readout(x[:40], y[:40], 0.3)(x[40:]) - y[40:]).pow(2).mean().sqrt().item()
    assert readout_error(x[:40], y[:40], x[40:], y[40:], (0.3,)) == pytest.approx(expected)


def test_bad_input_is_refused_with_a_reason():
    x, y = _data()
    with pytest.raises(ValueError, match="expected x"):
        ridge_readout(x, y[:-1], 0.1)
    with pytest.raises(ValueError, match="strength must be positive"):
        ridge_readout(x, y, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        readout_error(x, y, x, y, ())
    with pytest.raises(ValueError, match="one label per training row"):
        readout_error(x, y, x, y, (0.1, 1.0), groups=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 5 groups"):
        readout_error(x, y, x, y, (0.1, 1.0), groups=torch.arange(60) % 3)
