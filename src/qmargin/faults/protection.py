"""Per-layer memory protection: a small spec language, the error model it builds, its memory overhead.

Spec language (``qmargin evaluate --protect SPEC``)::

    SPEC   := RULE ("," RULE)*
    RULE   := [PATTERN "="] SCHEME              (no PATTERN: "*", every layer)
    SCHEME := "none"                            unprotected: raw bit errors at the BER
            | "msb" K                           the top K bit positions never flip (bits b-1 .. b-K)
            | "secded" [K] [":" POLICY]         SECDED over K-bit data words (K default 64)
            | "secded(" N "," K ")" [":" POLICY]   the same, named by the code: (72,64), (39,32)
            | "parity" [K] [":" POLICY]         one parity bit per K-bit data word (default: per
                                                stored b-bit word), detection only
    POLICY := "keep" | "zero" | "flag"          what a detected uncorrectable error does (default keep)

``PATTERN`` is a glob on layer names, as in :class:`qmargin.faults.Selection` (``conv*``, ``fc3``,
``features.*``). Each stored tensor the error model hits takes the scheme of the **first** rule whose
pattern matches its layer; a layer no rule matches is unprotected (an implicit ``*=none`` at the end).
Examples: ``secded64`` (every layer), ``conv*=msb2,fc3=secded64,*=none``, ``fc*=parity8:flag``.
Refused (one-line ``ConfigError``): an unknown scheme, a bad width, an empty rule, a pattern given
twice, a rule after a catch-all ``*`` (it could never match) and, once the model is known
(:meth:`ProtectedErrorModel.plan`), a pattern that matches no layer the error model hits, ``msbK``
with K above a layer's bits, or a data word width that is not a whole number of a layer's words.

What each scheme does at BER ``p`` (the laws: docs/math.md, "Parity and SECDED"):

* ``none``: :class:`~qmargin.faults.RandomFlips` ``(p, p)``;
* ``msbK``: the same with protected bits ``-1 .. -K`` (``--protected-bits`` with positions
  ``b-1 .. b-K`` is the same model);
* ``secdedK``: :class:`~qmargin.faults.SECDED` ``(p, k=K, due=POLICY)``;
* ``parityK``: :class:`~qmargin.faults.Parity` ``(p, k=K, due=POLICY)``.

**Memory overhead** of a stored tensor of ``n`` words of ``b`` bits (``D = n b`` data bits): extra
stored bits ``X``, overhead ``X / D``.

* ``none``, ``msbK``: ``X = 0`` (``msbK`` keeps ``K n`` bits in hardened memory: reported as
  ``hardened_bits``, not as extra bits);
* ``secdedK``: ``C = ceil(D / K)`` codewords of ``K + r + 1`` bits, ``X = C (K + r + 1) - D``
  (``r + 1`` check bits per codeword, plus the zero padding of the last one);
* ``parityK``: ``X = C (K + 1) - D``.

The total is ``sum X / sum D`` over the hit tensors (each layer weighted by its ``n b``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults.ecc import DUE_POLICIES, SECDED, Parity, secded_layout
from qmargin.faults.error_model import FaultModel
from qmargin.faults.kinds import FaultKind, RandomFlips, _rate
from qmargin.faults.selection import WEIGHT_TENSORS, Selection
from qmargin.interop import stored_code_groups
from qmargin.quant.codes import StorageFormat, check_storage

__all__ = [
    "Scheme",
    "ProtectionRule",
    "ProtectionSpec",
    "ProtectedErrorModel",
    "ProtectionPlan",
    "parse_protection",
    "parse_scheme",
    "protection_summary",
    "PlanEntry",
]

SCHEMES = ("none", "msb", "secded", "parity")
DEFAULT_SECDED_K = 64
_MAX_K = 1024


@dataclass(frozen=True)
class Scheme:
    """One protection scheme: ``name`` in :data:`SCHEMES`; ``k``: bits protected (``msb``) or data
    word width (``secded``; ``parity``, ``None`` = one parity bit per stored word); ``due``: the DUE
    policy (``secded``, ``parity``)."""

    name: str
    k: int | None = None
    due: str = "keep"

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ConfigError(f"unknown protection scheme {self.name!r}; use none, msbK, secdedK or parityK")
        if self.due not in DUE_POLICIES:
            raise ConfigError(f"DUE policy must be one of {', '.join(DUE_POLICIES)}, got {self.due!r}")
        if self.name in ("none", "msb") and self.due != "keep":
            raise ConfigError(f"{self.name} detects nothing: a DUE policy is for secded and parity")
        if self.name == "none" and self.k is not None:
            raise ConfigError("none takes no width")
        if self.name == "msb" and (self.k is None or not 1 <= self.k <= 8):
            raise ConfigError(f"msbK protects the top K bits, K in 1..8; got {self.k!r}")
        if self.name == "secded":
            secded_layout(DEFAULT_SECDED_K if self.k is None else self.k)  # validates k
            if self.k is None:
                object.__setattr__(self, "k", DEFAULT_SECDED_K)
        if self.name == "parity" and self.k is not None and not 1 <= self.k <= _MAX_K:
            raise ConfigError(f"parity data word width must be in 1..{_MAX_K}, got {self.k}")

    @property
    def text(self) -> str:
        """Canonical spelling: ``none``, ``msb2``, ``secded64``, ``parity``, ``parity32:flag``."""
        base = self.name if self.name == "none" or self.k is None else f"{self.name}{self.k}"
        return base if self.due == "keep" else f"{base}:{self.due}"

    @property
    def detects(self) -> bool:
        return self.name in ("secded", "parity")

    def kinds(self, ber: float, nested_max: float | None = None) -> tuple[FaultKind, ...]:
        """The fault kinds of this scheme at BER ``ber`` (``nested_max``: nested flips; none/msb only)."""
        if self.name in ("none", "msb"):
            return (RandomFlips(ber, ber, nested_max),)
        if self.name == "secded":
            assert self.k is not None
            return (SECDED(ber, k=self.k, due=self.due),)
        return (Parity(ber, k=self.k, due=self.due),)

    @property
    def protected_bits(self) -> tuple[int, ...]:
        """``msbK``: positions ``-1 .. -K`` (from the MSB); else none."""
        return tuple(range(-1, -(self.k or 0) - 1, -1)) if self.name == "msb" else ()

    def word_width(self, bits: int) -> int | None:
        """Data word width for ``bits``-bit codes (``None`` for none/msb)."""
        if self.name == "parity":
            return bits if self.k is None else self.k
        return self.k if self.name == "secded" else None

    def check_bits(self, bits: int, where: str) -> None:
        """``ConfigError`` when the scheme cannot protect ``bits``-bit codes."""
        if self.name == "msb" and self.k is not None and self.k > bits:
            raise ConfigError(f"{where}: {self.text} protects {self.k} bits, its codes have {bits}")
        k = self.word_width(bits)
        if k is not None and k % bits:
            raise ConfigError(
                f"{where}: {self.text} packs whole {bits}-bit codes into {k}-bit data words; "
                f"use a multiple of {bits}"
            )

    def extra_bits(self, numel: int, bits: int) -> int:
        """Extra stored bits ``X`` for ``numel`` words of ``bits`` bits (module doc)."""
        k = self.word_width(bits)
        if k is None:
            return 0
        data = numel * bits
        n_cw = math.ceil(data / k)
        n = secded_layout(k).n if self.name == "secded" else k + 1
        return n_cw * n - data

    def hardened_bits(self, numel: int, bits: int) -> int:
        """Bits kept in hardened memory (``msbK``: ``K numel``)."""
        return numel * min(self.k or 0, bits) if self.name == "msb" else 0


_SECDED_NK = re.compile(r"secded\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_SCHEME = re.compile(r"(none|msb|secded|parity)(\d*)")


def parse_scheme(text: str) -> Scheme:
    """One ``SCHEME`` of the spec language (module doc)."""
    t = text.strip().lower()
    body, sep, policy = t.partition(":")
    body, policy = body.strip(), policy.strip()
    if sep and not policy:
        raise ConfigError(f"{text.strip()!r}: give a DUE policy after ':' ({', '.join(DUE_POLICIES)})")
    due = policy if sep else "keep"
    m = _SECDED_NK.fullmatch(body)
    if m:
        n, k = int(m.group(1)), int(m.group(2))
        layout = secded_layout(k)
        if layout.n != n:
            raise ConfigError(f"{body}: SECDED with {k} data bits is ({layout.n},{k}), not ({n},{k})")
        return Scheme("secded", k, due)
    m = _SCHEME.fullmatch(body)
    if not m:
        raise ConfigError(
            f"unknown protection scheme {text.strip()!r}; use none, msbK, secdedK, secded(N,K) or parityK"
        )
    name, digits = m.group(1), m.group(2)
    if len(digits) > 5:
        raise ConfigError(f"{body}: width too large")
    return Scheme(name, int(digits) if digits else None, due)


def _split_rules(text: str) -> list[str]:
    """Split on commas outside parentheses (``secded(72,64)`` is one scheme)."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


