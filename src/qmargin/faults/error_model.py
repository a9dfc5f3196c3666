"""`BitErrorModel`: which stored bits fail, and how (design.md §2).

A model of the memory a quantized network is deployed on. For every selected stored tensor (integer
codes in b-bit words, bit 0 = LSB):

* random bit errors: a stored 0 reads as 1 with probability ``p01`` and a stored 1 as 0 with
  probability ``p10``, independently per bit; both default to the symmetric bit error rate ``ber``;
* stuck-at faults: each bit is independently stuck at 0 with probability ``stuck_at_0`` and at 1 with
  probability ``stuck_at_1`` (``stuck_at_0 + stuck_at_1 <= 1``); a stuck bit reads its stuck value
  whatever was written or flipped (stuck-at acts after the random flips);
* ``protected_bits``: bit positions no fault reaches (e.g. ECC-protected sign bits); negative
  positions count from the most significant bit (``-1`` = bit b-1, the sign of a symmetric code).

Selection: a quantized module named ``name`` is hit when ``name`` matches one of the glob patterns
``layers`` and none of ``exclude`` (``fnmatch``, case-sensitive; the root module is ``""``), and, if
``layer_types`` is given, its class or one of its base classes has one of those names
(``"QuantConv2d"``, ``"Conv2d"``, ``"Linear"``, ...). Of such a module, the stored tensors named in
``tensors`` are hit (default: the weights, ``WEIGHT_TENSORS``; ``("weight", "bias")`` adds biases stored
as codes); ``tensors=None`` hits every tensor the module stores as codes (MonDEQ layers store ``W``,
``U``, ``b``). Tensors a module keeps in
float are never hit: only codes are stored bits.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from qmargin.errors import ConfigError

__all__ = ["BitErrorModel", "WEIGHT_TENSORS"]

WEIGHT_TENSORS: tuple[str, ...] = ("weight", "W", "U")
"""The stored tensors that count as weights: ``weight`` of Linear/Conv layers, ``W`` and ``U`` of MonDEQ
layers. Biases (``bias``, MonDEQ ``b``) are hit only when named or with ``tensors=None``."""


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value}")
    return value


def _names(name: str, value: Any, *, allow_empty: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a list of strings, got {value!r}") from None
    if not all(isinstance(v, str) and v for v in out):
        raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
    if not out and not allow_empty:
        raise ConfigError(f"{name} must not be empty")
    return out


@dataclass(frozen=True)
class BitErrorModel:
    """Bit errors on the stored codes of a quantized model.

    Args:
        ber: bit error rate p; every exposed bit flips independently with probability p.
        p01: probability that a stored 0 reads as 1 (default ``ber``).
        p10: probability that a stored 1 reads as 0 (default ``ber``).
        stuck_at_0: probability that a bit is stuck at 0.
        stuck_at_1: probability that a bit is stuck at 1 (``stuck_at_0 + stuck_at_1 <= 1``).
        protected_bits: bit positions (0 = LSB; negative from the MSB) that no fault reaches.
        layers: glob patterns of module names to hit (default ``("*",)``: every quantized module).
        exclude: glob patterns of module names to spare.
        layer_types: class names (or classes) to hit; ``None`` = any. A name matches the module's
            class or any base class, so ``"Conv2d"`` matches ``QuantConv2d``.
        tensors: names of stored tensors to hit (default :data:`WEIGHT_TENSORS`: the weights of
            ``nn``-style layers and the ``W``, ``U`` of MonDEQ layers, no biases); ``None`` = all of them.

    Strings are accepted where a tuple is expected (``layers="fc"``). Values are validated and
    normalised on construction; mistakes raise :class:`qmargin.errors.ConfigError` (a ``ValueError``).
    """

    ber: float = 0.0
    p01: float | None = None
    p10: float | None = None
    stuck_at_0: float = 0.0
    stuck_at_1: float = 0.0
    protected_bits: tuple[int, ...] = ()
    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] | None = None
    tensors: tuple[str, ...] | None = WEIGHT_TENSORS

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "ber", _rate("ber", self.ber))
        for name in ("p01", "p10"):
            value = getattr(self, name)
            put(self, name, None if value is None else _rate(name, value))
        put(self, "stuck_at_0", _rate("stuck_at_0", self.stuck_at_0))
        put(self, "stuck_at_1", _rate("stuck_at_1", self.stuck_at_1))
        if self.stuck_at_0 + self.stuck_at_1 > 1.0 + 1e-12:
            raise ConfigError(
                f"stuck_at_0 + stuck_at_1 must be <= 1, got {self.stuck_at_0} + {self.stuck_at_1}"
            )
        protected = self.protected_bits
        if isinstance(protected, int):
            protected = (protected,)
        try:
            protected = tuple(protected)
        except TypeError:
            raise ConfigError(f"protected_bits must be a list of bit positions, got {protected!r}") from None
        for k in protected:
            if isinstance(k, bool) or not isinstance(k, int) or not -8 <= k <= 7:
                raise ConfigError(f"protected bit positions must be integers in -8..7, got {k!r}")
        put(self, "protected_bits", tuple(sorted(set(protected))))
        put(self, "layers", _names("layers", self.layers))
        put(self, "exclude", _names("exclude", self.exclude, allow_empty=True))
        if self.layer_types is not None:
            types = self.layer_types
            if isinstance(types, str | type):
                types = (types,)
            try:
                types = tuple(t.__name__ if isinstance(t, type) else t for t in types)
            except TypeError:
                raise ConfigError(f"layer_types must be a list of class names, got {types!r}") from None
            put(self, "layer_types", _names("layer_types", types))
        if self.tensors is not None:
            put(self, "tensors", _names("tensors", self.tensors))

    # -- rates --------------------------------------------------------------------------------
    @property
    def rate_01(self) -> float:
        """Probability that a stored 0 reads as 1: ``p01`` if given, else ``ber``."""
        return self.ber if self.p01 is None else self.p01

    @property
    def rate_10(self) -> float:
        """Probability that a stored 1 reads as 0: ``p10`` if given, else ``ber``."""
        return self.ber if self.p10 is None else self.p10

    @property
    def flips(self) -> bool:
        """True when random bit flips can happen."""
        return self.rate_01 > 0.0 or self.rate_10 > 0.0

    @property
    def stuck(self) -> bool:
        """True when stuck-at faults can happen."""
        return self.stuck_at_0 > 0.0 or self.stuck_at_1 > 0.0

    @property
    def is_null(self) -> bool:
        """True when no bit can change."""
        return not (self.flips or self.stuck)

    def with_ber(self, ber: float) -> BitErrorModel:
        """The same model at another symmetric bit error rate (``p01``/``p10`` overrides kept)."""
        return replace(self, ber=ber)

    # -- selection ----------------------------------------------------------------------------
    def selects_layer(self, name: str, module: nn.Module) -> bool:
        """Whether the module ``name`` is hit (globs and types only; tensors are separate)."""
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.layers):
            return False
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
            return False
        if self.layer_types is not None:
            mro = {cls.__name__ for cls in type(module).__mro__}
            return any(t in mro for t in self.layer_types)
        return True

    def selects_tensors(self, stored: Iterable[str]) -> list[str]:
        """The names among ``stored`` (a module's ``quant_specs``) that are hit, in their order."""
        stored = list(stored)
        if self.tensors is None:
            return stored
        return [t for t in stored if t in self.tensors]

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BitErrorModel:
        """Build from :meth:`to_dict` output; unknown keys raise ``ConfigError``."""
        if not isinstance(d, dict):
            raise ConfigError(f"a bit error model must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown bit error model keys {unknown}; known: {sorted(known)}")
        return cls(**d)
