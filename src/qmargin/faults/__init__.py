"""Bit errors on stored integer codes (design.md §2).

An error model says *where* faults strike and *what* they do:

* :class:`Selection` (:mod:`qmargin.faults.selection`) — where: layers, exclude, layer types, stored
  tensors and protected bit positions.
* fault kinds (:mod:`qmargin.faults.kinds`) — what: the extension point. A kind is a
  :class:`FaultKind` (``stream``, ``is_null``, ``apply_(codes, bits, generator, protected) ->
  FaultResult``) registered by name (:func:`register_fault_kind`, :func:`fault_kinds`). Built in:
  ``"flips"`` (:class:`RandomFlips`, ``p01``/``p10``), ``"stuck_at"`` (:class:`StuckAt`), and memory
  behind a code (:mod:`qmargin.faults.ecc`): ``"secded"`` (:class:`SECDED`), ``"parity"``
  (:class:`Parity`), with DUE policies keep / zero / flag.
* per-layer protection (:mod:`qmargin.faults.protection`): the ``--protect`` spec language
  (:class:`ProtectionSpec`), the error model it builds (:class:`ProtectedErrorModel`, composed per
  layer: :class:`ComposedErrorModel`, :func:`route`) and its memory overhead (:class:`ProtectionPlan`).
* :class:`BitErrorModel` — the user-facing model (rates, protected bits, selection) composing a
  :class:`Selection` with the flips and stuck-at kinds; :class:`FaultModel` composes any kinds.
  :class:`ErrorModel` is the protocol :func:`inject` takes, :class:`ErrorModelTemplate` the one
  campaigns sweep over a BER grid (``with_ber``).
* :func:`inject` — context manager that applies an error model's kinds, in order, to a quantized
  model's codes in place and restores them exactly on exit. It knows no kind.
* :mod:`qmargin.faults.functional` — the functional core: exact O(K) samplers of random bit flips
  (:func:`sample_bit_sites`, :func:`sample_flips`) and stuck-at faults (:func:`sample_stuck_bits`),
  restorable in-place edits (:func:`flip_bits_`, :func:`force_bits_` -> :class:`WordPatch`),
  copy-returning :func:`flip_random_bits` / :func:`stuck_at`, and :func:`derive_seed`.

Conventions (docs/bit-conventions.md; the word codec is :mod:`qmargin.quant.codes`): b-bit words,
bit 0 = LSB; ``int8`` codes are two's complement (``b = 1``: sign code, word 1 = +1, word 0 = -1),
``uint8`` codes unsigned.
"""

from qmargin.faults.ecc import SECDED, Parity, decode_errors, parity_decode, secded_layout
from qmargin.faults.error_model import (
    BitErrorModel,
    ComposedErrorModel,
    ErrorModel,
    ErrorModelTemplate,
    FaultModel,
    detects_errors,
    route,
)
from qmargin.faults.functional import (
    BitSites,
    StuckBits,
    WordPatch,
    check_seed,
    derive_seed,
    flip_bits_,
    flip_random_bits,
    force_bits_,
    make_generator,
    sample_bit_sites,
    sample_flips,
    sample_stuck_bits,
    stuck_at,
)
from qmargin.faults.inject import InjectionOrderError, InjectionReport, TensorFaults, inject, select_tensors
from qmargin.faults.kinds import (
    FaultKind,
    FaultResult,
    RandomFlips,
    StuckAt,
    fault_kind_from_dict,
    fault_kinds,
    register_fault_kind,
)
from qmargin.faults.protection import (
    ProtectedErrorModel,
    ProtectionPlan,
    ProtectionSpec,
    parse_protection,
    protection_summary,
)
from qmargin.faults.selection import WEIGHT_TENSORS, Selection
from qmargin.quant.codes import bit_differences, exposed_positions, from_words, popcount, to_words

__all__ = [
    "SECDED",
    "Parity",
    "secded_layout",
    "decode_errors",
    "parity_decode",
    "BitErrorModel",
    "FaultModel",
    "ComposedErrorModel",
    "route",
    "detects_errors",
    "ProtectedErrorModel",
    "ProtectionPlan",
    "ProtectionSpec",
    "parse_protection",
    "protection_summary",
    "ErrorModel",
    "ErrorModelTemplate",
    "Selection",
    "WEIGHT_TENSORS",
    "FaultKind",
    "FaultResult",
    "RandomFlips",
    "StuckAt",
    "register_fault_kind",
    "fault_kinds",
    "fault_kind_from_dict",
    "inject",
    "InjectionOrderError",
    "select_tensors",
    "InjectionReport",
    "TensorFaults",
    "flip_random_bits",
    "stuck_at",
    "sample_bit_sites",
    "sample_flips",
    "sample_stuck_bits",
    "flip_bits_",
    "force_bits_",
    "BitSites",
    "StuckBits",
    "WordPatch",
    "derive_seed",
    "check_seed",
    "make_generator",
    "to_words",
    "from_words",
    "popcount",
    "bit_differences",
    "exposed_positions",
]
