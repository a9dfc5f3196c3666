"""Inject bit errors into the stored codes of a quantized model, and restore them exactly.

``inject(model, error_model, seed)`` corrupts, in place, the integer codes of every selected stored
tensor of ``model``, yields an :class:`InjectionReport`, and on exit writes the recorded old words
back (O(K) for K touched words), also when the body raises. The stored tensors are those of every
registered code provider (:mod:`qmargin.interop`): qmargin's :class:`qmargin.quant.QuantizedTensors`
layers (``m.stored(t).codes``), torchao weight tensors, Brevitas layers. Tensors that were not pinned
(qmargin modules not frozen, Brevitas layers) are pinned for the duration and unpinned on exit, so
the model computes from its float weights again afterwards.

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

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.faults.error_model import ErrorModel, route, word_format
from qmargin.faults.functional import WordPatch, _flat_gather, check_seed, derive_seed, make_generator
from qmargin.faults.kinds import FaultKind
from qmargin.interop import CodeGroup, CodeProvider, StoredName, stored_code_groups
from qmargin.quant.codes import (
    DEFAULT_STORAGE,
    StorageFormat,
    bit_differences,
    exposed_positions,
    from_words,
    protected_positions,
    to_words,
)

__all__ = ["inject", "select_tensors", "InjectionReport", "TensorFaults", "InjectionOrderError"]


@dataclass(frozen=True)
class TensorFaults:
    """What one injection did to one stored tensor.

    ``n_bits = numel * bits`` stored bits, of which ``n_exposed`` are not protected; ``n_flipped``
    bits flipped by random errors, ``n_stuck`` bits stuck (whether or not their value changed), and
    ``n_changed`` bits that differ from the clean codes after all faults (the sums of the fault
    kinds' :class:`qmargin.faults.FaultResult` counts, and the net change of all their patches);
    ``n_due`` detected uncorrectable errors (codewords, ECC and parity kinds).
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
    n_due: int = 0


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
    def n_due(self) -> int:
        """Detected uncorrectable errors (codewords) over all tensors (ECC / parity kinds)."""
        return sum(t.n_due for t in self.tensors)

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
            "n_due": self.n_due,
            "tensors": [asdict(t) for t in self.tensors],
        }


class InjectionOrderError(RuntimeError):
    """``inject`` contexts on shared codes were exited out of order (a programming error).

    Raised by the exit of a context while a later-entered context on the same codes is still open;
    before raising, that exit undoes the later contexts' patches and then its own, so the codes
    are exactly as before it was entered. The later contexts are ended by this (their exit raises
    this error too, and changes nothing).
    """


def _stored_groups(model: nn.Module) -> list[CodeGroup]:
    """Every stored tensor of every code provider (:mod:`qmargin.interop`), with all its names."""
    return stored_code_groups(model)  # its errors are ConfigErrors (qmargin.quant.errors)


def _routed_groups(
    model: nn.Module, error_model: ErrorModel
) -> list[tuple[CodeProvider, list[StoredName], tuple[FaultKind, ...], tuple[int, ...]]]:
    """The tie groups ``error_model`` hits, each with its kinds and protected bits
    (:func:`qmargin.faults.error_model.route`: per-layer parts resolved there)."""
    selection = error_model.selection
    groups = _stored_groups(model)
    found = []
    for p, g in groups:
        routed = route(error_model, g)
        if routed is not None:
            found.append((p, g, *routed))
    if not found:
        quantized = list(dict.fromkeys(g[0][0] for _, g in groups))
        if not quantized:
            raise ConfigError("the model has no quantized layers to inject bit errors into (quantize_model)")
        raise ConfigError(
            f"the bit error model selects no stored tensor ({selection.describe()}); "
            f"quantized layers: {quantized[:8]}"
        )
    return found


def _select_groups(model: nn.Module, error_model: ErrorModel) -> list[CodeGroup]:
    """The tie groups (:func:`qmargin.interop.stored_code_groups`) that ``error_model`` hits."""
    return [(p, g) for p, g, _, _ in _routed_groups(model, error_model)]


def select_tensors(model: nn.Module, error_model: ErrorModel) -> list[StoredName]:
    """``(layer name, module, tensor name)`` of every stored tensor ``error_model`` hits, in module order.

    Stored tensors are those of every registered code provider (:mod:`qmargin.interop`: qmargin's
    layers, torchao tensors, Brevitas layers).

    The choice is ``error_model.selection``'s (:class:`qmargin.faults.Selection`). A stored tensor
    reachable under several names (a module registered twice, a tied Parameter) is listed once, under
    its canonical (first) name, whichever of its names selected it. Raises ``ConfigError`` when
    nothing is selected (a model without quantized layers, or patterns that match none), since an
    injection that silently hits nothing would report clean accuracy.
    """
    return [g[0] for _, g in _select_groups(model, error_model)]


