"""`QuantSpec`: how a tensor is stored in low-precision memory (design.md §1)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from qmargin.quant.codes import DEFAULT_STORAGE, StorageFormat, check_storage
from qmargin.quant.errors import QuantConfigError


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
        storage: how a symmetric code is laid out in its word in memory (docs/bit-conventions.md):
            ``"twos"`` (two's complement, the default), ``"offset"`` (offset binary ``code + 2**(b-1)``,
            unsigned, as Stutz et al. store codes) or ``"sign_magnitude"``. The codes, and so the
            clean model, are the same in every format; what a bit error does to a code differs.
            Asymmetric codes are plain unsigned words: they take ``"twos"`` only (the default).
        saturate: saturating decode: a corrupted word that decodes outside ``[-qmax, qmax]`` reads
            as the nearest end of it (only the word of ``-2**(b-1)`` can).

    Every field is type-checked on construction: ``bits`` an ``int`` (not a ``bool``), ``symmetric``
    and ``per_channel`` a ``bool`` (not a truthy string or int), ``w_max`` ``None`` or a finite
    positive real (stored as ``float``), ``storage`` one of :data:`qmargin.quant.codes.STORAGE_FORMATS`
    (``"sign-magnitude"`` is read as ``"sign_magnitude"``), ``saturate`` a ``bool``. Mistakes raise
    :class:`qmargin.quant.errors.QuantConfigError`.
    """

    bits: int
    symmetric: bool = True
    per_channel: bool = False
    w_max: float | None = None
    storage: StorageFormat = DEFAULT_STORAGE
    saturate: bool = False

    def __post_init__(self) -> None:
        # Every field is checked for its type, not its truthiness: ``symmetric="no"`` is a mistake,
        # not True. Mistakes raise QuantConfigError (a ValueError).
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise QuantConfigError(
                f"bits must be an integer in 1..8 (1..16 for precision studies), got {self.bits!r}"
            )
        if not 1 <= self.bits <= 16:
            raise QuantConfigError(
                f"bits must be in 1..8 for stored weights (1..16 for precision studies), got {self.bits}"
            )
        for name in ("symmetric", "per_channel", "saturate"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise QuantConfigError(f"{name} must be True or False, got {value!r}")
        if self.bits == 1 and not self.symmetric:
            raise QuantConfigError("1-bit quantization is a symmetric sign code; asymmetric needs bits >= 2")
        if self.w_max is not None:
            w_max = self.w_max
            if isinstance(w_max, bool) or not isinstance(w_max, numbers.Real):
                raise QuantConfigError(f"w_max must be a positive finite number or None, got {w_max!r}")
            if not (math.isfinite(float(w_max)) and float(w_max) > 0):
                raise QuantConfigError(f"w_max must be positive and finite, got {w_max}")
            object.__setattr__(self, "w_max", float(w_max))
        try:
            object.__setattr__(self, "storage", check_storage(self.storage))
        except ValueError as e:
            raise QuantConfigError(str(e)) from None
        if not self.symmetric and self.storage != DEFAULT_STORAGE:
            raise QuantConfigError(
                f"storage {self.storage!r} is a format of symmetric codes; "
                "asymmetric codes are unsigned words"
            )

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
        """The fields as a dict; ``storage`` and ``saturate`` only when not the default, so specs
        written before they existed (which load as two's complement without saturation) and new
        default specs serialise alike."""
        out = asdict(self)
        if self.storage == DEFAULT_STORAGE:
            del out["storage"]
        if not self.saturate:
            del out["saturate"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; a non-mapping, a missing ``bits`` or an unknown key raises
        ``QuantConfigError`` (a ``ValueError``)."""
        if not isinstance(d, dict):
            raise QuantConfigError(f"a quantization spec must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known), key=str)
        if unknown:
            raise QuantConfigError(f"unknown quantization spec keys {unknown}; known: {known}")
        if "bits" not in d:
            raise QuantConfigError(f"a quantization spec needs 'bits', got {d!r}")
        return cls(**{k: d[k] for k in known if k in d})
