"""Bit errors in activation buffers: fresh faults on the activation codes of every inference batch.

The activation codes of layer ``L`` in forward pass (batch) ``i`` under pattern seed ``r`` are
corrupted by the error model's fault kinds, in order, each drawn from

    ``make_generator(derive_seed(r, "activations", L, str(i), *kind.stream))``

with the same exact sparse samplers, rates, protected bits and storage formats as weights
(:func:`qmargin.faults.functional.sample_flips`; word format from ``word_format``: two's complement,
offset binary, sign-magnitude, saturating decode). So a pattern is a pure function of
``(r, L, i, shape, bits, rates, protected bits)``: two models with buffers of the same shape see the
same flipped activation bits in the same batch (paired comparisons), and another batch draws anew.
The batch index ``i`` counts the model's forward passes since :func:`inject_activations` was
entered (0, 1, ...), so results depend on the batch size and the order of the batches.

Where protections plug in: every kind gets ``(codes, bits, generator, protected)`` on a flat tensor of
``bits``-bit words (``uint8`` words for a non-default storage), the interface of
:class:`qmargin.faults.FaultKind`; a registered kind (an ECC decoder, say) applies to activation
buffers unchanged. A per-layer protection (``--protect``, :mod:`qmargin.faults.protection`) routes each
buffer to the rule of its layer (:func:`layer_error_model`). Detected uncorrectable errors in
activation buffers are decoded by the policy (keep / zero) but not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from qmargin.errors import ConfigError
from qmargin.faults.error_model import ErrorModel, word_format
from qmargin.faults.functional import check_seed, derive_seed, make_generator
from qmargin.quant.activations import ActivationQuantizers
from qmargin.quant.codes import DEFAULT_STORAGE, StorageFormat, from_words, protected_positions, to_words

__all__ = ["ActivationFaultReport", "corrupt_activation_codes_", "inject_activations", "layer_error_model"]

ACTIVATION_STREAM = "activations"


def corrupt_activation_codes_(
    codes: Tensor,
    bits: int,
    error_model: ErrorModel,
    seed: int,
    layer: str,
    batch: int,
    *,
    storage: StorageFormat = DEFAULT_STORAGE,
    saturate: bool = False,
) -> int:
    """Apply ``error_model``'s kinds, in order, to the activation ``codes`` of ``layer`` in ``batch``.

    In place; returns the number of bits the kinds flipped plus stuck. Seeded by
    ``derive_seed(seed, "activations", layer, str(batch), *kind.stream)`` (module docstring).
    Non-default storage or a saturating decode: the kinds act on the stored words, which are
    then decoded (``from_words(..., storage, saturate)``), as for weights.
    """
    check_seed(seed)
    kinds = [k for k in error_model.fault_kinds() if not k.is_null]
    if not kinds:
        return 0
    try:
        protected = protected_positions(error_model.selection.protected_bits, bits)
    except ValueError:
        raise ConfigError(
            f"protected bits {error_model.selection.protected_bits} do not exist in {bits}-bit activations"
        ) from None
    signed = codes.dtype.is_signed
    storage, saturate = word_format(error_model, storage, saturate, signed)
    words_path = signed and bits > 1 and (storage != DEFAULT_STORAGE or saturate)
    target = to_words(codes, bits, storage) if words_path else codes
    flat = target.view(-1)
    n = 0
    for kind in kinds:
        g = make_generator(derive_seed(seed, ACTIVATION_STREAM, layer, str(batch), *kind.stream))
        result = kind.apply_(flat, bits, g, protected)
        n += result.n_flipped + result.n_stuck
    if words_path:
        codes.copy_(from_words(target, bits, True, storage, saturate))
    return n


@dataclass
class ActivationFaultReport:
    """What :func:`inject_activations` did: forward passes seen and bits hit per layer."""

    seed: int
    batches: int = 0
    bits_hit: dict[str, int] = field(default_factory=dict)
    words: dict[str, int] = field(default_factory=dict)


def layer_error_model(error_model: ErrorModel, layer: str, module: nn.Module) -> ErrorModel | None:
    """What hits the activation buffer of ``layer``: ``error_model`` itself, or for a per-layer model
    (``parts``, e.g. ``--protect conv*=msb2,fc3=secded64``) its first part whose layer pattern matches
    ``layer`` (``None``: no part does, the buffer is not hit). The same rules as for the layer's
    stored weights, applied to its output codes."""
    parts = getattr(error_model, "parts", None)
    if parts is None:
        return error_model
    return next((part for part in parts if part.selection.selects_layer(layer, module)), None)


@contextmanager
def inject_activations(
    quantizers: ActivationQuantizers, error_model: ErrorModel, seed: int
) -> Iterator[ActivationFaultReport]:
    """Corrupt the activation codes of every forward pass of ``quantizers.model`` inside the block.

    Batch ``i`` is the ``i``-th forward pass of the model since entering (counted by a forward
    pre-hook on the model). On exit the hooks are removed and the quantizers are clean again. The
    error model's ``selection.protected_bits``, ``storage`` / ``saturate`` (when it has them) apply;
    its layer selection is not used (the activation layers are the quantizers').
    """
    check_seed(seed)
    if quantizers.spec.bits < 2:
        raise ConfigError("activation codes need at least 2 bits")
    report = ActivationFaultReport(seed)
    state = {"batch": -1}

    def pre_hook(module: object, inputs: object) -> None:
        state["batch"] += 1
        report.batches += 1

    def edit(layer: str, codes: Tensor) -> None:
        em = layer_error_model(error_model, layer, quantizers.model.get_submodule(layer))
        hit = 0 if em is None else corrupt_activation_codes_(
            codes, quantizers.spec.bits, em, seed, layer, max(state["batch"], 0),
            storage=quantizers.spec.storage, saturate=quantizers.spec.saturate,
        )
        report.bits_hit[layer] = report.bits_hit.get(layer, 0) + hit
        report.words[layer] = report.words.get(layer, 0) + codes.numel()

    handle = quantizers.model.register_forward_pre_hook(pre_hook)
    quantizers.set_code_edit(edit)
    try:
        yield report
    finally:
        quantizers.set_code_edit(None)
        handle.remove()
