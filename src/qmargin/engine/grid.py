"""The grid of a campaign: cells ``(error model, BER p, pattern seed s_r)`` (design.md §4).

Seed scheme (paired comparisons, the protocol of Stutz et al., MLSys 2021): pattern ``r = 0 .. R-1``
uses the seed ``s_r = base_seed + r`` **at every BER and for every model**. ``qmargin.faults`` derives
the seed of each tensor from ``s_r`` and the tensor's identity, so two models with the same layer
names and shapes see exactly the same flipped bit positions, and their comparison is paired.

A cell is self-contained: its error model is the template with ``ber = p`` and its seed is ``s_r``;
nothing in it depends on the cells evaluated before (cells may run in any order, on any worker).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from qmargin.errors import ConfigError

__all__ = ["MAX_REPEATS", "MAX_SEED", "Cell", "Grid", "with_ber", "check_positive_int"]

#: Most patterns per BER a campaign accepts (a result holds one number per pattern and BER).
MAX_REPEATS = 100_000
#: Seeds are signed 64-bit integers in the samplers: ``base_seed + repeats - 1`` must stay below this.
MAX_SEED = 2**63


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (not a bool), or a one-line :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class Cell:
    """One evaluation of a campaign: BER index ``k`` (``ber = bers[k]``), pattern ``r``, seed ``s_r``."""

    k: int
    ber: float
    pattern: int
    seed: int


@dataclass(frozen=True)
class Grid:
    """The BER grid ``p_1 .. p_K`` (order kept, no duplicates, each finite in ``[0, 1]``) times
    ``R = repeats`` patterns (``1 <= R <= MAX_REPEATS``) seeded ``base_seed + r``
    (``0 <= base_seed``, ``base_seed + R - 1 < 2**63``). Construct with :meth:`make` (validates)."""

    bers: tuple[float, ...]
    repeats: int
    base_seed: int

    @classmethod
    def make(cls, bers: Sequence[float], repeats: int, base_seed: int) -> Grid:
        check_positive_int("repeats", repeats)
        if repeats > MAX_REPEATS:
            raise ConfigError(f"repeats must be at most {MAX_REPEATS}, got {repeats}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, int) or base_seed < 0:
            raise ConfigError(f"base_seed must be a non-negative integer, got {base_seed!r}")
        if base_seed + repeats - 1 >= MAX_SEED:
            raise ConfigError(f"base_seed + repeats - 1 must be below 2**63, got {base_seed + repeats - 1}")
        try:
            grid = [float(b) for b in bers]
        except (TypeError, ValueError):
            raise ConfigError(f"every BER must be a number, got {bers!r}") from None
        if not grid:
            raise ConfigError("the BER grid is empty")
        for b in grid:
            if not (math.isfinite(b) and 0.0 <= b <= 1.0):
                raise ConfigError(f"every BER must be in [0, 1], got {b}")
        if len(set(grid)) != len(grid):
            raise ConfigError(f"the BER grid has duplicates: {grid}")
        return cls(tuple(grid), repeats, base_seed)

    @property
    def seeds(self) -> list[int]:
        """``[base_seed + r for r in 0 .. R-1]``."""
        return [self.base_seed + r for r in range(self.repeats)]

    @property
    def size(self) -> int:
        """Number of cells with bit errors, ``K * R`` (the clean pass is not a cell)."""
        return len(self.bers) * self.repeats

    def cell(self, k: int, r: int) -> Cell:
        return Cell(k, self.bers[k], r, self.base_seed + r)

    def cells(self) -> Iterator[Cell]:
        """Every cell, BER-major (the order of a sequential run)."""
        for k in range(len(self.bers)):
            for r in range(self.repeats):
                yield self.cell(k, r)


def with_ber(template: Any, ber: float) -> Any:
    """The template error model with its BER replaced (``with_ber`` of an
    :class:`qmargin.faults.ErrorModelTemplate`, else ``dataclasses.replace(template, ber=ber)``)."""
    from qmargin.faults import ErrorModelTemplate

    if isinstance(template, ErrorModelTemplate):
        return template.with_ber(ber)
    return dataclasses.replace(template, ber=ber)
