"""Quantized activations: integer codes of layer outputs (the activation buffers of a chip).

An *activation buffer* is a tensor a layer writes to memory for the next layer to read. qmargin
quantizes the **outputs of chosen modules** (by default every quantized layer, ``QuantLinear`` /
``QuantConv2d``: the buffers between the layers whose weights live in quantized memory) to
integer codes with their own :class:`QuantSpec`, per tensor, and dequantizes them before the next
layer reads them. Bit errors then act on those codes (:mod:`qmargin.faults.activations`).

Functional core (this module, pure functions) plus a thin hook holder
(:class:`ActivationQuantizers`, forward hooks on any ``nn.Module``; the state is plain tensors).

Calibration of the range of a layer's outputs ``x`` over a calibration set:

* ``"minmax"``: ``lo = min(x)``, ``hi = max(x)``;
* ``"percentile"`` (``q``, e.g. 99.99): ``hi = P_q(x)``, ``lo = P_{100-q}(x)`` (symmetric:
  ``hi = P_q(|x|)``), with linear interpolation between order statistics (``torch.quantile``);
  values outside are clamped by the quantizer.

From the range, as for weights (design.md §1): symmetric ``scale = max(|lo|, |hi|) / qmax``,
``code = clamp(round(x / scale), -qmax, qmax)``, zero point 0; asymmetric (e.g. unsigned codes of
post-ReLU outputs) ``lo <- min(lo, 0)``, ``hi <- max(hi, 0)``, ``scale = (hi - lo) / qmax``,
``zp = clamp(round(-lo / scale), 0, qmax)``, ``code = clamp(round(x / scale) + zp, 0, qmax)``.
A zero range gives ``scale = 1``. Dequantization is :func:`qmargin.quant.dequantize`.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.quant.errors import QuantConfigError
from qmargin.quant.functional import check_finite, code_dtype, dequantize
from qmargin.quant.modules import QuantizedTensors
from qmargin.quant.spec import QuantSpec

__all__ = [
    "CALIBRATION_METHODS",
    "activation_range",
    "activation_scale",
    "quantize_activation",
    "fake_quantize_activation",
    "ActivationQuantizers",
]

CALIBRATION_METHODS = ("minmax", "percentile")

_QUANTILE_MAX = 1 << 24  # torch.quantile refuses larger inputs; a strided subsample is used beyond


def _check_spec(spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if spec.bits > 8 or spec.bits < 2:
        raise QuantConfigError(f"activation codes take 2..8 bits, got {spec.bits}")
    if spec.per_channel:
        raise QuantConfigError("activation codes are per tensor (per_channel=False)")
    if spec.w_max is not None:
        raise QuantConfigError("activation ranges come from calibration; w_max is for weights")


def _check_percentile(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 50.0 < float(q) <= 100.0:
        raise QuantConfigError(f"percentile must be a number in (50, 100], got {q!r}")
    return float(q)


def _quantile(x: Tensor, q: float) -> float:
    flat = x.detach().reshape(-1).to(torch.float64)
    if flat.numel() > _QUANTILE_MAX:
        flat = flat[:: math.ceil(flat.numel() / _QUANTILE_MAX)]
    return float(torch.quantile(flat, q / 100.0))


def activation_range(
    x: Tensor, spec: QuantSpec, method: str = "minmax", percentile: float = 99.99
) -> tuple[float, float]:
    """The calibrated range ``(lo, hi)`` of the activations ``x`` (module docstring).

    Symmetric: ``(-a, a)`` with ``a = max|x|`` (minmax) or ``P_q(|x|)``; asymmetric: ``(min(lo, 0),
    max(hi, 0))`` with ``lo, hi = min x, max x`` or ``P_{100-q}(x), P_q(x)``.
    """
    _check_spec(spec)
    if method not in CALIBRATION_METHODS:
        raise QuantConfigError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if not isinstance(x, Tensor) or not torch.is_floating_point(x) or not x.numel():
        raise QuantConfigError("calibration needs a non-empty floating point tensor of activations")
    check_finite(x, "activations")
    if spec.symmetric:
        a = float(x.abs().max()) if method == "minmax" else _quantile(x.abs(), _check_percentile(percentile))
        return -a, a
    if method == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:
        q = _check_percentile(percentile)
        lo, hi = _quantile(x, 100.0 - q), _quantile(x, q)
    return min(lo, 0.0), max(hi, 0.0)


def activation_scale(lo: float, hi: float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``(scale, zero_point)`` (0-d float32 / int32) of the range ``[lo, hi]`` (module docstring)."""
    _check_spec(spec)
    if spec.symmetric:
        s = max(abs(lo), abs(hi)) / spec.qmax
        return torch.tensor(s if s > 0 else 1.0), torch.tensor(0, dtype=torch.int32)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / spec.qmax
    s = s if s > 0 else 1.0
    scale = torch.tensor(s)
    zp = torch.round(-torch.tensor(lo) / scale).clamp(0, spec.qmax).to(torch.int32)
    return scale, zp


def quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Codes of ``x``: ``clamp(round(x / scale) + zp, qmin, qmax)`` in ``code_dtype(spec)``."""
    q = torch.round(x.detach() / scale.to(x.dtype)) + zero_point.to(x.dtype)
    return q.clamp(spec.qmin, spec.qmax).to(code_dtype(spec))


def fake_quantize_activation(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """``dequantize(quantize_activation(x))`` in ``x``'s dtype (no gradient: evaluation only)."""
    codes = quantize_activation(x, scale, zero_point, spec)
    return dequantize(codes, scale.to(x.dtype), zero_point, spec)


