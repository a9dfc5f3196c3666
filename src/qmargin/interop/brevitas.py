"""Brevitas quantized layers as a code provider (Brevitas 0.13; docs/interop.md).

A Brevitas layer (``QuantLinear``, ``QuantConv1d/2d/3d``, ``QuantConvTranspose*``, ...) keeps float
weights and re-quantizes them on every forward pass through its weight quantizer
(``layer.weight_quant``, a ``WeightQuantProxyFromInjector``), so corrupting the codes it computes
once would change nothing. Pinning uses Brevitas's own export path: the quantizer's ``export_handler``
slot gets a handler holding the layer's integer codes ``q = quant_weight().int()`` (``int8`` when
signed, ``uint8`` when not), its ``scale``, ``zero_point`` and ``bit_width``, and the quantizer is put
in ``export_mode``. From then on every forward pass (and ``quant_weight()``) computes
``w_hat = (q - zero_point) * scale`` from those live codes, which inject corrupts in place. Pinning
checks that this reproduces Brevitas's own quantized weight bit for bit before installing it;
unpinning leaves export mode, and the layer quantizes its float weights again (which are untouched).

Reached: integer weight quantizers with a constant integer bit width in 2..8, signed (two's-complement
words: ``Int8WeightPerTensorFloat``, ``Int8WeightPerChannelFloat``, ... with any ``weight_bit_width``,
narrow range or not) or unsigned with a zero point (``ShiftedUint8WeightPerTensorFloat``, ...),
scales per tensor or per output channel, learned or from statistics. Refused with a ``ConfigError``
naming the layer: float (minifloat/FP8) and group-wise (MX) weight quantizers, 1-bit (binary)
quantizers, a quantizer shared by several layers, a layer in training mode or already in export mode.
Biases are not exposed (Brevitas bias quantizers hold up to 32-bit codes).

Brevitas is never imported here unless it already is: a model cannot hold its layers otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.interop.registry import CodeProvider, CodeTensor, StoredName, refuse

__all__ = ["BrevitasLayers"]


class _PinnedWeight(nn.Module):
    """An ``export_handler`` for a Brevitas weight quantizer: dequantizes fixed integer codes.

    Its tensors are non-persistent buffers (they move with the model; the state dict is unchanged).
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    bit_width: Tensor

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bit_width: Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero_point", zero_point, persistent=False)
        self.register_buffer("bit_width", bit_width, persistent=False)

    def prepare_for_export(self, module: nn.Module) -> None:  # Brevitas's handler protocol
        pass

    def attach_debug_info(self, module: nn.Module) -> None:  # Brevitas's handler protocol
        pass

    def dequantize(self) -> Tensor:
        return (self.codes.to(self.scale.dtype) - self.zero_point) * self.scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.dequantize(), self.scale, self.zero_point, self.bit_width


def _proxy_class() -> Any:
    if "brevitas" not in sys.modules:
        return None
    from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjectorBase  # lazy

    return WeightQuantProxyFromInjectorBase


class BrevitasLayers(CodeProvider):
    """The weight of every Brevitas layer whose weight quantizer is enabled (module docstring)."""

    name = "brevitas"

    def stored_groups(self, model: nn.Module) -> list[list[StoredName]]:
        base = _proxy_class()
        if base is None:
            return []
        groups: dict[int, list[StoredName]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            proxy: Any = getattr(m, "weight_quant", None)
            if (
                isinstance(proxy, base)
                and proxy.is_quant_enabled
                and isinstance(m._parameters.get("weight"), Tensor)
            ):
                groups.setdefault(id(m), []).append((name, m, "weight"))
        return list(groups.values())

    def pin(self, name: str, module: nn.Module, tensor: str) -> bool:
        proxy: Any = module.weight_quant
        if isinstance(getattr(proxy, "export_handler", None), _PinnedWeight):
            return False
        from brevitas.proxy.groupwise_int_parameter_quant import GroupwiseWeightQuantProxyFromInjector  # lazy
        from brevitas.proxy.parameter_quant import WeightQuantProxyFromInjector  # lazy

        kind = f"Brevitas {type(proxy).__name__}"
        if not isinstance(proxy, WeightQuantProxyFromInjector):
            raise refuse(name, kind, "not an integer weight quantizer")
        if isinstance(proxy, GroupwiseWeightQuantProxyFromInjector):
            raise refuse(name, kind, "group-wise codes are not reached")
        if len(proxy.tracked_module_list) != 1:
            raise refuse(name, kind, f"one quantizer shared by {len(proxy.tracked_module_list)} layers")
        if module.training:
            raise refuse(name, kind, "the layer is in training mode; stress it in eval mode (model.eval())")
        if proxy.export_mode:
            raise refuse(name, kind, "the quantizer is already in export mode")
        with torch.no_grad():
            qt = module.quant_weight()  # type: ignore[operator]
            bits = float(qt.bit_width)
            if bits != int(bits) or not 2 <= bits <= 8:
                raise refuse(name, kind, f"bit width {bits:g}; reached: integer widths 2..8")
            codes = qt.int()
            want = torch.int8 if qt.signed else torch.uint8
            if codes.dtype != want:
                codes = codes.to(want)
            handler = _PinnedWeight(
                codes.contiguous(),
                qt.scale.detach().clone(),
                qt.zero_point.detach().clone(),
                qt.bit_width.detach().clone(),
            )
            if not torch.equal(handler.dequantize(), qt.value.detach()):
                raise refuse(name, kind, "its quantized weight is not (code - zero_point) * scale")
        proxy.export_handler = handler
        proxy.export_mode = True
        return True

    def unpin(self, name: str, module: nn.Module, tensor: str) -> None:
        proxy: Any = module.weight_quant
        if isinstance(getattr(proxy, "export_handler", None), _PinnedWeight):
            proxy.export_mode = False  # Brevitas drops the handler when leaving export mode
            proxy.export_handler = None

    def codes(self, name: str, module: nn.Module, tensor: str) -> CodeTensor:
        proxy: Any = module.weight_quant
        handler = getattr(proxy, "export_handler", None)
        if not isinstance(handler, _PinnedWeight):
            raise RuntimeError(f"layer {name!r}: pin the Brevitas layer before reading its codes")
        shape = tuple(handler.codes.shape)
        scale_shape = tuple(handler.scale.shape)
        if handler.scale.numel() == 1:
            block = shape
        else:
            full = (1,) * (len(shape) - len(scale_shape)) + scale_shape
            block = tuple(n // s for n, s in zip(shape, full, strict=True))
        signed = handler.codes.dtype == torch.int8
        return CodeTensor(
            handler.codes,
            int(float(handler.bit_width)),
            signed,
            handler.scale,
            handler.zero_point,
            block,
            f"brevitas.{type(module).__name__}",
        )
