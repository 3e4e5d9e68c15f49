"""capsnet.stats: paired tests checked against textbook values, and the verdict vocabulary."""

from __future__ import annotations

import math

import pytest

from capsnet.stats import VERDICTS, PairedResult, mcnemar, paired_t, student_t_sf, verdict


@pytest.mark.parametrize(
    ("t", "df"),
    [(12.706, 1), (4.303, 2), (3.182, 3), (2.776, 4), (2.228, 10), (2.042, 30)],
)
def test_t_tail_matches_the_tables_two_sided_five_percent(t, df):
    assert 2 * student_t_sf(t, df) == pytest.approx(0.05, abs=2e-4)


def test_t_tail_is_symmetric_and_half_at_zero():
    assert student_t_sf(0.0, 5) == pytest.approx(0.5)
    assert student_t_sf(-1.3, 7) == pytest.approx(1 - student_t_sf(1.3, 7))
    # many degrees of freedom: the normal distribution (P(Z > 1.96) = 0.025)
    assert student_t_sf(1.959964, 1e6) == pytest.approx(0.025, abs=1e-5)


def test_mcnemar_counts_only_disagreements():
    # 25 vs 29 mistakes, 20 shared: a alone wrong on 5, b alone on 9 (chapter 9, exercise 2)
    a = [True] * 9946 + [False] * 20 + [False] * 5 + [True] * 9 + [True] * 20
    b = [True] * 9946 + [False] * 20 + [True] * 5 + [False] * 9 + [True] * 20
    result = mcnemar(a, b)
    expected = 2 * sum(math.comb(14, i) for i in range(6)) / 2**14
    assert result.p_value == pytest.approx(expected)
    assert result.difference == pytest.approx((9 - 5) / len(a)) and result.n == len(a)


def test_mcnemar_of_identical_models_finds_nothing():
    assert mcnemar([True, False, True], [True, False, True]).p_value == 1.0


def test_mcnemar_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        mcnemar([True], [True, False])


def test_paired_t_uses_the_t_distribution():
    a, b = [1.0, 2.0, 3.0], [1.5, 2.9, 3.7]  # differences 0.5, 0.9, 0.7: mean 0.7, sd 0.2
    result = paired_t(a, b)
    t = 0.7 / (0.2 / math.sqrt(3))
    assert result.difference == pytest.approx(0.7)
    assert result.p_value == pytest.approx(2 * student_t_sf(t, 2))
    low, high = result.interval
    assert (high - 0.7) == pytest.approx(4.303 * 0.2 / math.sqrt(3), rel=1e-3)
    assert low == pytest.approx(1.4 - high)


def test_paired_t_refuses_unpaired_or_single_runs():
    with pytest.raises(ValueError, match="pair every run"):
        paired_t([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t([1.0], [2.0])


def test_verdicts_come_from_the_fixed_vocabulary():
    better = PairedResult(difference=-0.01, p_value=0.001, n=3)
    assert verdict(better, claimed_sign=-1) == "supported"
    assert verdict(better, claimed_sign=+1) == "contradicted"
    assert verdict(PairedResult(-0.01, 0.2, 3), claimed_sign=-1) == "no detectable difference"
    assert verdict(None, claimed_sign=-1) == "not tested at this scale"
    assert {verdict(r, -1) for r in (better, None)} <= set(VERDICTS)
    with pytest.raises(ValueError, match="claimed_sign"):
        verdict(better, claimed_sign=0)


def test_a_margin_decides_between_no_difference_and_not_tested():
    narrow = PairedResult(difference=0.001, p_value=0.4, n=3, interval=(-0.002, 0.004))
    wide = PairedResult(difference=0.001, p_value=0.4, n=3, interval=(-0.02, 0.022))
    assert verdict(narrow, -1, margin=0.005) == "no detectable difference"
    assert verdict(wide, -1, margin=0.005) == "not tested at this scale"
    assert verdict(wide, -1) == "no detectable difference"  # without a margin
    significant = PairedResult(difference=-0.03, p_value=0.01, n=3, interval=(-0.05, -0.01))
    assert verdict(significant, -1, margin=0.005) == "supported"  # the margin only reads non-differences
    with pytest.raises(ValueError, match="needs a result with a confidence interval"):
        verdict(PairedResult(0.0, 1.0, 100), -1, margin=0.005)
