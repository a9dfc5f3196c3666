"""Fault kinds: *what* happens to the selected bits — the extension point of the bit-error engine.

A fault kind is a law of faults on one tensor of b-bit words (bit 0 = LSB; docs/bit-conventions.md).
:func:`qmargin.faults.inject` knows no kind: for every selected tensor ``t`` of layer ``name`` it
applies the error model's kinds **in order**, each one as

    ``result = kind.apply_(codes, bits, make_generator(derive_seed(seed, name, t, *kind.stream)),``
    ``                     protected)``

and records ``result.patch`` to undo it on exit. So the later kinds act on what the earlier ones left
(random flips first, stuck-at after them: a stuck bit reads its stuck value whatever was flipped).

The built-in kinds:

* ``"flips"`` — :class:`RandomFlips`: a stored 0 reads as 1 with probability ``p01``, a stored 1 as 0
  with probability ``p10``, independently per exposed bit (exact O(K) sampler; unequal rates by
  thinning, candidates at ``p_max = max(p01, p10)`` kept with ``p_v / p_max``). Stream: none, i.e.
  ``derive_seed(seed, name, t)``.
* ``"stuck_at"`` — :class:`StuckAt`: each exposed bit is stuck at 0 with probability ``stuck_at_0``,
  at 1 with ``stuck_at_1``, free otherwise (``s0 + s1 <= 1``); ``word <- (word AND NOT to_zero) OR
  to_one``. Stream: ``derive_seed(seed, name, t, "stuck_at")``.

Adding a kind (ECC, activation-side errors, burst errors, ...) means writing one class and
registering it; ``inject`` does not change:

1. Subclass :class:`FaultKind` (a frozen dataclass is easiest: its fields are the kind's parameters
   and :meth:`FaultKind.to_dict` serialises them). Set ``stream``, a tuple of names distinct from every
   other kind's, so that its random draws are independent of theirs and do not move when other kinds
   are added or removed.
2. Implement ``is_null`` (True when the kind cannot change a bit: ``inject`` then skips it and draws
   nothing) and ``apply_(codes, bits, generator, protected)``: draw every random number from
   ``generator`` (a CPU ``torch.Generator``; move the sampled pattern to ``codes.device``), never touch
   the ``protected`` positions (``frozenset`` of positions ``0..bits-1``), edit ``codes`` in place
   and return a :class:`FaultResult` whose :class:`WordPatch` records every word changed (e.g. from
   :func:`flip_bits_` / :func:`force_bits_`), plus the number of bits flipped / stuck.
3. ``register_fault_kind("my_kind", MyKind)``; then use it in an error model, e.g.
   ``FaultModel((RandomFlips(1e-3, 1e-3), MyKind(...)), Selection(layers="fc*"))``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from qmargin.errors import ConfigError
from qmargin.faults.functional import (
    WordPatch,
    _check_rate,
    flip_bits_,
    force_bits_,
    sample_flips,
    sample_stuck_bits,
)

__all__ = [
    "FaultKind",
    "FaultResult",
    "RandomFlips",
    "StuckAt",
    "register_fault_kind",
    "fault_kinds",
    "fault_kind_from_dict",
]


@dataclass(frozen=True)
class FaultResult:
    """What one fault kind did to one tensor: the restorable ``patch`` and its fault counts.

    ``n_flipped``: bits inverted by the kind; ``n_stuck``: bits forced to a value (whether or not
    the value changed); ``n_due``: detected uncorrectable errors (codewords whose decoder raised an
    error it could not correct: ECC and parity kinds, :mod:`qmargin.faults.ecc`). They add up into
    :class:`qmargin.faults.TensorFaults`.
    """

    patch: WordPatch
    n_flipped: int = 0
    n_stuck: int = 0
    n_due: int = 0


class FaultKind(ABC):
    """One law of faults on the words of a stored tensor (module docstring: how to add one).

    Class attributes: ``name``, the registry name (set by :func:`register_fault_kind`), and
    ``stream``, the names appended to ``derive_seed(seed, layer, tensor)`` to seed the kind's
    generator (``()`` for random flips, ``("stuck_at",)`` for stuck-at faults).
    """

    name: ClassVar[str] = ""
    stream: ClassVar[tuple[str, ...]] = ()
    detects: ClassVar[bool] = False
    """True for kinds that can report detected uncorrectable errors (``FaultResult.n_due``): a
    campaign then stores the count per pattern."""

    @property
    @abstractmethod
    def is_null(self) -> bool:
        """True when the kind cannot change any bit (``inject`` skips it; nothing is drawn)."""

    @abstractmethod
    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        """Corrupt ``codes`` (b-bit words) in place, drawing from ``generator``; never touch ``protected``."""

    def to_dict(self) -> dict[str, Any]:
        """``{"kind": name, **parameters}`` (dataclass fields); inverse: :func:`fault_kind_from_dict`."""
        name = vars(type(self)).get("name")  # set on the class itself by register_fault_kind
        if not name or _REGISTRY.get(name) is not type(self):
            raise ConfigError(f"fault kind {type(self).__name__} is not registered (register_fault_kind)")
        if not dataclasses.is_dataclass(self):
            raise NotImplementedError(f"{type(self).__name__} must be a dataclass or override to_dict")
        out: dict[str, Any] = {"kind": name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _rate(name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1]``, else ``ConfigError`` (the sampler's check, as a user error)."""
    try:
        return _check_rate(name, value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class RandomFlips(FaultKind):
    """Random bit errors: a stored 0 flips with probability ``p01``, a stored 1 with ``p10``.

    ``word <- word XOR mask``; every exposed bit independently. Equal rates are one Bernoulli(p)
    process (exact sparse sampler, :func:`qmargin.faults.sample_bit_sites`); unequal rates draw
    candidates at ``p_max = max(p01, p10)`` and keep each with ``p_v / p_max`` for its stored value
    ``v``, so a bit flips with probability ``p_max * p_v / p_max = p_v``.

    ``nested_max = P`` (nested patterns): candidates are drawn at ``P >= max(p01, p10)`` and each
    candidate bit is kept when its own uniform is below ``p_v / P``; same law, and for one seed the
    bits flipped at a lower rate are a subset of those flipped at a higher one (every rate ``<= P``).
    Without it (``None``, the default) the patterns are those of the plain sampler.
    """

    p01: float
    p10: float
    nested_max: float | None = None
    stream: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "p01", _rate("p01", self.p01))
        object.__setattr__(self, "p10", _rate("p10", self.p10))
        if self.nested_max is not None:
            top = _rate("nested_max", self.nested_max)
            if top == 0.0:
                raise ConfigError("nested_max must be positive (the largest rate of the grid)")
            if max(self.p01, self.p10) > top:
                raise ConfigError(f"rates p01={self.p01}, p10={self.p10} exceed nested_max={top}")
            object.__setattr__(self, "nested_max", top)

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`FaultKind.to_dict`; ``nested_max`` only when set (older files lack it)."""
        out = super().to_dict()
        if out.get("nested_max") is None:
            out.pop("nested_max", None)
        return out

    @property
    def is_null(self) -> bool:
        return self.p01 == 0.0 and self.p10 == 0.0

    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        sites = sample_flips(
            codes, bits, p01=self.p01, p10=self.p10, seed=generator, protected_bits=protected,
            nested_max=self.nested_max,
        )
        return FaultResult(flip_bits_(codes, bits, sites), n_flipped=sites.n_bits)


@dataclass(frozen=True)
class StuckAt(FaultKind):
    """Stuck-at faults: each exposed bit is stuck at 0 with ``stuck_at_0``, at 1 with ``stuck_at_1``.

    The three outcomes (0, 1, free) are exclusive, ``stuck_at_0 + stuck_at_1 <= 1``: stuck bits are
    drawn at ``s = s0 + s1`` and each is stuck at 1 with probability ``s1 / s``. A stuck bit reads its
    stuck value: ``word <- (word AND NOT to_zero) OR to_one``.
    """

    stuck_at_0: float
    stuck_at_1: float
    stream: ClassVar[tuple[str, ...]] = ("stuck_at",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stuck_at_0", _rate("stuck_at_0", self.stuck_at_0))
        object.__setattr__(self, "stuck_at_1", _rate("stuck_at_1", self.stuck_at_1))
        if self.stuck_at_0 + self.stuck_at_1 > 1.0 + 1e-12:
            raise ConfigError(
                f"stuck_at_0 + stuck_at_1 must be <= 1, got {self.stuck_at_0} + {self.stuck_at_1}"
            )

    @property
    def is_null(self) -> bool:
        return self.stuck_at_0 == 0.0 and self.stuck_at_1 == 0.0

    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        stuck = sample_stuck_bits(
            codes.numel(), bits, rate_0=self.stuck_at_0, rate_1=self.stuck_at_1,
            seed=generator, protected_bits=protected,
        )
        return FaultResult(force_bits_(codes, bits, stuck), n_stuck=stuck.n_bits)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[FaultKind]] = {}


def register_fault_kind(name: str, cls: type[FaultKind]) -> type[FaultKind]:
    """Register the fault kind ``cls`` under ``name`` (sets ``cls.name``); returns ``cls``.

    Raises ``ConfigError`` when ``name`` is taken, when ``cls`` is already registered under another
    name, or when its ``stream`` is already used by a registered kind (its draws would then
    coincide with that kind's).
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a fault kind name must be a non-empty string, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, FaultKind)):
        raise TypeError(f"a fault kind must be a FaultKind subclass, got {cls!r}")
    if name in _REGISTRY:
        raise ConfigError(f"fault kind {name!r} is already registered ({_REGISTRY[name].__name__})")
    for other_name, other in _REGISTRY.items():
        if other is cls:
            raise ConfigError(f"{cls.__name__} is already registered as fault kind {other_name!r}")
        if tuple(other.stream) == tuple(cls.stream):
            raise ConfigError(
                f"fault kind {name!r} uses the stream {cls.stream} of {other_name!r}; choose another"
            )
    cls.name = name
    _REGISTRY[name] = cls
    return cls


def fault_kinds() -> dict[str, type[FaultKind]]:
    """The registered fault kinds, ``name -> class``, in registration order (a copy)."""
    return dict(_REGISTRY)


def fault_kind_from_dict(d: dict[str, Any]) -> FaultKind:
    """Build a kind from :meth:`FaultKind.to_dict` output (``{"kind": name, **parameters}``)."""
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise ConfigError(f"a fault kind must be a mapping with a 'kind' name, got {d!r}")
    params = dict(d)
    name = params.pop("kind")
    if name not in _REGISTRY:
        raise ConfigError(f"unknown fault kind {name!r}; known: {sorted(_REGISTRY)}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for fault kind {name!r}: {e}") from None


register_fault_kind("flips", RandomFlips)
register_fault_kind("stuck_at", StuckAt)
