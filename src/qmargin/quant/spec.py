"""`QuantSpec`: how a tensor is stored in low-precision memory (design.md §1)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QuantSpec:
    """A uniform weight quantizer.

    Args:
        bits: word width b of one stored code. Weights in memory use 1..8 (what training, the
            stored integer state and the bit-error engine accept); 9..16 are allowed for precision
            studies such as the MonDEQ certificate sweeps (codes then are ``int16``/``int32``).
            ``bits=1`` is a binary sign code with a scale
            (symmetric only): ``code in {-1, +1}`` stored as one bit (1 = +1, 0 = -1).
        symmetric: two's-complement codes in ``[-qmax, qmax]``, ``qmax = 2**(b-1) - 1`` (narrow
            range) with zero point 0; otherwise unsigned codes in ``[0, 2**b - 1]`` with a zero point.
        per_channel: one scale (and zero point) per output channel (dim 0) instead of one per tensor.
        w_max: weight clipping. When set, the clip range is ``[-w_max, w_max]`` and
            ``scale = w_max / qmax`` instead of ``max|w| / qmax``.
    """

    bits: int
    symmetric: bool = True
    per_channel: bool = False
    w_max: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(
                f"bits must be an integer in 1..8 (1..16 for precision studies), got {self.bits!r}"
            )
        if not 1 <= self.bits <= 16:
            raise ValueError(
                f"bits must be in 1..8 for stored weights (1..16 for precision studies), got {self.bits}"
            )
        if self.bits == 1 and not self.symmetric:
            raise ValueError("1-bit quantization is a symmetric sign code; asymmetric needs bits >= 2")
        if self.w_max is not None and not (self.w_max > 0):
            raise ValueError(f"w_max must be positive, got {self.w_max}")

    @property
    def qmin(self) -> int:
        """Smallest code the quantizer produces (not the smallest the word can hold)."""
        if self.symmetric:
            return -1 if self.bits == 1 else -(2 ** (self.bits - 1) - 1)
        return 0

    @property
    def qmax(self) -> int:
        """Largest code the quantizer produces."""
        if self.symmetric:
            return 1 if self.bits == 1 else 2 ** (self.bits - 1) - 1
        return 2**self.bits - 1

    @property
    def levels(self) -> int:
        """Number of distinct values the quantizer produces."""
        return self.qmax - self.qmin + 1 if self.bits > 1 else 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        return cls(**{k: d[k] for k in ("bits", "symmetric", "per_channel", "w_max") if k in d})
