"""Error models: *where* faults strike (a :class:`Selection`) composed with *what* they do (fault kinds).

:class:`BitErrorModel` is the user-facing model of the memory a quantized network is deployed on.
For every selected stored tensor (integer codes in b-bit words, bit 0 = LSB):

* random bit errors (kind ``"flips"``, :class:`RandomFlips`): a stored 0 reads as 1 with probability
  ``p01`` and a stored 1 as 0 with probability ``p10``, independently per bit; both default to the
  symmetric bit error rate ``ber``;
* stuck-at faults (kind ``"stuck_at"``, :class:`StuckAt`): each bit is independently stuck at 0 with
  probability ``stuck_at_0`` and at 1 with probability ``stuck_at_1`` (``stuck_at_0 + stuck_at_1 <=
  1``); a stuck bit reads its stuck value whatever was written or flipped (stuck-at acts after the
  random flips);
* ``protected_bits``: bit positions no fault reaches (e.g. ECC-protected sign bits); negative
  positions count from the most significant bit (``-1`` = bit b-1, the sign of a symmetric code);
* ``storage`` / ``saturate``: the memory's word format and decode, overriding those of each
  tensor's :class:`qmargin.quant.QuantSpec` (``None``: the spec's own; docs/bit-conventions.md);
* ``nested_max``: nested patterns (the random flips at every rate ``<= nested_max`` of one seed are
  nested, same law; :class:`qmargin.faults.RandomFlips`).

Selection (``layers``, ``exclude``, ``layer_types``, ``tensors``, ``protected_bits``): see
:mod:`qmargin.faults.selection`.

Protocols. :func:`qmargin.faults.inject` takes any :class:`ErrorModel`: an object with a
``selection``, an ordered ``fault_kinds()``, ``is_null`` and ``to_dict()``. Campaigns sweep a
template over a BER grid and need an :class:`ErrorModelTemplate` (an ``ErrorModel`` with
``with_ber``). :class:`BitErrorModel` is both; :class:`FaultModel` is the generic composition of
any registered fault kinds (a new kind needs no new error model class).

Per-layer error models. An error model may also have ``parts``: a sequence of error models (each a
``selection`` and ``fault_kinds()``, e.g. :class:`FaultModel`). Then a stored tensor its
``selection`` hits gets the kinds and protected bits of the **first** part whose selection selects it,
and none when no part does. :class:`ComposedErrorModel` is that composition;
:func:`route` is the one place that resolves it (``inject`` and the campaign engine call it), so a
per-layer protection plan (:mod:`qmargin.faults.protection`) needs no change to ``inject``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

from qmargin.errors import ConfigError
from qmargin.faults.kinds import FaultKind, RandomFlips, StuckAt, _rate, fault_kind_from_dict
from qmargin.faults.selection import WEIGHT_TENSORS, Selection
from qmargin.quant.codes import StorageFormat, check_storage

__all__ = [
    "BitErrorModel",
    "FaultModel",
    "ComposedErrorModel",
    "route",
    "detects_errors",
    "ErrorModel",
    "ErrorModelTemplate",
    "WEIGHT_TENSORS",
    "word_format",
]

_OPTIONAL = ("storage", "saturate", "nested_max")  # serialised only when set (older files lack them)


@runtime_checkable
class ErrorModel(Protocol):
    """What :func:`qmargin.faults.inject` needs: where (``selection``) and what (``fault_kinds()``).

    ``fault_kinds()`` lists the kinds to apply, in order (later kinds act on what earlier ones left);
    ``is_null`` is True when no bit can change; ``to_dict()`` is a JSON-ready description (stored in
    :meth:`qmargin.faults.InjectionReport.to_dict` and in campaign results).
    """

    @property
    def selection(self) -> Selection: ...

    @property
    def is_null(self) -> bool: ...

    def fault_kinds(self) -> Sequence[FaultKind]: ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class ErrorModelTemplate(ErrorModel, Protocol):
    """What a campaign needs from its template: an :class:`ErrorModel` it can set to each BER of a grid."""

    def with_ber(self, ber: float) -> ErrorModelTemplate: ...


@dataclass(frozen=True)
class BitErrorModel:
    """Bit errors on the stored codes of a quantized model (random flips, then stuck-at faults).

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
        storage: word format of the stored codes (``"twos"``, ``"offset"``, ``"sign_magnitude"``),
            overriding each tensor's ``QuantSpec.storage``; ``None`` = the spec's own. The integer
            codes are the same; what a flip does to a code changes. Symmetric codes only.
        saturate: saturating decode (``True``/``False``), overriding ``QuantSpec.saturate``;
            ``None`` = the spec's own.
        nested_max: nested patterns: random flips are drawn at this rate and thinned to the model's
            (``ber``, ``p01``, ``p10`` must not exceed it), so for one seed the flipped bits at a
            lower BER are a subset of those at a higher BER; same law. ``None`` (default): plain
            sampler (:class:`qmargin.faults.RandomFlips`).

    Strings are accepted where a tuple is expected (``layers="fc"``). Values are validated and
    normalised on construction; mistakes raise :class:`qmargin.errors.ConfigError` (a ``ValueError``).
    The last five arguments form :attr:`selection`; the rates form :meth:`fault_kinds`.
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
    storage: StorageFormat | None = None
    saturate: bool | None = None
    nested_max: float | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "ber", _rate("ber", self.ber))
        for name in ("p01", "p10"):
            value = getattr(self, name)
            put(self, name, None if value is None else _rate(name, value))
        if self.storage is not None:
            try:
                put(self, "storage", check_storage(self.storage))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.saturate is not None and not isinstance(self.saturate, bool):
            raise ConfigError(f"saturate must be True, False or None, got {self.saturate!r}")
        if self.nested_max is not None:
            RandomFlips(self.rate_01, self.rate_10, self.nested_max)  # validates it against the rates
            put(self, "nested_max", _rate("nested_max", self.nested_max))
        stuck = StuckAt(self.stuck_at_0, self.stuck_at_1)  # validates both rates and their sum
        put(self, "stuck_at_0", stuck.stuck_at_0)
        put(self, "stuck_at_1", stuck.stuck_at_1)
        selection = Selection(
            layers=self.layers, exclude=self.exclude, layer_types=self.layer_types,
            tensors=self.tensors, protected_bits=self.protected_bits,
        )
        for name in ("protected_bits", "layers", "exclude", "layer_types", "tensors"):
            put(self, name, getattr(selection, name))
        self.__dict__["selection"] = selection  # seeds the cached_property below

    # -- where --------------------------------------------------------------------------------
    @cached_property
    def selection(self) -> Selection:
        """Where faults strike: layers, exclude, layer_types, tensors and protected bits."""
        return Selection(self.layers, self.exclude, self.layer_types, self.tensors, self.protected_bits)

    # -- what ---------------------------------------------------------------------------------
    @property
    def rate_01(self) -> float:
        """Probability that a stored 0 reads as 1: ``p01`` if given, else ``ber``."""
        return self.ber if self.p01 is None else self.p01

    @property
    def rate_10(self) -> float:
        """Probability that a stored 1 reads as 0: ``p10`` if given, else ``ber``."""
        return self.ber if self.p10 is None else self.p10

    def fault_kinds(self) -> tuple[FaultKind, ...]:
        """The kinds that can change a bit, in the order ``inject`` applies them: flips, then stuck-at."""
        kinds = (
            RandomFlips(self.rate_01, self.rate_10, self.nested_max),
            StuckAt(self.stuck_at_0, self.stuck_at_1),
        )
        return tuple(k for k in kinds if not k.is_null)

    @property
    def is_null(self) -> bool:
        """True when no bit can change."""
        return not self.fault_kinds()

    def with_ber(self, ber: float) -> BitErrorModel:
        """The same model at another symmetric bit error rate (``p01``/``p10`` overrides kept)."""
        return replace(self, ber=ber)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``from_dict(to_dict())`` round-trips.

        ``storage``, ``saturate`` and ``nested_max`` appear only when set, so the dicts of models
        without them (and the campaign settings that store them) are those of older versions.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
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


