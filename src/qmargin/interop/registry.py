"""The code-provider registry: where the stored integer codes of a model live.

A *code provider* knows one family of quantized tensors (qmargin's own :class:`QuantizedTensors`
layers, torchao's weight tensor subclasses, Brevitas layers) and exposes each of its stored tensors
to :func:`qmargin.faults.inject`, :func:`qmargin.faults.select_tensors` and the campaigns:

* :meth:`CodeProvider.stored_groups` — the stored tensors of a model, each as the list of names
  ``(layer, module, tensor)`` it is reachable under (a tie has several; the first is canonical);
* :meth:`CodeProvider.pin` / :meth:`CodeProvider.unpin` — make the integer codes exactly what the
  layer computes with (qmargin: freeze; Brevitas: install the codes in the weight quantizer; torchao:
  nothing, its codes are what it computes with), and undo that;
* :meth:`CodeProvider.codes` — a :class:`CodeTensor`: the live integer codes (edits act in place),
  their word width, signedness, scale, zero point and block size.

For a pinned tensor with codes ``q``, scale ``s`` and zero point ``z`` (broadcast over blocks of
``block_size`` elements), the layer computes with ``w_hat = (q - z) * s``; a fault changes ``q``
through its b-bit word (two's complement for ``int8`` codes, plain for ``uint8``; bit 0 = LSB,
:mod:`qmargin.quant.codes`). Restoring the codes restores ``w_hat`` bit for bit.

Providers are tried in registration order; a module belongs to the first provider that lists it.
Register one with :func:`register_code_provider`; :func:`stored_code_groups` lists a model's stored
tensors over every registered provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.quant.codes import DEFAULT_STORAGE, StorageFormat

__all__ = [
    "CodeTensor",
    "CodeProvider",
    "StoredName",
    "CodeGroup",
    "register_code_provider",
    "code_providers",
    "stored_code_groups",
    "granularity_of",
    "refuse",
]

StoredName = tuple[str, nn.Module, str]
"""``(layer name, module, tensor name)``: one name of one stored tensor."""


@dataclass(frozen=True)
class CodeTensor:
    """One stored tensor as a provider exposes it.

    Args:
        codes: the live integer codes, ``int8`` (two's complement, ``signed``) or ``uint8``
            (unsigned); editing them in place changes what the layer computes with.
        bits: word width b of one code (1..8).
        signed: two's-complement words (``int8`` codes) or unsigned ones (``uint8``).
        scale: the scales, broadcastable to ``codes`` over blocks of ``block_size``.
        zero_point: the zero points (same layout as ``scale``), or ``None`` for 0.
        block_size: how many elements along each dimension share one scale.
        layout: where the codes come from (``"qmargin"``, ``"torchao.Int8Tensor"``, ...).
        storage: the memory's word format of signed codes (``quant.codes.StorageFormat``;
            docs/bit-conventions.md); foreign libraries keep two's complement.
        saturate: the decode clamps words outside the quantizer's range (``QuantSpec.saturate``).
    """

    codes: Tensor
    bits: int
    signed: bool
    scale: Tensor
    zero_point: Tensor | None
    block_size: tuple[int, ...]
    layout: str
    storage: StorageFormat = DEFAULT_STORAGE
    saturate: bool = False

    def __post_init__(self) -> None:
        want = torch.int8 if self.signed else torch.uint8
        if self.codes.dtype != want:
            raise TypeError(
                f"{self.layout}: {'signed' if self.signed else 'unsigned'} codes must be {want}, "
                f"got {self.codes.dtype}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"{self.layout}: bits must be an integer in 1..8, got {self.bits!r}")

    @property
    def granularity(self) -> str:
        """``"per_tensor"``, ``"per_channel"`` or ``"per_group(n)"`` (from ``block_size``)."""
        return granularity_of(tuple(self.codes.shape), self.block_size)

    def dequantize(self) -> Tensor:
        """``w_hat = (q - z) * s`` with ``s`` and ``z`` repeated over their blocks, in ``scale``'s dtype."""
        shape = tuple(self.codes.shape)
        s = _expand(self.scale, shape, self.block_size)
        q = self.codes.to(s.dtype)
        if self.zero_point is None:
            return q * s
        return (q - _expand(self.zero_point, shape, self.block_size).to(s.dtype)) * s


