"""Losses on outputs in units of the output layer's weight codes (MHL with ``units="codes"``).

A quantized output layer computes ``z_j = Δ_j (sum_i c_ji x_i) + β_j`` with codes ``c`` and weight
scale ``Δ`` (design.md §1). In code units the output is ``z_j / Δ_j = sum_i c_ji x_i + β_j / Δ_j``;
for 1-bit sign codes and ±1 inputs it is the popcount a binarized network computes, the scale on which
the BNN bit-error work sets the hinge ``b = 128`` (Buschjäger et al., DATE 2021). ``Δ`` is taken as a
constant (detached), so the gradient is the one of the hinge on ``z / Δ``.
"""

from __future__ import annotations

from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.quant.functional import compute_scale
from qmargin.quant.modules import QuantizedTensors

__all__ = ["InCodeUnits", "output_weight_scale", "wrap_loss_units"]


def _output_layer(model: nn.Module) -> QuantizedTensors:
    layers = [m for m in model.modules() if isinstance(m, QuantizedTensors) and "weight" in m.quant_specs]
    if not layers:
        raise ConfigError("a loss in code units needs a model whose output layer is quantized")
    return layers[-1]


def output_weight_scale(model: nn.Module) -> Tensor:
    """``Δ`` of the model's last quantized layer (registration order): 0-d or ``[C]``, detached.

    Refuses an asymmetric (zero-point) output layer, whose codes have no sign-symmetric units.
    """
    layer = _output_layer(model)
    spec = layer.quant_specs["weight"]
    if not spec.symmetric:
        raise ConfigError("a loss in code units needs a symmetric (zero point 0) output layer")
    if getattr(layer, "_frozen", False):
        return layer.get_buffer("weight_scale").detach()
    scale, _ = compute_scale(layer.get_parameter("weight"), spec, name="output weight")
    return scale.detach()


class InCodeUnits(nn.Module):
    """``loss(z / Δ, y)`` with ``Δ`` the output layer's current weight scale (:func:`output_weight_scale`)."""

    def __init__(self, loss: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self._model = [model]  # a list: not registered as a submodule (no parameters counted twice)
        output_weight_scale(model)  # refuse now, not in the first step

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        delta = output_weight_scale(self._model[0]).to(logits.dtype)
        return self.loss(logits / delta, target)


def wrap_loss_units(loss: nn.Module, model: nn.Module) -> nn.Module:
    """``loss`` itself, or :class:`InCodeUnits` around it when it asks for ``units == "codes"``."""
    return InCodeUnits(loss, model) if getattr(loss, "units", "logits") == "codes" else loss