def word_format(
    error_model: object, storage: StorageFormat, saturate: bool, signed: bool
) -> tuple[StorageFormat, bool]:
    """``(storage, saturate)`` of a stored tensor as ``error_model`` sees it.

    ``storage`` / ``saturate`` are the tensor's own (its ``QuantSpec``'s, or its code provider's);
    ``signed``: symmetric (two's-complement) codes. An error model's ``storage`` / ``saturate``
    attributes, when present and not ``None``, override them (an evaluation-time choice of the
    memory's format). Raises ``ConfigError`` for a non-default storage of unsigned codes.
    """
    want = getattr(error_model, "storage", None)
    want_saturate = getattr(error_model, "saturate", None)
    chosen = storage if want is None else check_storage(want)
    if chosen != storage and not signed:
        raise ConfigError(f"storage {chosen!r} applies to symmetric codes; these are unsigned")
    return chosen, saturate if want_saturate is None else bool(want_saturate)


@dataclass(frozen=True)
class FaultModel:
    """Any fault kinds, applied in the given order, on a :class:`Selection`: the generic error model.

    ``FaultModel((RandomFlips(1e-3, 1e-3), MyKind(...)), Selection(layers="fc*"))``. Serialises
    through the fault-kind registry: ``{"kinds": [{"kind": name, ...}, ...], "selection": {...}}``.
    """

    kinds: tuple[FaultKind, ...] = ()
    selection: Selection = Selection()

    def __post_init__(self) -> None:
        kinds = tuple(self.kinds) if isinstance(self.kinds, Sequence) else (self.kinds,)
        for k in kinds:
            if not isinstance(k, FaultKind):
                raise ConfigError(f"fault kinds must be FaultKind instances, got {k!r}")
        object.__setattr__(self, "kinds", kinds)
        if not isinstance(self.selection, Selection):
            raise ConfigError(f"selection must be a Selection, got {self.selection!r}")

    def fault_kinds(self) -> tuple[FaultKind, ...]:
        """The kinds that can change a bit, in order."""
        return tuple(k for k in self.kinds if not k.is_null)

    @property
    def is_null(self) -> bool:
        """True when no bit can change."""
        return not self.fault_kinds()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict(to_dict())`` round-trips for registered kinds."""
        return {"kinds": [k.to_dict() for k in self.kinds], "selection": self.selection.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultModel:
        """Build from :meth:`to_dict` output (kinds looked up in the registry by name)."""
        if not isinstance(d, dict) or set(d) - {"kinds", "selection"}:
            raise ConfigError(f"a fault model is a mapping with keys 'kinds' and 'selection', got {d!r}")
        kinds = tuple(fault_kind_from_dict(k) for k in d.get("kinds", ()))
        try:
            selection = Selection(**d.get("selection", {}))
        except TypeError as e:
            raise ConfigError(f"bad selection: {e}") from None
        return cls(kinds, selection)


@dataclass(frozen=True)
class ComposedErrorModel:
    """Per-layer error models: of the stored tensors ``selection`` hits, each gets the fault kinds and
    protected bits of the first of ``parts`` whose selection selects it (first match wins; a tensor no
    part selects is spared). ``parts``: :class:`FaultModel` (or any error models).

    ``ComposedErrorModel((FaultModel((SECDED(p),), Selection("fc3")), FaultModel((RandomFlips(p, p),),
    Selection("*"))))``: ``fc3`` behind SECDED, every other layer unprotected. Serialises as
    ``{"parts": [...], "selection": {...}}``.
    """

    parts: tuple[Any, ...] = ()
    selection: Selection = Selection()

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        for part in parts:
            if not isinstance(part, ErrorModel):
                raise ConfigError(f"parts must be error models (a selection and fault_kinds()), got {part!r}")
        object.__setattr__(self, "parts", parts)
        if not isinstance(self.selection, Selection):
            raise ConfigError(f"selection must be a Selection, got {self.selection!r}")

    def fault_kinds(self) -> tuple[FaultKind, ...]:
        """Every part's kinds that can change a bit (in part order; what each tensor gets: :func:`route`)."""
        return tuple(k for part in self.parts for k in part.fault_kinds())

    @property
    def is_null(self) -> bool:
        return all(part.is_null for part in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"parts": [p.to_dict() for p in self.parts], "selection": self.selection.to_dict()}