@dataclass(frozen=True)
class ProtectionRule:
    """``pattern`` (glob on layer names) protected by ``scheme``."""

    pattern: str
    scheme: Scheme

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.scheme.text}"

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "scheme": self.scheme.text}


@dataclass(frozen=True)
class ProtectionSpec:
    """An ordered list of :class:`ProtectionRule`; first match wins (module doc). ``parse`` reads the
    spec language; ``text`` writes it back canonically."""

    rules: tuple[ProtectionRule, ...]

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        if not rules:
            raise ConfigError("a protection spec needs at least one rule")
        seen: set[str] = set()
        for i, r in enumerate(rules):
            if r.pattern in seen:
                raise ConfigError(f"protection: the pattern {r.pattern!r} is given twice")
            seen.add(r.pattern)
            if r.pattern == "*" and i < len(rules) - 1:
                raise ConfigError(
                    f"protection: {rules[i + 1].text!r} comes after the catch-all {r.text!r} and could "
                    "never match; put '*' last"
                )
        object.__setattr__(self, "rules", rules)

    @classmethod
    def parse(cls, text: str) -> ProtectionSpec:
        """Read ``RULE,RULE,...`` (module doc); one-line ``ConfigError`` on any mistake."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("an empty protection spec; e.g. secded64 or conv*=msb2,fc3=secded64")
        rules = []
        for part in _split_rules(text):
            if not part.strip():
                raise ConfigError(f"protection spec {text.strip()!r} has an empty rule")
            pattern, sep, scheme = part.partition("=")
            if not sep:
                pattern, scheme = "*", part
            pattern = pattern.strip()
            if not pattern or any(c.isspace() for c in pattern):
                raise ConfigError(
                    f"protection rule {part.strip()!r}: the layer pattern is empty or has spaces"
                )
            rules.append(ProtectionRule(pattern, parse_scheme(scheme)))
        return cls(tuple(rules))

    @property
    def text(self) -> str:
        """Canonical spec: rules joined by commas, a lone catch-all written without ``*=``."""
        if len(self.rules) == 1 and self.rules[0].pattern == "*":
            return self.rules[0].scheme.text
        return ",".join(r.text for r in self.rules)

    @property
    def detects(self) -> bool:
        return any(r.scheme.detects for r in self.rules)

    def scheme_for(self, layer: str) -> tuple[int | None, Scheme]:
        """``(rule index, scheme)`` of the first rule matching ``layer``; ``(None, none)`` otherwise."""
        for i, r in enumerate(self.rules):
            if fnmatch.fnmatchcase(layer, r.pattern):
                return i, r.scheme
        return None, Scheme("none")


def parse_protection(text: str) -> ProtectionSpec:
    """:meth:`ProtectionSpec.parse`."""
    return ProtectionSpec.parse(text)


@dataclass(frozen=True)
class ProtectedErrorModel:
    """Random bit errors at ``ber`` on memory protected per layer by ``spec``: an
    :class:`~qmargin.faults.ErrorModelTemplate` (campaigns sweep ``with_ber``) with ``parts``, one
    :class:`~qmargin.faults.FaultModel` per rule plus the implicit ``*=none``, resolved by
    :func:`qmargin.faults.error_model.route` (first match wins).

    ``layers`` / ``exclude`` / ``layer_types`` / ``tensors``: which stored tensors are hit at all (as
    :class:`~qmargin.faults.BitErrorModel`); ``storage`` / ``saturate``: the word format;
    ``nested_max``: nested flips (only for specs without secded/parity rules).
    """

    spec: ProtectionSpec
    ber: float = 0.0
    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] | None = None
    tensors: tuple[str, ...] | None = WEIGHT_TENSORS
    storage: StorageFormat | None = None
    saturate: bool | None = None
    nested_max: float | None = None

    def __post_init__(self) -> None:
        put = object.__setattr__
        if isinstance(self.spec, str):
            put(self, "spec", ProtectionSpec.parse(self.spec))
        if not isinstance(self.spec, ProtectionSpec):
            raise ConfigError(f"spec must be a ProtectionSpec or its text, got {self.spec!r}")
        put(self, "ber", _rate("ber", self.ber))
        if self.storage is not None:
            try:
                put(self, "storage", check_storage(self.storage))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.nested_max is not None:
            if self.spec.detects:
                raise ConfigError(
                    "nested patterns are for random flips; this protection has secded/parity rules"
                )
            RandomFlips(self.ber, self.ber, self.nested_max)  # validates
        sel = Selection(
            layers=self.layers, exclude=self.exclude, layer_types=self.layer_types, tensors=self.tensors
        )
        for name in ("layers", "exclude", "layer_types", "tensors"):
            put(self, name, getattr(sel, name))

    @property
    def selection(self) -> Selection:
        """Which stored tensors are hit at all (the rules then choose how)."""
        return Selection(self.layers, self.exclude, self.layer_types, self.tensors)

    @property
    def parts(self) -> tuple[FaultModel, ...]:
        """One :class:`FaultModel` per rule (its pattern, its kinds at ``ber``, ``msbK``'s protected
        bits), then ``*`` unprotected: the composition :func:`~qmargin.faults.error_model.route` reads."""
        rules = [*self.spec.rules]
        if rules[-1].pattern != "*":
            rules.append(ProtectionRule("*", Scheme("none")))
        return tuple(
            FaultModel(
                r.scheme.kinds(self.ber, self.nested_max),
                Selection(layers=(r.pattern,), tensors=None, protected_bits=r.scheme.protected_bits),
            )
            for r in rules
        )

    def fault_kinds(self) -> tuple[FaultKind, ...]:
        return tuple(k for p in self.parts for k in p.fault_kinds())

    @property
    def is_null(self) -> bool:
        return self.ber == 0.0

    @property
    def detects(self) -> bool:
        """Whether some rule can report detected uncorrectable errors (secded, parity)."""
        return self.spec.detects

    def with_ber(self, ber: float) -> ProtectedErrorModel:
        return replace(self, ber=ber)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``protection`` (the canonical spec), ``rules``, ``ber`` and the selection."""
        out: dict[str, Any] = {
            "protection": self.spec.text,
            "rules": [r.to_dict() for r in self.spec.rules],
            "ber": self.ber,
            "layers": list(self.layers),
            "exclude": list(self.exclude),
            "layer_types": None if self.layer_types is None else list(self.layer_types),
            "tensors": None if self.tensors is None else list(self.tensors),
        }
        for name in ("storage", "saturate", "nested_max"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def plan(self, model: nn.Module) -> ProtectionPlan:
        """The spec resolved on ``model``: the scheme of every hit stored tensor and the overhead.
        Raises ``ConfigError`` for a rule that matches no hit layer, or a scheme a layer's bit width
        cannot take."""
        return ProtectionPlan.build(model, self)


@dataclass(frozen=True)
class PlanEntry:
    """One stored tensor of a :class:`ProtectionPlan`."""

    layer: str
    tensor: str
    numel: int
    bits: int
    rule: str  # the matching rule's text, "*=none (default)" for the implicit one
    scheme: str
    data_bits: int
    extra_bits: int
    hardened_bits: int

    @property
    def overhead(self) -> float:
        return self.extra_bits / self.data_bits if self.data_bits else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "tensor": self.tensor,
            "numel": self.numel,
            "bits": self.bits,
            "rule": self.rule,
            "scheme": self.scheme,
            "data_bits": self.data_bits,
            "extra_bits": self.extra_bits,
            "hardened_bits": self.hardened_bits,
            "overhead": self.overhead,
        }


