"""`TrainConfig`: everything that defines one training run, validated, JSON round-trippable.

A config is *resolved* by :func:`resolve_defaults`: the loss-specific knobs that the user left at
``None`` are filled from the constants of :mod:`qmargin.losses` (one place, so the defaults chosen by
the ablation reach every run). The trainer only ever sees resolved configs, and ``config.json`` of a
run directory stores the resolved form.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from qmargin.errors import ConfigError

__all__ = [
    "TrainConfig",
    "resolve_defaults",
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULES",
    "DEVICES",
    "QUANT_MODES",
    "FLOAT_BITS",
]

LOSSES = ("ce", "mcel", "mhl")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")
DEVICES = ("auto", "cpu", "cuda")
QUANT_MODES = ("sym", "asym")
FLOAT_BITS = 32
"""``bits=32`` means a float model (no quantized layers)."""

# Which loss uses which optional knob (None = "take the library default").
_LOSS_KNOBS: dict[str, tuple[str, ...]] = {
    "ce": ("label_smoothing",),
    "mcel": ("margin", "bound", "logit_scale", "label_smoothing"),
    "mhl": ("hinge_b",),
}
FALLBACK_MHL_B = 1.0
"""MHL hinge b used when :mod:`qmargin.losses` defines no ``DEFAULT_MHL_B``."""
_OPTIONAL_KNOBS = ("margin", "bound", "logit_scale", "hinge_b")


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
        loss: ``"ce"`` | ``"mcel"`` | ``"mhl"`` (design.md §3).
        margin: MCEL margin M (``None``: ``qmargin.losses.DEFAULT_MCEL_MARGIN``).
        bound: MCEL soft-clamp bound T (``None``: ``qmargin.losses.DEFAULT_MCEL_BOUND``; ``inf``: no
            clamp, written ``Infinity`` in JSON).
        logit_scale: MCEL logit scale s, applied before the clamp (``None``: 1).
        hinge_b: MHL hinge b (``None``: ``qmargin.losses.DEFAULT_MHL_B`` if defined, else 1.0).
        label_smoothing: CE / MCEL label smoothing in [0, 1).
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
    margin: float | None = None
    bound: float | None = None
    logit_scale: float | None = None
    hinge_b: float | None = None
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
    label_smoothing: float = 0.0
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
        _choice("loss", self.loss, LOSSES)
        for name in _OPTIONAL_KNOBS:
            v = getattr(self, name)
            if v is None:
                continue
            unbounded = name == "bound" and isinstance(v, float) and v == math.inf
            if not (_is_num(v) or unbounded):
                raise ConfigError(f"{name} must be a finite number, got {v!r}")
            if name not in _LOSS_KNOBS[self.loss]:
                users = [k for k, knobs in _LOSS_KNOBS.items() if name in knobs]
                raise ConfigError(f"{name} applies to loss {' / '.join(users)}, not to loss {self.loss!r}")
            self._set(name, float(v))
        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"margin must be >= 0, got {self.margin}")
        for name in ("bound", "logit_scale", "hinge_b"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be > 0, got {v}")
        if self.margin is not None and self.bound is not None and self.margin >= 2 * self.bound:
            raise ConfigError(
                f"margin {self.margin} >= 2 * bound {self.bound}: logits clamped to (-T, T) cannot reach it"
            )
        self._number("label_smoothing", lo=0.0, hi=1.0, hi_open=True)
        if self.label_smoothing and "label_smoothing" not in _LOSS_KNOBS[self.loss]:
            raise ConfigError(f"label_smoothing applies to loss ce / mcel, not to loss {self.loss!r}")
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
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        _choice("device", self.device, DEVICES)
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            self._set("data_dir", str(self.data_dir))
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            raise ConfigError(f"model_kwargs must be a mapping of names to values, got {self.model_kwargs!r}")
        try:
            kwargs = json.loads(json.dumps(self.model_kwargs))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model_kwargs must hold JSON values only: {err}") from None
        self._set("model_kwargs", kwargs)

    def _number(
        self, name: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False,
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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`, missing ones take defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"a training config must be a JSON object, got {type(d).__name__}")
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


def _loss_defaults() -> dict[str, float]:
    """The library defaults of the loss knobs, read from :mod:`qmargin.losses` at call time."""
    from qmargin import losses

    return {
        "margin": float(losses.DEFAULT_MCEL_MARGIN),
        "bound": float(losses.DEFAULT_MCEL_BOUND),
        "hinge_b": float(getattr(losses, "DEFAULT_MHL_B", FALLBACK_MHL_B)),
    }


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """Fill the loss-specific knobs left at ``None`` with the library defaults.

    MCEL gets ``margin = DEFAULT_MCEL_MARGIN`` and ``bound = DEFAULT_MCEL_BOUND`` from
    :mod:`qmargin.losses` (``logit_scale`` stays ``None``, i.e. s = 1); MHL gets
    ``hinge_b = DEFAULT_MHL_B`` when the losses package defines it, else ``FALLBACK_MHL_B``. Knobs that
    do not belong to the chosen loss stay ``None``. Idempotent.
    """
    wanted = _LOSS_KNOBS[config.loss]
    missing = [k for k in _OPTIONAL_KNOBS if k in wanted and getattr(config, k) is None]
    if not missing:
        return config
    defaults = _loss_defaults()
    changes = {k: defaults[k] for k in missing if k in defaults}
    return replace(config, **changes) if changes else config
