"""Activation bit errors in campaigns: quantized activation buffers, calibrated once, hit per cell.

An :class:`ActivationSetup` is the plain, picklable description of the activation buffers of a
campaign: their :class:`~qmargin.quant.QuantSpec` (per tensor, 2..8 bits), the layers whose outputs
are quantized, the calibrated range of each (``scale``, ``zero_point``), how they were calibrated and
on what, and the **BER semantics** of a cell with grid BER ``p``:

* ``ber=P`` (a number, ``--act-ber P``): activation BER ``P`` in every cell, weights at ``p`` (the
  weight grid is swept while the activation BER stays fixed; ``P = 0``: quantized activations
  without errors, the default);
* ``ber=None`` (``--act-ber-follows``): activations and weights both at ``p`` (one grid sweeps both);
* ``weights=False`` (``--act-only``): activations at ``p`` (or ``P``), no weight errors at all.

A cell ``(p, s_r)`` injects the weight errors of ``with_ber(template, weight_ber(p))`` with seed
``s_r`` (:func:`qmargin.faults.inject`) **and** enters
:func:`qmargin.faults.activations.inject_activations` with ``with_ber(template, act_ber(p))`` and
the same seed ``s_r``: the same fault kinds, rates, protected bits and storage format as the
weights, drawn from the activation stream (``derive_seed(s_r, "activations", layer, batch, ...)``).
The batch index counts the forward passes of the cell from 0, so a cell's outcome depends only on
the model, the data (its batches: the batch size is a recorded setting), the setup and the cell:
patterns are paired across models (same layer names and buffer shapes) and reproducible on any
executor, shard or resume. The hooks are installed for the duration of one pass only
(:meth:`ActivationSetup.installed`), so a model travels to workers without them.

The clean value of such a campaign is the model with quantized activations and no errors.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.engine.grid import with_ber
from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec, quantized_modules
from qmargin.quant.activations import CALIBRATION_METHODS, ActivationQuantizers

__all__ = ["ActivationSetup", "activation_layers", "parse_calibration", "cell_errors", "is_null_cell"]


def parse_calibration(spec: str) -> tuple[str, float | None]:
    """``"minmax"`` -> ``("minmax", None)``; ``"percentile:99.9"`` -> ``("percentile", 99.9)``
    (a number in (50, 100]); anything else is a one-line ``ConfigError``."""
    text = str(spec).strip().lower()
    method, _, arg = text.partition(":")
    if method == "minmax" and not arg:
        return "minmax", None
    if method == "percentile":
        try:
            q = float(arg)
        except ValueError:
            q = math.nan
        if math.isfinite(q) and 50.0 < q <= 100.0:
            return "percentile", q
        raise ConfigError(f"activation calibration percentile:Q needs Q in (50, 100], got {spec!r}")
    raise ConfigError(
        f"activation calibration must be minmax or percentile:Q (e.g. percentile:99.9), got {spec!r}"
    )


def activation_layers(
    model: nn.Module, layers: Sequence[str] = ("*",), exclude: Sequence[str] = ()
) -> tuple[str, ...]:
    """Names of the qmargin quantized layers (``QuantizedTensors``) whose outputs are quantized: those
    matching a glob of ``layers`` and none of ``exclude`` (model order). A one-line ``ConfigError``
    when there is none (a model without qmargin layers, or globs that select none of them)."""
    names = [n for n, _ in quantized_modules(model) if n]
    chosen = tuple(
        n
        for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in layers)
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    )
    if not chosen:
        what = (
            "has no qmargin quantized layers"
            if not names
            else f"has no quantized layer matching {list(layers)}"
        )
        raise ConfigError(
            f"--act-bits: the model {what}, so there are no activation buffers to quantize "
            "(activations are the outputs of qmargin QuantLinear / QuantConv2d layers)"
        )
    return chosen


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ActivationSetup:
    """Calibrated activation buffers and the activation BER semantics of a campaign (module docstring).

    Build with :meth:`calibrate`; ``ranges`` maps each layer to ``(scale, zero_point)`` (the float32
    scale as a Python float: exact). ``calibration`` is plain JSON (method, percentile, source,
    samples) recorded in the result. ``batch_size``: the evaluation batch size (recorded: activation
    errors are drawn per batch).
    """

    spec: QuantSpec
    ranges: dict[str, tuple[float, int]]
    calibration: dict[str, Any] = field(default_factory=dict)
    ber: float | None = 0.0
    weights: bool = True
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise ConfigError(f"the activation spec must be a QuantSpec, got {type(self.spec).__name__}")
        if not self.ranges:
            raise ConfigError("the activation setup has no layers")
        if self.ber is not None:
            object.__setattr__(self, "ber", _rate("the activation BER", self.ber))
        if not self.weights and self.ber is not None:
            raise ConfigError(
                "activation errors only (no weight errors) take their BER from the grid, not a fixed "
                "activation BER: with one, every cell would be the same"
            )

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.ranges)

    # -- calibration ------------------------------------------------------------------------------
    @classmethod
    def calibrate(
        cls,
        model: nn.Module,
        spec: QuantSpec,
        batches: Iterable[Any],
        *,
        layers: Sequence[str] | None = None,
        method: str = "minmax",
        percentile: float | None = None,
        source: str = "",
        ber: float | None = 0.0,
        weights: bool = True,
        batch_size: int | None = None,
    ) -> ActivationSetup:
        """Calibrate the outputs of ``layers`` (default: every qmargin quantized layer) on the inputs
        ``batches`` (tensors on the model's device) in eval mode; ``source`` says what they are."""
        if method not in CALIBRATION_METHODS:
            raise ConfigError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
        q = ActivationQuantizers(model, spec, list(layers) if layers is not None else None)
        if method == "percentile" and percentile is None:
            percentile = 99.99
        samples = 0

        def counted() -> Iterator[Tensor]:
            nonlocal samples
            for x in batches:
                samples += int(x.shape[0])
                yield x

        try:
            q.calibrate(counted(), method, 99.99 if percentile is None else float(percentile))
        finally:
            q.remove()
        ranges = {n: (float(q.scale[n]), int(q.zero_point[n])) for n in q.layers}
        calibration = {
            "method": method,
            "percentile": percentile if method == "percentile" else None,
            "source": source,
            "samples": samples,
        }
        return cls(spec, ranges, calibration, ber, weights, batch_size)

    # -- cells ------------------------------------------------------------------------------------
    def act_ber(self, cell_ber: float) -> float:
        """The activation BER of a cell with grid BER ``cell_ber``."""
        return cell_ber if self.ber is None else self.ber

    def weight_ber(self, cell_ber: float) -> float | None:
        """The weight BER of the cell, ``None`` when weights take no errors (``weights=False``)."""
        return cell_ber if self.weights else None

    @contextlib.contextmanager
    def installed(self, model: nn.Module) -> Iterator[ActivationQuantizers]:
        """The calibrated quantizers on ``model`` for the block (hooks removed on exit)."""
        q = ActivationQuantizers(model, self.spec, list(self.layers))
        try:
            state = {}
            for n, (scale, zp) in self.ranges.items():
                state[f"{n}.scale"] = torch.tensor(scale, dtype=torch.float32)
                state[f"{n}.zero_point"] = torch.tensor(zp, dtype=torch.int32)
            q.load_state_dict(state)
            yield q
        finally:
            q.remove()

    # -- record -----------------------------------------------------------------------------------
    def ranges_sha256(self) -> str:
        """SHA-256 of the ranges (layer, scale as float32 bytes, zero point), in layer order."""
        h = hashlib.sha256()
        for n, (scale, zp) in self.ranges.items():
            h.update(f"{n}|".encode())
            h.update(torch.tensor(scale, dtype=torch.float32).numpy().tobytes())
            h.update(f"|{zp};".encode())
        return h.hexdigest()

    def to_dict(self, protected_bits: Sequence[int] = ()) -> dict[str, Any]:
        """The settings a result records (a resume or a merge with other values is refused)."""
        return {
            "bits": self.spec.bits,
            "spec": self.spec.to_dict(),
            "layers": list(self.layers),
            "calibration": dict(self.calibration),
            "ranges": {n: {"scale": s, "zero_point": z} for n, (s, z) in self.ranges.items()},
            "ranges_sha256": self.ranges_sha256(),
            "ber": self.ber if self.ber is not None else "grid",
            "weight_errors": self.weights,
            "protected_bits": list(protected_bits),
            "batch_size": self.batch_size,
            "seed_scheme": "pattern seed s_r; layer L, batch i of the pass: "
            "derive_seed(s_r, 'activations', L, i, kind)",
        }


@contextlib.contextmanager
def cell_errors(
    model: nn.Module, template: Any, setup: ActivationSetup, ber: float, seed: int
) -> Iterator[Any]:
    """Yields the weight injection's report (``None`` without weight errors). Inside the block: the
    weight errors of the cell (grid BER ``ber``, seed ``seed``; none when
    ``setup.weights`` is off) and the calibrated activation quantizers with the cell's activation
    errors (same template and seed, the activation stream). Everything is restored on exit."""
    from qmargin.faults import inject  # looked up per call: tests substitute qmargin.faults.inject
    from qmargin.faults.activations import inject_activations

    with contextlib.ExitStack() as stack:
        wb = setup.weight_ber(ber)
        report = None if wb is None else stack.enter_context(inject(model, with_ber(template, wb), seed))
        q = stack.enter_context(setup.installed(model))
        stack.enter_context(inject_activations(q, with_ber(template, setup.act_ber(ber)), seed))
        yield report


def is_null_cell(template: Any, setup: ActivationSetup | None, ber: float) -> bool:
    """Whether a cell at grid BER ``ber`` can change no bit (weights nor activations): its outcome is
    the clean one."""
    if setup is None:
        return bool(getattr(with_ber(template, ber), "is_null", False))
    wb = setup.weight_ber(ber)
    weights_null = wb is None or bool(getattr(with_ber(template, wb), "is_null", False))
    return weights_null and bool(getattr(with_ber(template, setup.act_ber(ber)), "is_null", False))
