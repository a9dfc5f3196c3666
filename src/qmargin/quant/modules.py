"""Quantized layers: float shadow weights for training, integer codes as the stored form.

Every quantized module derives from :class:`QuantizedTensors`. It names the tensors it stores in
low precision (``quant_specs``: ``{"weight": QuantSpec, ...}``) and can be in one of two states:

* **training** (default): the forward pass uses ``fake_quantize(float_tensor(name), spec)``;
* **frozen** (:meth:`QuantizedTensors.freeze`): the stored form ``(codes, scale, zero_point)`` lives in
  buffers ``{name}_codes``/``{name}_scale``/``{name}_zero_point`` and the forward pass uses
  ``dequantize(codes, ...)``. Bit errors (:mod:`qmargin.faults`) corrupt these codes in place.

Both states compute bit-for-bit the same outputs as long as the codes are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Self

from qmargin.quant.functional import check_stored, dequantize, fake_quantize, quantize
from qmargin.quant.spec import QuantSpec

__all__ = ["StoredTensor", "QuantizedTensors", "QuantLinear", "QuantConv2d"]


@dataclass
class StoredTensor:
    """The stored (hardware) form of one tensor. ``codes`` is the live buffer: edits act in place."""

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    spec: QuantSpec

    def dequantize(self) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.spec)


class QuantizedTensors(nn.Module):
    """Base class of every module whose tensors are stored as integer codes.

    Subclasses fill ``self.quant_specs`` and implement :meth:`float_tensor`. Any module that follows
    this protocol (our MonDEQ layers do) is seen by ``qmargin.faults.inject`` and by
    :func:`qmargin.quant.export_integer_state`.
    """

    quant_specs: dict[str, QuantSpec]

    def __init__(self) -> None:
        super().__init__()
        self.quant_specs = {}
        self._frozen = False

    # -- to implement -------------------------------------------------------------------------
    def float_tensor(self, name: str) -> Tensor:
        """The float (shadow) tensor that is quantized under ``name``."""
        raise NotImplementedError

    def set_float_tensor(self, name: str, value: Tensor) -> None:
        """Overwrite the float tensor behind ``name`` (used when loading an integer state)."""
        with torch.no_grad():
            self.float_tensor(name).copy_(value)

    # -- stored form --------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self) -> None:
        """Compute the stored form of every quantized tensor and use it in the forward pass.

        Every tensor is quantized before anything is installed: a non-finite float tensor raises
        :class:`qmargin.quant.errors.NonFiniteTensorError` (naming it) and leaves the module as it was.
        """
        stored = {
            name: quantize(self.float_tensor(name), spec, name=f"{type(self).__name__}.{name}")
            for name, spec in self.quant_specs.items()
        }
        for name, (codes, scale, zp) in stored.items():
            self._set_stored(name, codes, scale, zp)
        self._frozen = True

    def load_stored(
        self, name: str, codes: Tensor, scale: Tensor, zero_point: Tensor, *, key: str | None = None
    ) -> None:
        """Install a given stored form (e.g. from :func:`export_integer_state`) and freeze.

        The stored form is checked first (:func:`qmargin.quant.functional.check_stored`): codes of
        exactly the spec's dtype and the tensor's shape whose values are b-bit words, finite positive
        scales, ``int32`` zero points in range; nothing is cast silently. Errors raise
        :class:`qmargin.quant.errors.IntegerStateError` naming ``key`` (default ``name``).
        """
        spec = self.quant_specs[name]
        ref = self.float_tensor(name)
        check_stored(codes, scale, zero_point, spec, tuple(ref.shape), key or name)
        self._set_stored(
            name, codes.to(ref.device), scale.to(ref.device, ref.dtype), zero_point.to(ref.device)
        )
        self.set_float_tensor(name, dequantize(codes, scale, zero_point, spec).to(ref.device, ref.dtype))
        if all(hasattr(self, f"{n}_codes") for n in self.quant_specs):
            self._frozen = True

    def _set_stored(self, name: str, codes: Tensor, scale: Tensor, zp: Tensor) -> None:
        self.register_buffer(f"{name}_codes", codes, persistent=False)
        self.register_buffer(f"{name}_scale", scale, persistent=False)
        self.register_buffer(f"{name}_zero_point", zp, persistent=False)

    def unfreeze(self) -> None:
        """Drop the stored form; the forward pass fake-quantizes the float tensors again."""
        for name in self.quant_specs:
            for suffix in ("codes", "scale", "zero_point"):
                if f"{name}_{suffix}" in self._buffers:
                    del self._buffers[f"{name}_{suffix}"]
        self._frozen = False

    def stored(self, name: str = "weight") -> StoredTensor:
        """The stored form of ``name``; freezes the module first if needed."""
        if name not in self.quant_specs:
            raise KeyError(f"{type(self).__name__} stores no quantized tensor {name!r}")
        if not self._frozen:
            self.freeze()
        return StoredTensor(
            getattr(self, f"{name}_codes"),
            getattr(self, f"{name}_scale"),
            getattr(self, f"{name}_zero_point"),
            self.quant_specs[name],
        )

    def codes(self, name: str = "weight") -> Tensor:
        """Integer codes of ``name`` (the live buffer when frozen, freshly computed otherwise)."""
        if self._frozen:
            return getattr(self, f"{name}_codes")
        return quantize(self.float_tensor(name), self.quant_specs[name])[0]

    def quantized_tensor(self, name: str) -> Tensor:
        """What the forward pass uses for ``name``: dequantized codes (frozen) or fake-quantized floats."""
        if self._frozen:
            return dequantize(
                getattr(self, f"{name}_codes"),
                getattr(self, f"{name}_scale"),
                getattr(self, f"{name}_zero_point"),
                self.quant_specs[name],
            )
        return fake_quantize(self.float_tensor(name), self.quant_specs[name])

    def _maybe_quantized(self, name: str, value: Tensor | None) -> Tensor | None:
        if value is None or name not in self.quant_specs:
            return value
        return self.quantized_tensor(name)

    def train(self, mode: bool = True) -> Self:
        # Training updates the float weights, so a stale stored form must not be used.
        if mode and self._frozen:
            self.unfreeze()
        return super().train(mode)


class _QuantizedLayer(QuantizedTensors):
    """What ``QuantLinear`` and ``QuantConv2d`` share: ``weight``/``bias`` are the float tensors."""

    weight: Tensor

    def float_tensor(self, name: str) -> Tensor:
        return getattr(self, name)

    def _copy_float(self, m: nn.Linear | nn.Conv2d) -> None:
        bias: Tensor | None = getattr(self, "bias", None)
        with torch.no_grad():
            self.weight.copy_(m.weight)
            if m.bias is not None and bias is not None:
                bias.copy_(m.bias)
        self.train(m.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spec={self.quant_specs['weight']}"


class QuantLinear(_QuantizedLayer, nn.Linear):
    """``nn.Linear`` whose weight (and optionally bias) is stored as integer codes."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spec: QuantSpec | None = None,
        bias_spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.quant_specs = {"weight": spec or QuantSpec(8)}
        if bias and bias_spec is not None:
            self.quant_specs["bias"] = bias_spec
        self._frozen = False

    @classmethod
    def from_float(cls, m: nn.Linear, spec: QuantSpec, bias_spec: QuantSpec | None = None) -> QuantLinear:
        q = cls(
            m.in_features,
            m.out_features,
            m.bias is not None,
            spec,
            bias_spec,
            device=m.weight.device,
            dtype=m.weight.dtype,
        )
        q._copy_float(m)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_tensor("weight"), self._maybe_quantized("bias", self.bias))


class QuantConv2d(_QuantizedLayer, nn.Conv2d):
    """``nn.Conv2d`` whose weight (and optionally bias) is stored as integer codes.

    Per-channel scales run over output channels.
    """

    def __init__(
        self, *args: Any, spec: QuantSpec | None = None, bias_spec: QuantSpec | None = None, **kwargs: Any
    ) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self.quant_specs = {"weight": spec or QuantSpec(8)}
        if self.bias is not None and bias_spec is not None:
            self.quant_specs["bias"] = bias_spec
        self._frozen = False

    @classmethod
    def from_float(cls, m: nn.Conv2d, spec: QuantSpec, bias_spec: QuantSpec | None = None) -> QuantConv2d:
        q = cls(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            spec=spec,
            bias_spec=bias_spec,
            device=m.weight.device,
            dtype=m.weight.dtype,
        )
        q._copy_float(m)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(
            x, self.quantized_tensor("weight"), self._maybe_quantized("bias", self.bias)
        )