def _default_targets(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedTensors)]


CodeEdit = Callable[[str, Tensor], None]
"""Called with ``(layer, codes)`` on every buffer's codes before they are read back; edits in place."""


class ActivationQuantizers:
    """Activation quantizers on the outputs of chosen modules of ``model`` (forward hooks).

    ``layers``: glob patterns on module names (``fnmatch``); ``None`` = every quantized layer
    (``QuantizedTensors``: the outputs of ``QuantLinear`` / ``QuantConv2d``). A pattern matching no
    module raises ``QuantConfigError``. The model itself is not changed beyond the hooks;
    :meth:`remove` takes them off.

    Life cycle: :meth:`calibrate` runs the calibration batches through the model and records, per
    layer, the range (min/max or percentile over all calibration outputs); then every forward pass
    replaces each chosen output ``x`` by ``dequantize(edit(quantize(x)))``, where ``edit`` is the
    code editor set with :meth:`set_code_edit` (activation faults; ``None``: clean). State:
    :meth:`state_dict` (``{layer}.scale`` / ``{layer}.zero_point`` tensors, for safetensors) and
    :meth:`config` (JSON).
    """

    def __init__(self, model: nn.Module, spec: QuantSpec, layers: Iterable[str] | str | None = None) -> None:
        _check_spec(spec)
        self.model = model
        self.spec = spec
        names = dict(model.named_modules())
        if layers is None:
            targets = _default_targets(model)
            if not targets:
                raise QuantConfigError("the model has no quantized layers; name the modules with layers=")
        else:
            patterns = [layers] if isinstance(layers, str) else list(layers)
            targets = []
            for pattern in patterns:
                hit = [n for n in names if n and fnmatch.fnmatchcase(n, pattern)]
                if not hit:
                    raise QuantConfigError(f"activation layers pattern {pattern!r} matches no module")
                targets += [n for n in hit if n not in targets]
            targets = [n for n in names if n in targets]  # model order
        self.layers: tuple[str, ...] = tuple(targets)
        self.scale: dict[str, Tensor] = {}
        self.zero_point: dict[str, Tensor] = {}
        self._edit: CodeEdit | None = None
        self._collect: dict[str, list[Tensor]] | None = None
        self.method: str | None = None
        self.percentile: float | None = None
        self._handles = [names[n].register_forward_hook(self._hook(n)) for n in self.layers]

    # -- hooks ------------------------------------------------------------------------------
    def _hook(self, layer: str) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not isinstance(output, Tensor):
                kind = type(output).__name__
                raise QuantConfigError(f"activation layer {layer!r} returns {kind}, not a tensor")
            if self._collect is not None:
                self._collect[layer].append(output.detach().reshape(-1).cpu())
                return None
            if layer not in self.scale:
                raise QuantConfigError("activation quantizers are not calibrated (call calibrate first)")
            scale, zp = self.scale[layer].to(output.device), self.zero_point[layer].to(output.device)
            codes = quantize_activation(output, scale, zp, self.spec)
            if self._edit is not None:
                self._edit(layer, codes)
            return dequantize(codes, scale.to(output.dtype), zp, self.spec)

        return hook

    def set_code_edit(self, edit: CodeEdit | None) -> None:
        """Install (or, with ``None``, remove) the editor of activation codes."""
        self._edit = edit

    # -- calibration and state --------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor], method: str = "minmax", percentile: float = 99.99) -> None:
        """Record each layer's range over the outputs of ``batches`` (inputs), run in eval mode."""
        self._collect = {n: [] for n in self.layers}
        was_training = self.model.training
        self.model.eval()
        try:
            n = 0
            for x in batches:
                self.model(x)
                n += 1
            if not n:
                raise QuantConfigError("calibration needs at least one batch")
            for layer, parts in self._collect.items():
                lo, hi = activation_range(torch.cat(parts), self.spec, method, percentile)
                self.scale[layer], self.zero_point[layer] = activation_scale(lo, hi, self.spec)
        finally:
            self._collect = None
            self.model.train(was_training)
        self.method, self.percentile = method, percentile

    def state_dict(self) -> dict[str, Tensor]:
        """``{f"{layer}.scale": ..., f"{layer}.zero_point": ...}`` (safetensors-ready)."""
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            out[f"{layer}.scale"] = self.scale[layer].clone()
            out[f"{layer}.zero_point"] = self.zero_point[layer].clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict` (every layer's two tensors, 0-d, checked)."""
        for layer in self.layers:
            scale, zp = state.get(f"{layer}.scale"), state.get(f"{layer}.zero_point")
            if not isinstance(scale, Tensor) or not isinstance(zp, Tensor):
                raise QuantConfigError(f"activation state lacks {layer}.scale / {layer}.zero_point")
            if scale.dim() or zp.dim() or not float(scale) > 0 or not math.isfinite(float(scale)):
                raise QuantConfigError(
                    f"activation state of {layer}: need a positive 0-d scale and a 0-d zero point"
                )
            self.scale[layer], self.zero_point[layer] = scale.clone().float(), zp.clone().to(torch.int32)

    def config(self) -> dict[str, Any]:
        """JSON description: spec, layers, calibration."""
        return {
            "spec": self.spec.to_dict(),
            "layers": list(self.layers),
            "calibration": self.method,
            "percentile": self.percentile if self.method == "percentile" else None,
        }

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
