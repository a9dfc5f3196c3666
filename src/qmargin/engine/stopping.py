"""Sequential stopping: fewer patterns for the same confidence (``--ci-halfwidth``).

At each BER ``p`` the patterns ``r = 0, 1, 2, ...`` (seeds ``s_r = base_seed + r``, exactly those of
the fixed campaign, so a stopped BER is a prefix of the fixed run and stays paired with other models)
are added in checkpoints ``n_j = min(n_min + j s, R)``, ``j = 0, 1, ...`` (``R = repeats``, the cap;
``s`` the step, the campaign's patterns per pass). The BER stops at the first checkpoint where the
half-width of the ``level`` Student-t confidence interval of the mean over its ``n`` values is at most
``h`` (:func:`qmargin.stats.mean_confidence_interval`, ``t_{n-1} s_n / sqrt(n)`` with the sample
standard deviation ``s_n``), or at ``R``:

    n*(p) = min { n_j : halfwidth(a_0 .. a_{n_j - 1}) <= h  or  n_j = R }.

``n*`` depends on the values of that BER only, never on the order in which cells finish or on other
BERs, so a campaign with stopping gives the same result on one process, on Ray workers, and after an
interruption and resume (:func:`pending` recomputes everything from the stored values).

Caveat: the interval is computed after looking at the data (optional stopping), so its coverage is
only approximately the nominal ``level``; the minimum ``n_min`` (default 5) keeps the first, noisiest
estimates of the spread from stopping a BER early. When all patterns of a BER give the same value (a
BER of 0, or a model no error reaches) the half-width is 0 and the BER stops at ``n_min``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qmargin.errors import ConfigError
from qmargin.stats import CI_LEVEL, mean_halfwidth

__all__ = ["StoppingRule", "DEFAULT_MIN_PATTERNS"]

DEFAULT_MIN_PATTERNS = 5
"""The default minimum number of patterns per BER before the rule may stop it."""


@dataclass(frozen=True)
class StoppingRule:
    """Stop adding patterns at a BER once the CI half-width is at most ``halfwidth`` (module doc).

    ``halfwidth`` is in the units of the stored values (a fraction for the accuracies: 0.005 is half
    a percentage point); ``min_patterns`` is ``n_min``; ``step`` the patterns added per BER between
    two checks; ``level`` the confidence level."""

    halfwidth: float
    min_patterns: int = DEFAULT_MIN_PATTERNS
    step: int = 1
    level: float = CI_LEVEL

    def __post_init__(self) -> None:
        h = self.halfwidth
        if isinstance(h, bool) or not isinstance(h, int | float) or not math.isfinite(h) or h <= 0:
            raise ConfigError(f"the CI half-width must be a finite number > 0, got {h!r}")
        for name in ("min_patterns", "step"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} of the stopping rule must be an integer >= 1, got {v!r}")
        if self.min_patterns < 2:
            raise ConfigError(
                "min_patterns must be at least 2 (one pattern says nothing about the spread), "
                f"got {self.min_patterns}"
            )
        if not 0.0 < self.level < 1.0:
            raise ConfigError(f"the confidence level must be in (0, 1), got {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": "ci_halfwidth",
            "halfwidth": float(self.halfwidth),
            "min_patterns": self.min_patterns,
            "step": self.step,
            "level": self.level,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoppingRule:
        if d.get("rule") != "ci_halfwidth":
            raise ConfigError(f"unknown stopping rule {d.get('rule')!r}")
        return cls(float(d["halfwidth"]), int(d["min_patterns"]), int(d["step"]), float(d["level"]))

    def checkpoints(self, repeats: int) -> list[int]:
        """``n_0 < n_1 < ... = R``: the pattern counts at which the rule is checked."""
        out, n = [], min(self.min_patterns, repeats)
        while n < repeats:
            out.append(n)
            n += self.step
        return [*out, repeats]

    def halfwidth_of(self, values: Sequence[float]) -> float | None:
        """The CI half-width of the mean of ``values`` (``None`` for fewer than 2)."""
        return mean_halfwidth(values, level=self.level)

    def stop_point(self, prefix: Sequence[float], repeats: int) -> int | None:
        """``n*`` when the first ``len(prefix)`` values decide it, else ``None`` (more are needed)."""
        for n in self.checkpoints(repeats):
            if n > len(prefix):
                return None
            if n == repeats:
                return n
            hw = self.halfwidth_of(prefix[:n])
            if hw is not None and hw <= self.halfwidth:
                return n
        return None  # unreachable: the last checkpoint is repeats

    def next_checkpoint(self, done: int, repeats: int) -> int:
        """The first checkpoint above ``done`` patterns (``repeats`` at most)."""
        return next(n for n in self.checkpoints(repeats) if n > done)
