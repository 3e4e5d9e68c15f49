"""Comparing trained models honestly: paired tests and a fixed vocabulary for verdicts.

Two models tested on the *same* images are compared image by image (McNemar's exact test on the
images where exactly one of them is wrong); several trainings (seeds) of two set-ups are compared
seed by seed with the paired t-test, using the t distribution: with 3 seeds a mean difference
must be 4.3 standard errors from zero for p < 0.05, not the 2 of the normal approximation.
A verdict is computed from a test, never chosen: one of :data:`VERDICTS`.

Plain Python on purpose (no SciPy): the t distribution's tail comes from the regularised
incomplete beta function, evaluated by its continued fraction (Numerical Recipes, section 6.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "VERDICTS",
    "PairedResult",
    "mcnemar",
    "paired_t",
    "student_t_sf",
    "verdict",
]

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NO_DIFFERENCE = "no detectable difference"
NOT_TESTED = "not tested at this scale"
VERDICTS = (SUPPORTED, CONTRADICTED, NO_DIFFERENCE, NOT_TESTED)


@dataclass(frozen=True)
class PairedResult:
    """``difference``: mean of b - a (for McNemar, b's mistakes minus a's, as a fraction of the
    images); ``p_value``: two-sided; ``n``: images (McNemar) or pairs of runs (t-test);
    ``interval``: 95% confidence interval of ``difference`` (t-test only)."""

    difference: float
    p_value: float
    n: int
    interval: tuple[float, float] | None = None


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> PairedResult:
    """McNemar's exact test for two models scored on the same images.

    Only the images where exactly one model is right carry information: if the models were
    equally good, each such image would be a's win or b's with probability 1/2 (a binomial test).
    ``difference`` is (b's errors - a's errors) / images: negative when b is better.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(
            f"the two models were scored on {len(correct_a)} and {len(correct_b)} images: a paired "
            "test needs the same images, in the same order, for both"
        )
    if not correct_a:
        raise ValueError("no images to compare")
    only_a = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if a and not b)
    only_b = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if b and not a)
    disagreements = only_a + only_b
    k = min(only_a, only_b)
    tail = sum(math.comb(disagreements, i) for i in range(k + 1)) / 2**disagreements
    p_value = min(1.0, 2 * tail) if disagreements else 1.0
    return PairedResult((only_a - only_b) / len(correct_a), p_value, len(correct_a))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t distribution with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def _t_quantile(q: float, df: float) -> float:
    """The t with P(T <= t) = q (bisection: plenty fast for confidence intervals)."""
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if 1.0 - student_t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired_t(a: Sequence[float], b: Sequence[float]) -> PairedResult:
    """Paired t-test of b - a over runs that share everything but the set-up (same seeds, same
    data, same test images): two-sided p-value and a 95% confidence interval of the mean
    difference, both from the t distribution with n - 1 degrees of freedom."""
    if len(a) != len(b):
        raise ValueError(
            f"{len(a)} runs against {len(b)}: pair every run of one set-up with one of the other"
        )
    if len(a) < 2:
        raise ValueError("a paired t-test needs at least 2 pairs of runs (3 or more to say much)")
    differences = [y - x for x, y in zip(a, b, strict=True)]
    n = len(differences)
    mean = sum(differences) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    if sd == 0.0:
        p_value = 1.0 if mean == 0.0 else 0.0
        return PairedResult(mean, p_value, n, (mean, mean))
    se = sd / math.sqrt(n)
    t = mean / se
    p_value = min(1.0, 2 * student_t_sf(abs(t), n - 1))
    half = _t_quantile(0.975, n - 1) * se
    return PairedResult(mean, p_value, n, (mean - half, mean + half))


def verdict(
    result: PairedResult | None, claimed_sign: int, alpha: float = 0.05, margin: float | None = None
) -> str:
    """The verdict on a claim that b - a has the sign ``claimed_sign`` (+1 or -1; e.g. -1 for
    "b makes fewer errors than a"): ``supported`` or ``contradicted`` when the test finds a
    difference at level ``alpha`` (in the claimed direction or against it), ``no detectable
    difference`` otherwise, and ``not tested at this scale`` when there is no result (``None``:
    the experiment was not run, or is too small to test the claim).

    ``margin`` (a difference fixed in advance, in the units of ``difference``): a result that
    finds no difference is ``no detectable difference`` only if its 95% interval also lies
    within ``(-margin, margin)``; a wider interval means the experiment could have missed a
    difference that large, and the verdict is ``not tested at this scale``. It needs a result
    with an interval (:func:`paired_t`).
    """
    if claimed_sign not in (1, -1):
        raise ValueError(f"claimed_sign must be +1 or -1, got {claimed_sign!r}")
    if result is None:
        return NOT_TESTED
    if result.p_value >= alpha or result.difference == 0:
        if margin is None:
            return NO_DIFFERENCE
        if result.interval is None:
            raise ValueError("a margin needs a result with a confidence interval (paired_t's)")
        low, high = result.interval
        return NO_DIFFERENCE if -margin < low and high < margin else NOT_TESTED
    return SUPPORTED if math.copysign(1, result.difference) == claimed_sign else CONTRADICTED
