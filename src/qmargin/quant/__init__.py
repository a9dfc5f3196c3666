"""Quantization as hardware stores it: integer codes, scales and zero points (design.md §1).

Imports nothing else of qmargin; its errors (:mod:`qmargin.quant.errors`) are ``ValueError`` s.
"""

from qmargin.quant.codes import STORAGE_FORMATS, StorageFormat
from qmargin.quant.convert import (
    IntegerState,
    StoredRef,
    export_integer_state,
    freeze_model,
    link_tied,
    load_integer_state,
    quantize_model,
    quantized_modules,
    tied_stored_tensors,
    unfreeze_model,
)
from qmargin.quant.errors import IntegerStateError, NonFiniteTensorError, QuantConfigError, TiedParameterError
from qmargin.quant.functional import (
    check_finite,
    check_stored,
    code_dtype,
    compute_scale,
    dequantize,
    fake_quantize,
    quantize,
)
from qmargin.quant.modules import QuantConv2d, QuantizedTensors, QuantLinear, StoredTensor
from qmargin.quant.spec import QuantSpec

__all__ = [
    "QuantSpec",
    "StorageFormat",
    "STORAGE_FORMATS",
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
    "tied_stored_tensors",
    "link_tied",
    "StoredRef",
    "check_finite",
    "check_stored",
    "QuantConfigError",
    "NonFiniteTensorError",
    "TiedParameterError",
    "IntegerStateError",
]
