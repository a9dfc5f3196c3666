"""`TrainConfig`: everything that defines one training run, validated, JSON round-trippable.

The loss is a registry name (:func:`qmargin.losses.register_loss`) plus ``loss_kwargs``, validated by
that loss's own builder. A config is *resolved* by :func:`resolve_defaults`: the builder's config
defaults (:func:`qmargin.losses.loss_defaults`, e.g. MCEL's margin and bound from the ablation) are
filled into ``loss_kwargs`` where the user left them out. The trainer only ever sees resolved configs,
and ``config.json`` of a run directory stores the resolved form.

Configs written before ``loss_kwargs`` existed kept the loss knobs as flat keys (``margin``, ``bound``,
``logit_scale``, ``hinge_b``, ``label_smoothing``); :meth:`TrainConfig.from_dict` maps them into
``loss_kwargs`` (see :data:`LEGACY_LOSS_KEYS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from qmargin.errors import ConfigError
from qmargin.faults.functional import check_seed
from qmargin.losses import check_loss_kwargs, loss_defaults, loss_options

__all__ = [
    "TrainConfig",
    "resolve_defaults",
    "LEGACY_LOSS_KEYS",
    "OPTIMIZERS",
    "SCHEDULES",
    "DEVICES",
    "QUANT_MODES",
    "FLOAT_BITS",
]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
QUANT_MODES = ("sym", "asym")
FLOAT_BITS = 32
"""``bits=32`` means a float model (no quantized layers)."""

LEGACY_LOSS_KEYS: dict[str, str] = {
    "margin": "margin",
    "bound": "bound",
    "logit_scale": "logit_scale",
    "hinge_b": "b",
    "label_smoothing": "label_smoothing",
}
"""Flat loss keys of configs written before ``loss_kwargs`` -> their ``loss_kwargs`` name."""
_LEGACY_UNSET: dict[str, Any] = {"label_smoothing": 0.0}
"""A legacy key holding its old field default (``None``, or these values) set nothing and is dropped."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        dataset: registry name of the dataset (``qmargin.data``).
        model: registry name of the architecture (``qmargin.models``).
        model_kwargs: extra keyword arguments of the model builder (JSON values only).
        bits: weight word width b, 1..8 (quantized, design.md §1) or 32 (float model).
        quant: ``"sym"`` (two's complement codes, zero point 0) or ``"asym"`` (unsigned codes).
        per_channel: one scale per output channel instead of one per tensor.
        loss: a registered loss, ``qmargin.losses.available_losses()``: ``"ce"`` | ``"mcel"`` |
            ``"mhl"`` built in (design.md §3), more through ``qmargin.losses.register_loss``.
        loss_kwargs: options of the loss's builder (JSON values), checked by that builder; left-out
            options take the builder's defaults (:func:`resolve_defaults`). Built in: ``ce``
            ``{label_smoothing}``; ``mcel`` ``{margin, bound, logit_scale, label_smoothing}`` (margin M
            and bound T default to ``qmargin.losses.DEFAULT_MCEL_MARGIN`` / ``DEFAULT_MCEL_BOUND``;
            ``bound = inf``: no clamp, written ``Infinity`` in JSON; logit scale s unset = 1); ``mhl``
            ``{b}`` (hinge b, default ``qmargin.losses.DEFAULT_MHL_B``). All three also take
            ``weight`` (per-class list) and ``reduction``.
        train_ber: RandBET training bit error rate p_train; 0 trains without bit errors.
        w_max: weight clipping to [-w_max, w_max] (and quantizer scale w_max / qmax); ``None``: off.
        epochs, batch_size, lr, optimizer, momentum (SGD only), weight_decay: the optimisation.
        schedule: learning-rate schedule per epoch: ``"none"``, ``"cosine"`` (to 0 at the last
            epoch) or ``"step"`` (x0.1 at 50 % and again at 75 % of the epochs).
        seed: seeds torch, numpy, python ``random``, the data order and the RandBET patterns.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        data_dir: directory of file-based datasets (``None``: the data package default).
    """

    dataset: str = "digits"
    model: str = "mlp"
    bits: int = 8
    quant: str = "sym"
    per_channel: bool = False
    loss: str = "ce"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    train_ber: float = 0.0
    w_max: float | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "none"
    seed: int = 0
    device: str = "auto"
    data_dir: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()

    # -- validation ---------------------------------------------------------------------------
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate(self) -> None:  # noqa: C901 - a flat list of checks reads best
        for name in ("dataset", "model"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"{name} must be a non-empty name, got {v!r}")
        if not _is_int(self.bits) or not (1 <= self.bits <= 8 or self.bits == FLOAT_BITS):
            raise ConfigError(f"bits must be 1..8 (quantized) or 32 (float), got {self.bits!r}")
        _choice("quant", self.quant, QUANT_MODES)
        if self.bits == 1 and self.quant == "asym":
            raise ConfigError("bits=1 is a symmetric sign code; use quant='sym' or bits >= 2")
        if not isinstance(self.per_channel, bool):
            raise ConfigError(f"per_channel must be true or false, got {self.per_channel!r}")
        if not isinstance(self.loss, str) or not self.loss.strip():
            raise ConfigError(f"loss must be a non-empty name, got {self.loss!r}")
        self._set("loss", self.loss.lower())
        loss_options(self.loss)  # an unknown loss is a ConfigError naming the registered ones
        self._set("loss_kwargs", _json_mapping("loss_kwargs", self.loss_kwargs))
        try:
            check_loss_kwargs(self.loss, self.loss_kwargs)
        except ConfigError as err:
            raise ConfigError(f"loss_kwargs: {err}" if self.loss_kwargs else str(err)) from None
        self._number("train_ber", lo=0.0, hi=0.5)
        if self.train_ber > 0 and self.bits == FLOAT_BITS:
            raise ConfigError("train_ber > 0 (RandBET) needs a quantized model: set bits to 1..8")
        if self.w_max is not None:
            if not _is_num(self.w_max) or self.w_max <= 0:
                raise ConfigError(f"w_max must be a positive number or null, got {self.w_max!r}")
            self._set("w_max", float(self.w_max))
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self._number("lr", lo=0.0, lo_open=True)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        self._number("momentum", lo=0.0, hi=1.0, hi_open=True)
        self._number("weight_decay", lo=0.0)
        _choice("schedule", self.schedule, SCHEDULES)
        check_seed(self.seed, "seed")  # an integer in [0, 2**63): what the generators take
        _choice("device", self.device, DEVICES)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            self._set("data_dir", str(self.data_dir))
        self._set("model_kwargs", _json_mapping("model_kwargs", self.model_kwargs))

    def _number(
        self,
        name: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        hi_open: bool = False,
    ) -> None:
        v = getattr(self, name)
        if not _is_num(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
        v = float(v)
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
            raise ConfigError(f"{name} must be in {rng}, got {v}")
        self._set(name, v)

    # -- derived ------------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        """True unless ``bits == 32`` (float model)."""
        return self.bits != FLOAT_BITS

    @property
    def randbet(self) -> bool:
        """True when training injects random bit errors (``train_ber > 0``)."""
        return self.train_ber > 0

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        d = asdict(self)
        d["model_kwargs"] = json.loads(json.dumps(self.model_kwargs))
        d["loss_kwargs"] = json.loads(json.dumps(self.loss_kwargs))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`, missing ones take defaults.

        Also reads configs written before ``loss_kwargs`` existed: their flat loss keys
        (:data:`LEGACY_LOSS_KEYS`) move into ``loss_kwargs`` (``hinge_b`` as ``b``); a key holding its old
        default (``null``; ``label_smoothing`` 0) or one the loss does not accept is dropped.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a JSON object, got {type(d).__name__}")
        d = _from_legacy(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err.msg} (line {err.lineno})") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _json_mapping(name: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``value`` through JSON (``inf`` stays ``inf``); ``ConfigError`` unless it is one."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{name} must be a mapping of names to values, got {value!r}")
    try:
        out: dict[str, Any] = json.loads(json.dumps(value))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must hold JSON values only: {err}") from None
    return out


def _from_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with the flat loss keys of an old config moved into ``loss_kwargs``."""
    legacy = [k for k in LEGACY_LOSS_KEYS if k in d]
    if not legacy:
        return d
    if "loss_kwargs" in d:
        raise ConfigError(f"config mixes loss_kwargs with the old flat loss key(s) {', '.join(legacy)}")
    out = {k: v for k, v in d.items() if k not in LEGACY_LOSS_KEYS}
    try:
        accepted = loss_options(d.get("loss", "ce"))
    except (ConfigError, TypeError):
        return out  # an unknown loss: the constructor says so
    kwargs: dict[str, Any] = {}
    for old in legacy:
        value, new = d[old], LEGACY_LOSS_KEYS[old]
        unset = value is None or (old in _LEGACY_UNSET and value == _LEGACY_UNSET[old])
        if not unset and (accepted is None or new in accepted):
            kwargs[new] = value
    out["loss_kwargs"] = kwargs
    return out


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with its loss's config defaults filled into ``loss_kwargs`` where they are not set.

    The defaults are :func:`qmargin.losses.loss_defaults` read now: MCEL gets ``margin =
    DEFAULT_MCEL_MARGIN`` and ``bound = DEFAULT_MCEL_BOUND`` (``logit_scale`` stays unset, i.e. s = 1),
    MHL gets ``b = DEFAULT_MHL_B``, CE nothing. Explicit values win. Idempotent.
    """
    defaults = loss_defaults(config.loss)
    missing = {k: v for k, v in defaults.items() if k not in config.loss_kwargs}
    if not missing:
        return config
    return replace(config, loss_kwargs={**config.loss_kwargs, **missing})
