"""Confidence intervals of a mean over error patterns (Student t), without scipy.

A campaign stores per BER the mean ``a_bar`` of its ``n`` pattern values and their *population*
standard deviation ``s0 = sqrt(mean_r (a_r - a_bar)^2)`` (``ddof = 0``, :mod:`qmargin.engine.store`).
The two-sided ``level`` confidence interval of the mean (patterns independent, values roughly
normal) is

    a_bar ± t_{n-1, (1 + level) / 2} · s / sqrt(n),   s = s0 · sqrt(n / (n - 1))  (sample std, ddof 1)
          = a_bar ± t_{n-1, (1 + level) / 2} · s0 / sqrt(n - 1).

:func:`mean_confidence_interval` is the one place qmargin computes it; the HTML report
(:mod:`qmargin.report.html`) shows it in its tables and as error bars on its plots. The quantile of
Student's t distribution is computed here (:func:`student_t_quantile`: the regularized incomplete
beta function by its continued fraction, inverted by bisection; accurate to about 1e-12, checked
against ``scipy.stats.t.ppf`` in the tests), so the library needs no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np

__all__ = [
    "mean_confidence_interval",
    "mean_halfwidth",
    "paired_difference",
    "summarize_accuracies",
    "student_t_quantile",
    "student_t_cdf",
    "CI_LEVEL",
]

CI_LEVEL = 0.95
"""The confidence level the report uses."""


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for
    ``x < (a + 1) / (a + b + 2)``."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _central(t: float, df: float) -> float:
    """``P(|T| < t)`` for ``t >= 0``: ``I_{t^2/(df+t^2)}(1/2, df/2)``."""
    return _betainc(0.5, df / 2.0, t * t / (df + t * t))


def _upper(t: float, df: float) -> float:
    """``P(T > t)`` for ``t >= 0``: ``I_{df/(df+t^2)}(df/2, 1/2) / 2``."""
    return 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t distribution with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    a = abs(t)
    if a * a < df:  # near the centre: no cancellation in 1/2 + P(|T| < a)/2
        half = 0.5 * _central(a, df)
        return 0.5 + half if t >= 0 else 0.5 - half
    tail = _upper(a, df)
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=1024)
def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df > 0`` degrees of freedom
    (``student_t_quantile(0.975, 9) = 2.2621571...``)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    # solve P(|T| < t) = 2p - 1 near the centre, P(T > t) = 1 - p in the tail (each computed
    # without cancellation); both decrease / increase monotonically in t, so bisection converges
    if p <= 0.75:
        target, below = 2.0 * p - 1.0, lambda t: _central(t, df) < target
    else:
        target, below = 1.0 - p, lambda t: _upper(t, df) > target
    lo, hi = 0.0, 1.0
    while below(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            return math.inf
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if below(mid):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_confidence_interval(
    mean: float, std: float, n: int, *, level: float = CI_LEVEL
) -> tuple[float, float] | None:
    """The two-sided ``level`` Student-t confidence interval ``(low, high)`` of a mean over ``n``
    patterns whose population standard deviation (``ddof = 0``, as result files store it) is ``std``;
    ``None`` for ``n < 2`` (one pattern says nothing about the spread). Not clipped to ``[0, 1]``."""
    if n < 2:
        return None
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    half = student_t_quantile((1.0 + level) / 2.0, n - 1) * float(std) / math.sqrt(n - 1)
    return float(mean) - half, float(mean) + half


def summarize_accuracies(accuracies: Sequence[float]) -> dict[str, float]:
    """``mean``, population ``std`` (ddof 0), ``min``, ``max`` of per-pattern values (float64): the
    summary a campaign result stores per BER."""
    a = np.asarray(accuracies, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no accuracies to summarize")
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def mean_halfwidth(values: Sequence[float], *, level: float = CI_LEVEL) -> float | None:
    """Half the width of the ``level`` confidence interval of the mean of ``values``
    (:func:`mean_confidence_interval` of their :func:`summarize_accuracies`); ``None`` for fewer than 2."""
    if len(values) < 2:
        return None
    s = summarize_accuracies(values)
    ci = mean_confidence_interval(s["mean"], s["std"], len(values), level=level)
    assert ci is not None
    return (ci[1] - ci[0]) / 2.0


def paired_difference(
    reference: Mapping[int, float], other: Mapping[int, float], *, level: float = CI_LEVEL
) -> dict[str, float | int | None] | None:
    """The mean paired difference ``d_bar = (1/n) sum_s (b_s - a_s)`` over the pattern seeds ``s``
    both campaigns hold (``reference`` = ``{seed: a_s}``, ``other`` = ``{seed: b_s}``), with its
    ``level`` Student-t confidence interval (paired t: :func:`mean_confidence_interval` of the
    differences, ``n - 1`` degrees of freedom). Same seed = same error pattern where the two models
    store codes of the same shapes, so the differences cancel the pattern-to-pattern spread both
    share. ``{"n", "mean", "ci_low", "ci_high"}`` (``ci_*`` ``None`` for one shared seed); ``None``
    when no seed is shared."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None
    diffs = [float(other[s]) - float(reference[s]) for s in seeds]
    summary = summarize_accuracies(diffs)
    ci = mean_confidence_interval(summary["mean"], summary["std"], len(diffs), level=level)
    return {
        "n": len(diffs),
        "mean": summary["mean"],
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
    }
