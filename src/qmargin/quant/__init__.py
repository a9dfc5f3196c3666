"""Quantization as hardware stores it: integer codes, scales and zero points (design.md §1).

Imports nothing else of qmargin.
"""

from qmargin.quant.convert import (
    IntegerState,
    export_integer_state,
    freeze_model,
    load_integer_state,
    quantize_model,
    quantized_modules,
    unfreeze_model,
)
from qmargin.quant.functional import code_dtype, compute_scale, dequantize, fake_quantize, quantize
from qmargin.quant.modules import QuantConv2d, QuantizedTensors, QuantLinear, StoredTensor
from qmargin.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "quantize",
    "dequantize",
    "fake_quantize",
    "compute_scale",
    "code_dtype",
    "QuantizedTensors",
    "StoredTensor",
    "QuantLinear",
    "QuantConv2d",
    "quantize_model",
    "quantized_modules",
    "freeze_model",
    "unfreeze_model",
    "IntegerState",
    "export_integer_state",
    "load_integer_state",
]
