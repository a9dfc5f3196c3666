"""Where a model's stored integer codes live: the code-provider registry and its adapters.

:mod:`qmargin.interop.registry` defines :class:`CodeProvider` (find a model's stored code tensors,
pin them so that they are what the layers compute with, expose them as :class:`CodeTensor` s) and
the registry :func:`qmargin.faults.inject`, :func:`qmargin.faults.select_tensors` and the campaigns
read. Registered here, tried in this order:

* ``qmargin`` — qmargin's own :class:`qmargin.quant.QuantizedTensors` layers (:mod:`.native`);
* ``torchao`` — torchao weight tensor subclasses (``Int8Tensor``, ``IntxUnpackedToInt8Tensor``;
  :mod:`.torchao`);
* ``brevitas`` — Brevitas ``QuantLinear`` / ``QuantConv2d`` / ... layers (:mod:`.brevitas`).

The adapters import their library only when it is already imported (a model cannot hold its tensors
otherwise), so ``pip install qmargin[torchao]`` / ``qmargin[brevitas]`` are optional. docs/interop.md
lists what each reaches and what it refuses.
"""

from qmargin.interop.brevitas import BrevitasLayers
from qmargin.interop.native import QmarginLayers
from qmargin.interop.registry import (
    CodeGroup,
    CodeProvider,
    CodeTensor,
    StoredName,
    code_providers,
    register_code_provider,
    stored_code_groups,
)
from qmargin.interop.torchao import TorchaoTensors

register_code_provider(QmarginLayers())
register_code_provider(TorchaoTensors())
register_code_provider(BrevitasLayers())

__all__ = [
    "CodeProvider",
    "CodeTensor",
    "CodeGroup",
    "StoredName",
    "register_code_provider",
    "code_providers",
    "stored_code_groups",
    "QmarginLayers",
    "TorchaoTensors",
    "BrevitasLayers",
]