class _Injection:
    """One entered ``inject`` context: its patches, the modules it froze, the stacks it is on."""

    _counter = itertools.count()

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.order = next(self._counter)
        self.patches: list[tuple[Tensor, WordPatch]] = []
        self.froze: list[tuple[CodeProvider, StoredName]] = []
        self.stacks: list[list[_Injection]] = []
        self.state = "open"  # "open" -> "closed"; or "ended" by an enclosing context's exit

    def push(self, module: nn.Module, tensor: str) -> None:
        """Put this context on top of the stack of active injections of ``module``'s ``tensor``."""
        stacks = module.__dict__.setdefault(_STACKS, {})
        stack = stacks.setdefault(tensor, [])
        stack.append(self)
        self.stacks.append(stack)

    def above(self) -> list[_Injection]:
        """Open contexts entered later on codes this one patched (transitively), latest first."""
        found: dict[int, _Injection] = {}
        todo: list[_Injection] = [self]
        while todo:
            x = todo.pop()
            for stack in x.stacks:
                i = next(k for k, y in enumerate(stack) if y is x)
                for y in stack[i + 1 :]:
                    if id(y) not in found:
                        found[id(y)] = y
                        todo.append(y)
        return sorted(found.values(), key=lambda y: y.order, reverse=True)

    def undo(self) -> None:
        """Write back every old word (reverse order), leave the stacks, unfreeze what it froze."""
        with torch.no_grad():
            for codes, patch in reversed(self.patches):
                patch.undo_(codes)
            for stack in self.stacks:
                stack[:] = [y for y in stack if y is not self]
            for provider, (name, module, tensor) in reversed(self.froze):
                provider.unpin(name, module, tensor)

    def exit(self) -> None:
        if self.state == "ended":
            self.state = "closed"
            raise InjectionOrderError(
                f"inject(seed={self.seed}) was already undone: an enclosing inject context on the same "
                "codes exited first (contexts must exit in reverse order of entry)"
            )
        later = self.above()
        for y in later:
            y.undo()
            y.state = "ended"
        self.undo()
        self.state = "closed"
        if later:
            raise InjectionOrderError(
                f"inject(seed={self.seed}) exited before the inject contexts entered after it on the same "
                f"codes (seeds {[y.seed for y in later]}); contexts must exit in reverse order of entry. "
                "All of them were undone: the codes are as before this context was entered"
            )


_STACKS = "_qmargin_active_injections"


@contextmanager
def inject(model: nn.Module, error_model: ErrorModel, seed: int) -> Iterator[InjectionReport]:
    """Corrupt the stored codes of ``model`` in place for the duration of the ``with`` block.

    For each selected tensor with b-bit codes, the error model's fault kinds are applied in order
    (for a :class:`BitErrorModel`: random flips, ``p01``/``p10`` thinned exactly when they differ,
    XORed into the words, then stuck-at faults forcing their bits); protected bits are never
    touched. Every edit is recorded as ``(index, old, new)``; on exit the old words are written back
    in reverse order, which restores the codes bit for bit (also after an exception).

    ``seed`` is an integer in ``[0, 2**63)`` (else ``SeedError``, a ``ConfigError``).

    Ties: a stored tensor reachable under several names (:func:`qmargin.quant.tied_stored_tensors`)
    is one code tensor shared by every module that uses it (all of them are frozen and linked); it
    is corrupted once, with the stream of its canonical (first) name, and reported once.

    Nesting: contexts on the same model nest (the inner one corrupts what the outer one left, and
    restores it). Each context is pushed on a per-tensor stack of active injections kept on the
    module; exiting a context while a later one on the same codes is still open raises
    :class:`InjectionOrderError`, after undoing the later ones and then itself, so the codes are exactly
    as before it was entered (the later ones' own exits then raise and change nothing).

    Example::

        with inject(model, BitErrorModel(ber=1e-3), seed=s) as report:
            acc = evaluate(model)
    """
    check_seed(seed)
    if not isinstance(error_model, ErrorModel):
        raise TypeError(f"error_model must be an ErrorModel, got {type(error_model).__name__}")
    groups = _routed_groups(model, error_model)
    report = InjectionReport(seed, error_model)
    token = _Injection(seed)
    try:
        with torch.no_grad():
            for provider, group, _, _ in groups:
                for ref in group:
                    if provider.pin(*ref):
                        token.froze.append((provider, ref))
            for provider, group, kinds, protected_bits in groups:
                provider.link(model, group)
                name, module, tensor = group[0]
                token.push(module, tensor)
                stored = provider.codes(name, module, tensor)
                storage, saturate = word_format(error_model, stored.storage, stored.saturate, stored.signed)
                report.tensors.append(
                    _corrupt_tensor(
                        stored.codes, stored.bits, name, tensor, protected_bits,
                        [k for k in kinds if not k.is_null], seed, token.patches, storage=storage,
                        saturate=saturate,
                    )
                )
        yield report
    finally:
        token.exit()


