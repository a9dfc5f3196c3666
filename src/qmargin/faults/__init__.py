"""Bit errors on stored integer codes (design.md §2).

* :mod:`qmargin.faults.functional` — the functional core: exact O(K) samplers of random bit flips
  (:func:`sample_bit_sites`, :func:`sample_flips`) and stuck-at faults (:func:`sample_stuck_bits`),
  restorable in-place edits (:func:`flip_bits_`, :func:`force_bits_` -> :class:`WordPatch`),
  copy-returning :func:`flip_random_bits` / :func:`stuck_at`, word encoding helpers, and
  :func:`derive_seed`.
* :class:`BitErrorModel` — rates, protected bits and which layers / tensors are hit.
* :func:`inject` — context manager that corrupts a quantized model's codes in place and restores
  them exactly on exit.

Conventions (docs/bit-conventions.md): b-bit words, bit 0 = LSB; ``int8`` codes are two's
complement (``b = 1``: sign code, word 1 = +1, word 0 = -1), ``uint8`` codes unsigned.
"""

from qmargin.faults.error_model import WEIGHT_TENSORS, BitErrorModel
from qmargin.faults.functional import (
    BitSites,
    StuckBits,
    WordPatch,
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
from qmargin.faults.inject import InjectionReport, TensorFaults, inject, select_tensors
from qmargin.quant.codes import bit_differences, exposed_positions, from_words, popcount, to_words

__all__ = [
    "BitErrorModel",
    "WEIGHT_TENSORS",
    "inject",
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
    "make_generator",
    "to_words",
    "from_words",
    "popcount",
    "bit_differences",
    "exposed_positions",
]