def granularity_of(shape: tuple[int, ...], block_size: tuple[int, ...]) -> str:
    """Name the granularity of ``block_size`` blocks on a ``shape`` tensor."""
    if tuple(block_size) == tuple(shape):
        return "per_tensor"
    if len(shape) >= 1 and block_size[0] == 1 and tuple(block_size[1:]) == tuple(shape[1:]):
        return "per_channel"
    return f"per_group({block_size[-1]})"


def _expand(t: Tensor, shape: tuple[int, ...], block_size: tuple[int, ...]) -> Tensor:
    """Repeat one value per block to the full ``shape``."""
    if t.numel() == 1:
        return t.reshape(()).expand(shape)
    blocks = tuple(n // b for n, b in zip(shape, block_size, strict=True))
    t = t.reshape(blocks)
    for dim, b in enumerate(block_size):
        if b > 1:
            t = t.repeat_interleave(b, dim=dim)
    return t


CodeGroup = tuple["CodeProvider", list[StoredName]]
"""A stored tensor: its provider and every name it is reachable under (the first is canonical)."""


class CodeProvider(ABC):
    """A family of quantized tensors whose integer codes ``inject`` can reach (module docstring)."""

    name: str = "provider"

    @abstractmethod
    def stored_groups(self, model: nn.Module) -> list[list[StoredName]]:
        """The stored tensors of ``model`` this provider knows, each with all its names, in module order.

        A tensor in a layout the provider recognises but cannot reach is listed too (so that a
        selection can spare it); :meth:`pin` then refuses it with a ``ConfigError``.
        """

    def pin(self, name: str, module: nn.Module, tensor: str) -> bool:
        """Make the codes of ``tensor`` what ``module`` computes with; True if :meth:`unpin` must undo it.

        Raises ``ConfigError`` (one line naming the layout) when the codes cannot be reached.
        """
        return False

    def unpin(self, name: str, module: nn.Module, tensor: str) -> None:
        """Undo :meth:`pin` (the module computes as before it was pinned)."""
        return None

    def link(self, model: nn.Module, group: list[StoredName]) -> None:
        """Make every name of a tie group use one code tensor (after pinning); default: nothing to do."""
        return None

    @abstractmethod
    def codes(self, name: str, module: nn.Module, tensor: str) -> CodeTensor:
        """The live codes of a pinned ``tensor`` of ``module``."""


_PROVIDERS: list[CodeProvider] = []


def register_code_provider(provider: CodeProvider) -> CodeProvider:
    """Add ``provider`` to the registry (tried after those registered before); returns it.

    A provider with the name of a registered one replaces it in place.
    """
    if not isinstance(provider, CodeProvider):
        raise TypeError(f"a code provider must be a CodeProvider, got {type(provider).__name__}")
    for i, p in enumerate(_PROVIDERS):
        if p.name == provider.name:
            _PROVIDERS[i] = provider
            return provider
    _PROVIDERS.append(provider)
    return provider


def code_providers() -> list[CodeProvider]:
    """The registered providers, in the order they are tried."""
    return list(_PROVIDERS)


def stored_code_groups(model: nn.Module) -> list[CodeGroup]:
    """Every stored tensor of ``model`` over all providers, in module order of its canonical name.

    A module listed by two providers is kept by the first (registration order).
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    claimed: set[int] = set()
    out: list[CodeGroup] = []
    for provider in _PROVIDERS:
        groups = [g for g in provider.stored_groups(model) if not any(id(m) in claimed for _, m, _ in g)]
        for g in groups:
            claimed.update(id(m) for _, m, _ in g)
            out.append((provider, g))
    out.sort(key=lambda pg: order.get(pg[1][0][0], len(order)))
    return out


def refuse(layer: str, layout: str, why: str) -> ConfigError:
    """The one-line error for a tensor whose codes cannot be reached."""
    return ConfigError(
        f"layer {layer!r}: {layout} is not supported for bit-error injection ({why}); see docs/interop.md"
    )
