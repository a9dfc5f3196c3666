"""`Selection`: *where* faults strike — which layers, which stored tensors, which bit positions.

The other half of an error model, *what* happens to the selected bits, is a list of fault kinds
(:mod:`qmargin.faults.kinds`). :func:`qmargin.faults.inject` asks the selection which
``(layer, tensor)`` pairs to corrupt and which bit positions to spare, then applies the kinds.

A quantized module named ``name`` is selected when ``name`` matches one of the glob patterns
``layers`` and none of ``exclude`` (``fnmatch``, case-sensitive; the root module is ``""``), and, if
``layer_types`` is given, its class or one of its base classes has one of those names
(``"QuantConv2d"``, ``"Conv2d"``, ``"Linear"``, ...). Of such a module, the stored tensors named in
``tensors`` are selected (default: the weights, :data:`WEIGHT_TENSORS`; ``("weight", "bias")`` adds
biases stored as codes); ``tensors=None`` selects every tensor the module stores as codes (MonDEQ
layers store ``W``, ``U``, ``b``). Tensors a module keeps in float are never selected: only codes
are stored bits.

A stored tensor reachable under several names (one module registered twice, a tied Parameter;
:func:`qmargin.quant.tied_stored_tensors`) is one memory: it is hit when one of its names is selected
and none is excluded (:meth:`Selection.selects_stored`).

``protected_bits`` are bit positions no fault reaches (e.g. ECC-protected sign bits): ``0..b-1``
(bit 0 = LSB) or negative, counted from the most significant bit (``-1`` = bit ``b-1``, the sign of a
symmetric code). They are checked against each tensor's width when it is corrupted
(:func:`qmargin.quant.codes.protected_positions`); here only the range ``-8..7`` of 8-bit words.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from qmargin.errors import ConfigError

__all__ = ["Selection", "WEIGHT_TENSORS"]

WEIGHT_TENSORS: tuple[str, ...] = ("weight", "W", "U")
"""The stored tensors that count as weights: ``weight`` of Linear/Conv layers, ``W`` and ``U`` of MonDEQ
layers. Biases (``bias``, MonDEQ ``b``) are hit only when named or with ``tensors=None``."""


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


def _protected(value: Any) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    try:
        protected = tuple(value)
    except TypeError:
        raise ConfigError(f"protected_bits must be a list of bit positions, got {value!r}") from None
    for k in protected:
        if isinstance(k, bool) or not isinstance(k, int) or not -8 <= k <= 7:
            raise ConfigError(f"protected bit positions must be integers in -8..7, got {k!r}")
    return tuple(sorted(set(protected)))


@dataclass(frozen=True)
class Selection:
    """Which stored bits of a quantized model faults can reach (module docstring).

    Args:
        layers: glob patterns of module names to hit (default ``("*",)``: every quantized module).
        exclude: glob patterns of module names to spare.
        layer_types: class names (or classes) to hit; ``None`` = any. A name matches the module's
            class or any base class, so ``"Conv2d"`` matches ``QuantConv2d``.
        tensors: names of stored tensors to hit (default :data:`WEIGHT_TENSORS`); ``None`` = all.
        protected_bits: bit positions (0 = LSB; negative from the MSB) that no fault reaches.

    Strings are accepted where a tuple is expected (``layers="fc"``); values are validated and
    normalised on construction (``protected_bits`` sorted, without duplicates); mistakes raise
    :class:`qmargin.errors.ConfigError`.
    """

    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] | None = None
    tensors: tuple[str, ...] | None = WEIGHT_TENSORS
    protected_bits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "protected_bits", _protected(self.protected_bits))
        put(self, "layers", _names("layers", self.layers))
        put(self, "exclude", _names("exclude", self.exclude, allow_empty=True))
        if self.layer_types is not None:
            types: Any = self.layer_types
            if isinstance(types, str | type):
                types = (types,)
            try:
                types = tuple(t.__name__ if isinstance(t, type) else t for t in types)
            except TypeError:
                raise ConfigError(f"layer_types must be a list of class names, got {types!r}") from None
            put(self, "layer_types", _names("layer_types", types))
        if self.tensors is not None:
            put(self, "tensors", _names("tensors", self.tensors))

    def selects_layer(self, name: str, module: nn.Module) -> bool:
        """Whether the module ``name`` is hit (globs and types only; tensors are separate)."""
        return self.includes_layer(name, module) and not self.excludes(name)

    def includes_layer(self, name: str, module: nn.Module) -> bool:
        """Whether ``name`` matches ``layers`` and the module ``layer_types`` (``exclude`` aside)."""
        if not any(fnmatch.fnmatchcase(name, pat) for pat in self.layers):
            return False
        if self.layer_types is not None:
            mro = {cls.__name__ for cls in type(module).__mro__}
            return any(t in mro for t in self.layer_types)
        return True

    def excludes(self, name: str) -> bool:
        """Whether ``name`` matches one of the ``exclude`` patterns."""
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude)

    def selects_stored(self, names: Iterable[tuple[str, nn.Module, str]]) -> bool:
        """Whether a stored tensor reachable under several names (a tie) is hit.

        ``names``: ``(layer, module, tensor)`` for each of its names. It is hit when one of them is
        included (``layers``, ``layer_types``, ``tensors``) and none is excluded: a tied tensor is one
        memory, spared when any of its names is excluded. For one name this is ``selects_layer`` and
        ``selects_tensors``.
        """
        names = list(names)
        if any(self.excludes(n) for n, _, _ in names):
            return False
        return any(self.includes_layer(n, m) and self.selects_tensors([t]) for n, m, t in names)

    def selects_tensors(self, stored: Iterable[str]) -> list[str]:
        """The names among ``stored`` (a module's ``quant_specs``) that are hit, in their order."""
        stored = list(stored)
        if self.tensors is None:
            return stored
        return [t for t in stored if t in self.tensors]

    def describe(self) -> str:
        """``layers=[...], exclude=[...], layer_types=..., tensors=...`` (for error messages)."""
        return (
            f"layers={list(self.layers)}, exclude={list(self.exclude)}, "
            f"layer_types={self.layer_types}, tensors={self.tensors}"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``Selection(**to_dict())`` round-trips."""
        return {
            "layers": list(self.layers),
            "exclude": list(self.exclude),
            "layer_types": None if self.layer_types is None else list(self.layer_types),
            "tensors": None if self.tensors is None else list(self.tensors),
            "protected_bits": list(self.protected_bits),
        }
