"""torchao's weight tensor subclasses as a code provider (torchao 0.18; docs/interop.md).

``quantize_(model, config)`` replaces the weight Parameter of each layer by a tensor subclass that
holds the integer codes itself; the layer computes from them on every call, so the codes are
corrupted in place and nothing needs pinning. Reached:

* ``Int8Tensor`` (``Int8WeightOnlyConfig``, ``Int8DynamicActivationInt8WeightConfig``): ``qdata``
  ``int8`` codes, 8-bit two's-complement words; ``scale`` and ``zero_point`` per ``block_size``
  block (``PerRow``: one per output row; ``PerTensor``; ``PerGroup``);
  ``w_hat = (qdata - zero_point) * scale``.
* ``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``, ``Int8DynamicActivationIntxWeightConfig``):
  ``qdata`` holds b-bit codes (``target_dtype`` ``torch.int2`` .. ``torch.int8``) unpacked one per
  ``int8``; the word is their b-bit two's complement, so a flip of bit ``b-1`` sign-extends and the
  code stays in ``[-2**(b-1), 2**(b-1) - 1]``.

Every other torchao tensor subclass (packed int4 layouts such as ``Int4Tensor``,
``Int4TilePackedTo4dTensor``, ``Int4PlainInt32Tensor``, ``Int4PreshuffledTensor``, ``IntxOpaqueTensor``;
float8 and NF4 codes) is listed under its layer, so a selection can spare it, and refused with a
``ConfigError`` naming the layer and the layout when selected.

torchao is never imported here unless it already is: a model cannot hold its tensors otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.interop.registry import CodeProvider, CodeTensor, StoredName, refuse

__all__ = ["TorchaoTensors", "SUPPORTED_LAYOUTS"]

SUPPORTED_LAYOUTS = ("Int8Tensor", "IntxUnpackedToInt8Tensor")

_PACKED = {
    "Int4Tensor": "int4 codes packed two per byte for the fbgemm/mslk kernels",
    "Int4TilePackedTo4dTensor": "int4 codes packed into the tinygemm 4-d tile layout",
    "Int4PlainInt32Tensor": "int4 codes packed eight per int32",
    "Int4PreshuffledTensor": "int4 codes packed and preshuffled for fbgemm",
    "IntxOpaqueTensor": "codes packed into an opaque buffer for the CPU kernels",
    "Float8Tensor": "float8 values, not integer codes",
    "NF4Tensor": "NF4 lookup-table codes, not uniform integer codes",
}

_INT_BITS = {getattr(torch, f"int{b}"): b for b in range(1, 8) if hasattr(torch, f"int{b}")}
_INT_BITS[torch.int8] = 8


def _base() -> type | None:
    """torchao's tensor base class, or None when torchao is not imported."""
    if "torchao" not in sys.modules:
        return None
    from torchao.utils import TorchAOBaseTensor  # lazy: only when a model may hold its tensors

    return TorchAOBaseTensor


class TorchaoTensors(CodeProvider):
    """Parameters of any module that are torchao tensor subclasses (module docstring)."""

    name = "torchao"

    def stored_groups(self, model: nn.Module) -> list[list[StoredName]]:
        base = _base()
        if base is None:
            return []
        groups: dict[int, list[StoredName]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for pname, p in m._parameters.items():
                if isinstance(p, base):
                    key = id(getattr(p, "qdata", p))
                    groups.setdefault(key, []).append((name, m, pname))
        return list(groups.values())

    def pin(self, name: str, module: nn.Module, tensor: str) -> bool:
        self.codes(name, module, tensor)  # refuses what cannot be reached
        return False

    def codes(self, name: str, module: nn.Module, tensor: str) -> CodeTensor:
        t: Any = module._parameters[tensor]
        layout = type(t).__name__
        if layout not in SUPPORTED_LAYOUTS:
            why = _PACKED.get(layout, f"supported: {', '.join(SUPPORTED_LAYOUTS)}")
            raise refuse(name, f"torchao {layout}", why)
        qdata: Tensor = t.qdata
        if qdata.dtype != torch.int8:
            raise refuse(name, f"torchao {layout}", f"qdata is {qdata.dtype}, not int8")
        if layout == "Int8Tensor":
            bits = 8
        else:
            bits = _INT_BITS.get(t.target_dtype, 0)
            if not 2 <= bits <= 8:
                raise refuse(name, f"torchao {layout}", f"target_dtype {t.target_dtype}; reached: int2..int8")
        zp = getattr(t, "zero_point", None)
        return CodeTensor(
            qdata, bits, True, t.scale, zp, tuple(int(b) for b in t.block_size), f"torchao.{layout}"
        )