def route(error_model: ErrorModel, names: Any) -> tuple[tuple[FaultKind, ...], tuple[int, ...]] | None:
    """What ``error_model`` does to the stored tensor reachable under ``names`` (``(layer, module,
    tensor)`` triples, :meth:`Selection.selects_stored`): ``(kinds, protected_bits)``, or ``None`` when
    it is not hit. A plain error model: its ``fault_kinds()`` and ``selection.protected_bits`` where
    its selection selects the tensor. An error model with ``parts`` (:class:`ComposedErrorModel`):
    where its selection selects the tensor, those of the first part that does (else ``None``)."""
    names = list(names)
    if not error_model.selection.selects_stored(names):
        return None
    parts = getattr(error_model, "parts", None)
    if parts is None:
        return tuple(error_model.fault_kinds()), error_model.selection.protected_bits
    for part in parts:
        if part.selection.selects_stored(names):
            return tuple(part.fault_kinds()), part.selection.protected_bits
    return None


def detects_errors(error_model: Any) -> bool:
    """Whether ``error_model`` (or a template at any BER) has a kind that reports detected
    uncorrectable errors (``FaultKind.detects``: SECDED, parity). Null kinds count (a template at BER
    0 still detects at a positive BER): looks at ``kinds`` / ``parts`` where present."""
    if isinstance(getattr(error_model, "detects", None), bool):
        return bool(error_model.detects)
    parts = getattr(error_model, "parts", None)
    if parts is not None:
        return any(detects_errors(p) for p in parts)
    kinds = getattr(error_model, "kinds", None)
    if kinds is None:
        kinds = error_model.fault_kinds() if hasattr(error_model, "fault_kinds") else ()
    return any(getattr(k, "detects", False) for k in kinds)