def _corrupt_tensor(
    codes: Tensor,
    bits: int,
    name: str,
    tensor: str,
    protected_bits: tuple[int, ...],
    kinds: list[FaultKind],
    seed: int,
    applied: list[tuple[Tensor, WordPatch]],
    *,
    storage: StorageFormat = DEFAULT_STORAGE,
    saturate: bool = False,
) -> TensorFaults:
    """Apply ``kinds`` in order to one code tensor; appends the patches to ``applied``.

    Two's complement without saturation (and every unsigned or 1-bit code) edits the codes
    directly: the code tensor *is* the word tensor. Another format or a saturating decode runs the
    kinds on the words (:func:`_corrupt_words`).
    """
    try:
        protected = protected_positions(protected_bits, bits)
    except ValueError:
        bad = [k for k in protected_bits if not -bits <= k < bits]
        raise ConfigError(
            f"protected bits {bad} do not exist in the {bits}-bit codes of {name}.{tensor}"
        ) from None
    if kinds and (storage != DEFAULT_STORAGE or saturate) and codes.dtype == torch.int8 and bits > 1:
        return _corrupt_words(
            codes, bits, name, tensor, protected, kinds, seed, applied, storage=storage, saturate=saturate
        )
    n_flipped = n_stuck = n_due = 0
    patches: list[WordPatch] = []
    for kind in kinds:
        generator = make_generator(derive_seed(seed, name, tensor, *kind.stream))
        result = kind.apply_(codes, bits, generator, protected)
        applied.append((codes, result.patch))
        patches.append(result.patch)
        n_flipped += result.n_flipped
        n_stuck += result.n_stuck
        n_due += result.n_due
    n_changed = patches[0].n_changed if len(patches) == 1 else _net_changed(patches, codes, bits)
    numel = codes.numel()
    n_exposed = numel * len(exposed_positions(bits, protected))
    return TensorFaults(
        name, tensor, bits, numel, numel * bits, n_exposed, n_flipped, n_stuck, n_changed, n_due
    )


def _corrupt_words(
    codes: Tensor,
    bits: int,
    name: str,
    tensor: str,
    protected: frozenset[int],
    kinds: list[FaultKind],
    seed: int,
    applied: list[tuple[Tensor, WordPatch]],
    *,
    storage: StorageFormat,
    saturate: bool,
) -> TensorFaults:
    """:func:`_corrupt_tensor` for words in ``storage`` / with a saturating decode.

    The kinds act, in order, on the stored words (a ``uint8`` copy, ``to_words(codes, bits, storage)``,
    to them plain unsigned codes), so a later kind sees what memory holds (a ``-0`` of sign-magnitude,
    a word saturation would clamp), not a re-encoded decode. The touched words are then decoded
    (``from_words(..., storage, saturate)``) into ``codes`` as one patch. Same draws as the direct path
    (the kinds get the same generators and shapes); O(n) for the word copy plus O(K).
    """
    words = to_words(codes, bits, storage)
    if not torch.equal(from_words(words, bits, True, storage), codes):
        bad = codes[from_words(words, bits, True, storage) != codes][0].item()
        raise ConfigError(f"{name}.{tensor}: code {bad} has no {bits}-bit {storage} word")
    n_flipped = n_stuck = n_due = 0
    word_patches: list[WordPatch] = []
    for kind in kinds:
        generator = make_generator(derive_seed(seed, name, tensor, *kind.stream))
        result = kind.apply_(words, bits, generator, protected)
        word_patches.append(result.patch)
        n_flipped += result.n_flipped
        n_stuck += result.n_stuck
        n_due += result.n_due
    index = torch.cat([p.index for p in word_patches]) if word_patches else torch.empty(0, dtype=torch.int64)
    n_changed = 0
    if index.numel():
        index, first = _first_occurrence(index)
        old_words = torch.cat([p.old for p in word_patches])[first]
        new_words = _flat_gather(words, index)
        n_changed = bit_differences(old_words, new_words, bits)
        old = _flat_gather(codes, index)
        new = from_words(new_words, bits, True, storage, saturate)
        patch = WordPatch(index, old, new, bits)
        patch.apply_(codes)
        applied.append((codes, patch))
    numel = codes.numel()
    n_exposed = numel * len(exposed_positions(bits, protected))
    return TensorFaults(
        name, tensor, bits, numel, numel * bits, n_exposed, n_flipped, n_stuck, n_changed, n_due
    )


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