@dataclass(frozen=True)
class ProtectionPlan:
    """A protection spec resolved on a model: per hit stored tensor its scheme and overhead."""

    spec: ProtectionSpec
    entries: tuple[PlanEntry, ...]

    @classmethod
    def build(cls, model: nn.Module, error_model: ProtectedErrorModel) -> ProtectionPlan:
        """Resolve ``error_model.spec`` on every stored tensor of ``model`` its selection hits (the
        rule :func:`~qmargin.faults.error_model.route` applies: first match, a tie by any of its
        names); ``ConfigError`` as :meth:`ProtectedErrorModel.plan`."""
        spec, selection = error_model.spec, error_model.selection
        groups = [(p, g) for p, g in stored_code_groups(model) if selection.selects_stored(g)]
        if not groups:
            raise ConfigError(f"the bit error model selects no stored tensor ({selection.describe()})")
        entries = []
        hit_layers: list[str] = []
        for provider, group in groups:
            name, module, tensor = group[0]
            hit_layers += [n for n, _, _ in group]
            index = None
            scheme = Scheme("none")
            for n, _, _ in group:  # a tie: the first rule matching any of its names
                i, s = spec.scheme_for(n)
                if i is not None and (index is None or i < index):
                    index, scheme = i, s
            stored = provider.codes(name, module, tensor)
            where = f"{name}.{tensor}" if name else tensor
            scheme.check_bits(stored.bits, where)
            numel = int(stored.codes.numel())
            entries.append(
                PlanEntry(
                    name,
                    tensor,
                    numel,
                    stored.bits,
                    spec.rules[index].text if index is not None else "*=none (default)",
                    scheme.text,
                    numel * stored.bits,
                    scheme.extra_bits(numel, stored.bits),
                    scheme.hardened_bits(numel, stored.bits),
                )
            )
        for r in spec.rules:
            if not any(fnmatch.fnmatchcase(n, r.pattern) for n in hit_layers):
                layers = list(dict.fromkeys(hit_layers))
                raise ConfigError(
                    f"protection rule {r.text!r} matches no layer the error model hits; layers: {layers[:12]}"
                )
        return cls(spec, tuple(entries))

    @property
    def data_bits(self) -> int:
        return sum(e.data_bits for e in self.entries)

    @property
    def extra_bits(self) -> int:
        return sum(e.extra_bits for e in self.entries)

    @property
    def hardened_bits(self) -> int:
        return sum(e.hardened_bits for e in self.entries)

    @property
    def overhead(self) -> float:
        """``sum X / sum D`` over the hit tensors (module doc)."""
        return self.extra_bits / self.data_bits if self.data_bits else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the spec, per tensor its rule, scheme and bits, and the totals."""
        return {
            "spec": self.spec.text,
            "rules": [r.to_dict() for r in self.spec.rules],
            "tensors": [e.to_dict() for e in self.entries],
            "data_bits": self.data_bits,
            "extra_bits": self.extra_bits,
            "hardened_bits": self.hardened_bits,
            "overhead": self.overhead,
        }


def protection_summary(error_model: Any, model: nn.Module) -> dict[str, Any] | None:
    """``error_model.plan(model).to_dict()`` for a :class:`ProtectedErrorModel`, else ``None`` (what a
    campaign stores under ``protection``)."""
    if isinstance(error_model, ProtectedErrorModel):
        return error_model.plan(model).to_dict()
    return None
