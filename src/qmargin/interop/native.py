"""qmargin's own quantized layers (:class:`qmargin.quant.QuantizedTensors`) as a code provider.

Pinning freezes a module (its stored codes, scales and zero points become buffers the forward pass
uses); unpinning unfreezes it again. Ties are :func:`qmargin.quant.tied_stored_tensors`' groups, made
one code tensor by :func:`qmargin.quant.link_tied`.
"""

from __future__ import annotations

from torch import nn

from qmargin.errors import ConfigError
from qmargin.interop.registry import CodeProvider, CodeTensor, StoredName
from qmargin.quant import QuantConfigError, QuantizedTensors, link_tied, tied_stored_tensors

__all__ = ["QmarginLayers"]


class QmarginLayers(CodeProvider):
    """Every :class:`QuantizedTensors` module and each tensor of its ``quant_specs``."""

    name = "qmargin"

    def stored_groups(self, model: nn.Module) -> list[list[StoredName]]:
        return [list(g) for g in tied_stored_tensors(model)]  # its errors are ConfigErrors

    def pin(self, name: str, module: nn.Module, tensor: str) -> bool:
        assert isinstance(module, QuantizedTensors)
        if module.frozen:
            return False
        try:
            module.freeze()
        except QuantConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
        return True

    def unpin(self, name: str, module: nn.Module, tensor: str) -> None:
        assert isinstance(module, QuantizedTensors)
        module.unfreeze()

    def link(self, model: nn.Module, group: list[StoredName]) -> None:
        link_tied(model, [group])  # type: ignore[list-item]

    def codes(self, name: str, module: nn.Module, tensor: str) -> CodeTensor:
        assert isinstance(module, QuantizedTensors)
        s = module.stored(tensor)
        shape = tuple(s.codes.shape)
        per_channel = s.spec.per_channel and len(shape) >= 1
        block = (1, *shape[1:]) if per_channel else shape
        return CodeTensor(
            s.codes,
            s.spec.bits,
            s.spec.symmetric,
            s.scale,
            None if s.spec.symmetric else s.zero_point,
            block,
            "qmargin",
            s.spec.storage,
            s.spec.saturate,
        )
