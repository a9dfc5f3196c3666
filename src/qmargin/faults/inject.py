"""Inject bit errors into the stored codes of a quantized model, and restore them exactly.

``inject(model, error_model, seed)`` corrupts, in place, ``m.stored(t).codes`` of every selected
tensor ``t`` of every :class:`qmargin.quant.QuantizedTensors` module ``m``, yields an
:class:`InjectionReport`, and on exit writes the recorded old words back (O(K) for K touched words),
also when the body raises. Modules that were not frozen are frozen for the duration and unfrozen
on exit, so the model computes from its float weights again afterwards.

``inject`` knows no fault kind: it asks the error model (any :class:`qmargin.faults.ErrorModel`)
for its ``selection`` (where) and its ordered ``fault_kinds()`` (what, :mod:`qmargin.faults.kinds`)
and applies every kind to every selected tensor in that order. A new kind needs no change here.

Streams: kind ``k`` draws, for tensor ``t`` of layer ``name``, from a generator seeded with
``derive_seed(seed, name, t, *k.stream)``: random flips from ``derive_seed(seed, name, t)``, stuck-at
faults from ``derive_seed(seed, name, t, "stuck_at")``. A pattern therefore depends only on (seed,
layer name, tensor name, shape, bits, rates, protected bits): adding, removing or re-selecting other
layers leaves it unchanged, and models of the same architecture see the same patterns for the same
seed (paired comparisons; campaigns use seeds ``base, base + 1, ...``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.faults.error_model import ErrorModel
from qmargin.faults.functional import WordPatch, _flat_gather, derive_seed, make_generator
from qmargin.faults.kinds import FaultKind
from qmargin.quant import QuantizedTensors
from qmargin.quant.codes import bit_differences, exposed_positions, protected_positions

__all__ = ["inject", "select_tensors", "InjectionReport", "TensorFaults"]


@dataclass(frozen=True)
class TensorFaults:
    """What one injection did to one stored tensor.

    ``n_bits = numel * bits`` stored bits, of which ``n_exposed`` are not protected; ``n_flipped``
    bits flipped by random errors, ``n_stuck`` bits stuck (whether or not their value changed), and
    ``n_changed`` bits that differ from the clean codes after all faults (the sums of the fault
    kinds' :class:`qmargin.faults.FaultResult` counts, and the net change of all their patches).
    """

    layer: str
    tensor: str
    bits: int
    numel: int
    n_bits: int
    n_exposed: int
    n_flipped: int
    n_stuck: int
    n_changed: int


@dataclass
class InjectionReport:
    """Per-tensor fault counts of one injection (``seed`` under ``error_model``)."""

    seed: int
    error_model: ErrorModel
    tensors: list[TensorFaults] = field(default_factory=list)

    @property
    def n_bits(self) -> int:
        return sum(t.n_bits for t in self.tensors)

    @property
    def n_exposed(self) -> int:
        return sum(t.n_exposed for t in self.tensors)

    @property
    def n_flipped(self) -> int:
        return sum(t.n_flipped for t in self.tensors)

    @property
    def n_stuck(self) -> int:
        return sum(t.n_stuck for t in self.tensors)

    @property
    def n_changed(self) -> int:
        return sum(t.n_changed for t in self.tensors)

    @property
    def observed_ber(self) -> float:
        """``n_flipped / n_exposed`` (0 when nothing is exposed)."""
        return self.n_flipped / self.n_exposed if self.n_exposed else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "error_model": self.error_model.to_dict(),
            "n_bits": self.n_bits,
            "n_exposed": self.n_exposed,
            "n_flipped": self.n_flipped,
            "n_stuck": self.n_stuck,
            "n_changed": self.n_changed,
            "tensors": [asdict(t) for t in self.tensors],
        }


def select_tensors(model: nn.Module, error_model: ErrorModel) -> list[tuple[str, QuantizedTensors, str]]:
    """``(layer name, module, tensor name)`` of every stored tensor ``error_model`` hits, in module order.

    The choice is ``error_model.selection``'s (:class:`qmargin.faults.Selection`). Raises
    ``ConfigError`` when nothing is selected (a model without quantized layers, or patterns that
    match none), since an injection that silently hits nothing would report clean accuracy.
    """
    selection = error_model.selection
    found: list[tuple[str, QuantizedTensors, str]] = []
    quantized: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedTensors):
            continue
        quantized.append(name)
        if selection.selects_layer(name, module):
            found.extend((name, module, t) for t in selection.selects_tensors(module.quant_specs))
    if not found:
        if not quantized:
            raise ConfigError("the model has no quantized layers to inject bit errors into (quantize_model)")
        raise ConfigError(
            f"the bit error model selects no stored tensor ({selection.describe()}); "
            f"quantized layers: {quantized[:8]}"
        )
    return found


@contextmanager
def inject(model: nn.Module, error_model: ErrorModel, seed: int) -> Iterator[InjectionReport]:
    """Corrupt the stored codes of ``model`` in place for the duration of the ``with`` block.

    For each selected tensor with b-bit codes, the error model's fault kinds are applied in order
    (for a :class:`BitErrorModel`: random flips, ``p01``/``p10`` thinned exactly when they differ,
    XORed into the words, then stuck-at faults forcing their bits); protected bits are never
    touched. Every edit is recorded as ``(index, old, new)``; on exit the old words are written back
    in reverse order, which restores the codes bit for bit (also after an exception).

    Example::

        with inject(model, BitErrorModel(ber=1e-3), seed=s) as report:
            acc = evaluate(model)
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not isinstance(error_model, ErrorModel):
        raise TypeError(f"error_model must be an ErrorModel, got {type(error_model).__name__}")
    targets = select_tensors(model, error_model)
    kinds = [k for k in error_model.fault_kinds() if not k.is_null]
    report = InjectionReport(seed, error_model)
    froze: list[QuantizedTensors] = []
    applied: list[tuple[Tensor, WordPatch]] = []
    try:
        with torch.no_grad():
            for name, module, tensor in targets:
                if not module.frozen:
                    module.freeze()
                    froze.append(module)
                stored = module.stored(tensor)
                report.tensors.append(
                    _corrupt_tensor(
                        stored.codes, stored.spec.bits, name, tensor, error_model.selection.protected_bits,
                        kinds, seed, applied,
                    )
                )
        yield report
    finally:
        with torch.no_grad():
            for codes, patch in reversed(applied):
                patch.undo_(codes)
            for module in reversed(froze):
                module.unfreeze()


def _corrupt_tensor(
    codes: Tensor,
    bits: int,
    name: str,
    tensor: str,
    protected_bits: tuple[int, ...],
    kinds: list[FaultKind],
    seed: int,
    applied: list[tuple[Tensor, WordPatch]],
) -> TensorFaults:
    """Apply ``kinds`` in order to one code tensor; appends the patches to ``applied``."""
    try:
        protected = protected_positions(protected_bits, bits)
    except ValueError:
        bad = [k for k in protected_bits if not -bits <= k < bits]
        raise ConfigError(
            f"protected bits {bad} do not exist in the {bits}-bit codes of {name}.{tensor}"
        ) from None
    n_flipped = n_stuck = 0
    patches: list[WordPatch] = []
    for kind in kinds:
        generator = make_generator(derive_seed(seed, name, tensor, *kind.stream))
        result = kind.apply_(codes, bits, generator, protected)
        applied.append((codes, result.patch))
        patches.append(result.patch)
        n_flipped += result.n_flipped
        n_stuck += result.n_stuck
    n_changed = patches[0].n_changed if len(patches) == 1 else _net_changed(patches, codes, bits)
    numel = codes.numel()
    n_exposed = numel * len(exposed_positions(bits, protected))
    return TensorFaults(name, tensor, bits, numel, numel * bits, n_exposed, n_flipped, n_stuck, n_changed)


def _net_changed(patches: list[WordPatch], codes: Tensor, bits: int) -> int:
    """Bits of ``codes`` that differ from before the first of ``patches`` (applied in order)."""
    if not patches:
        return 0
    index = torch.cat([p.index for p in patches])
    if not index.numel():
        return 0
    index, first = _first_occurrence(index)
    original = torch.cat([p.old for p in patches])[first]
    return bit_differences(original, _flat_gather(codes, index), bits)


def _first_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Unique values of ``index`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.int64, device=index.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first
