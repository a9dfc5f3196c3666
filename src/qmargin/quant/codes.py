"""The word codec: how a stored integer code is laid out as a b-bit word (docs/bit-conventions.md).

One home for the bit format, used by the bit-error engine (:mod:`qmargin.faults`) and by the
bit-flip certificates (:mod:`qmargin.deq.bit_certificates`). Plain tensors in and out.

* A stored code is one b-bit word, ``1 <= b <= 8``; bit 0 is the least significant bit.
* ``int8`` codes are symmetric: the word is the low ``b`` bits of the two's complement, so
  ``word = code mod 2**b`` and ``code = word - 2**b * [word >= 2**(b-1)]`` (sign extension).
* ``int8`` codes with ``b = 1`` are the binary sign code: word 1 is ``+1``, word 0 is ``-1``.
* ``uint8`` codes are unsigned: ``word = code``, ``0 <= code < 2**b``.
* Protected bit positions are ``0..b-1``; negative positions count from the most significant bit
  (``-1`` = bit ``b-1``, the sign bit of a symmetric code).

Storage formats of symmetric (``int8``) codes, ``b >= 2``, ``h = 2**(b-1)`` (the *storage* of
:class:`qmargin.quant.QuantSpec`; the integer codes are the same in every format, only the word
holding them differs, so only what a bit flip does changes):

* ``"twos"`` (default): ``word = code mod 2**b``; decode by sign extension, range ``[-h, h - 1]``.
* ``"offset"`` (offset binary, as Stutz et al. store codes): ``word = code + h`` (unsigned);
  decode ``code = word - h``, range ``[-h, h - 1]``. It is two's complement with the MSB inverted.
* ``"sign_magnitude"``: ``word = [code < 0] h + |code|``; decode ``code = (1 - 2 s) m`` with
  ``s = word div h`` and ``m = word mod h``, range ``[-(h - 1), h - 1]`` (the word ``h`` is ``-0``).

Saturating decode (``saturate=True``): a word that decodes outside ``[-qmax, qmax]``, ``qmax = h - 1``,
is clamped into it (only ``-h`` can: the word ``100...0`` of two's complement, ``000...0`` of offset
binary). The 1-bit sign code and unsigned (``uint8``) codes are the same in every format and never
saturate (every word is a value the quantizer can produce).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = [
    "StorageFormat",
    "STORAGE_FORMATS",
    "DEFAULT_STORAGE",
    "check_storage",
    "check_bits",
    "protected_positions",
    "exposed_positions",
    "to_words",
    "from_words",
    "popcount",
    "bit_differences",
    "bit_weights",
]


StorageFormat = Literal["twos", "offset", "sign_magnitude"]
"""How a symmetric code is laid out in its b-bit word (module docstring)."""

STORAGE_FORMATS: tuple[str, ...] = get_args(StorageFormat)
DEFAULT_STORAGE: StorageFormat = "twos"


def check_storage(storage: object) -> StorageFormat:
    """``storage`` as a :data:`StorageFormat` (``"sign-magnitude"`` is read as ``"sign_magnitude"``).

    Anything else (another string, a non-string) raises ``ValueError`` naming the formats.
    """
    if isinstance(storage, str):
        name = storage.replace("-", "_")
        for known in STORAGE_FORMATS:
            if name == known:
                return known  # type: ignore[return-value]
    raise ValueError(f"storage format must be one of {list(STORAGE_FORMATS)}, got {storage!r}")


def check_bits(bits: int) -> int:
    """``bits`` if it is an integer word width in 1..8, else ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def protected_positions(protected_bits: Iterable[int], bits: int) -> frozenset[int]:
    """The protected positions of a b-bit word as ``0..b-1`` (negative values count from the MSB).

    A position outside ``-b..b-1`` or a non-integer raises ``ValueError``.
    """
    check_bits(bits)
    out: set[int] = set()
    for k in protected_bits:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"protected bit positions must be integers, got {k!r}")
        if not -bits <= k < bits:
            raise ValueError(f"protected bit {k} does not exist in a {bits}-bit word ({-bits}..{bits - 1})")
        out.add(k % bits)
    return frozenset(out)


def exposed_positions(bits: int, protected_bits: Iterable[int] = ()) -> tuple[int, ...]:
    """Bit positions of a b-bit word that faults can reach (not protected), in increasing order."""
    protected = protected_positions(protected_bits, bits)
    return tuple(j for j in range(bits) if j not in protected)


def to_words(codes: Tensor, bits: int, storage: StorageFormat = DEFAULT_STORAGE) -> Tensor:
    """The stored b-bit words of ``codes`` as ``uint8`` (bit 0 = LSB), in format ``storage``.

    ``int8``, ``b >= 2``, ``h = 2**(b-1)``: ``word = code mod 2**b`` (``"twos"``), ``code + h``
    (``"offset"``), ``[code < 0] h + |code|`` (``"sign_magnitude"``); ``int8``, ``b = 1``:
    ``word = [code > 0]``; ``uint8``: ``word = code mod 2**b`` (every format). A code the format
    cannot hold (e.g. ``-h`` in sign-magnitude) gives a word that does not decode back to it.
    """
    check_bits(bits)
    storage = check_storage(storage)
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype == torch.int8:
        if bits == 1:
            return (codes > 0).to(torch.uint8)
        c = codes.to(torch.int16)
        h = 1 << (bits - 1)
        if storage == "offset":
            c = c + h
        elif storage == "sign_magnitude":
            c = torch.where(c < 0, h - c, c)  # h + |c| for negative codes
        return (c & ((1 << bits) - 1)).to(torch.uint8)
    if codes.dtype == torch.uint8:
        return codes & ((1 << bits) - 1)
    raise TypeError(f"codes must be int8 (two's complement) or uint8 (unsigned), got {codes.dtype}")


def from_words(
    words: Tensor,
    bits: int,
    signed: bool,
    storage: StorageFormat = DEFAULT_STORAGE,
    saturate: bool = False,
) -> Tensor:
    """Decode b-bit ``words`` (any integer dtype, values in ``[0, 2**b)``) into codes.

    ``signed``, ``b >= 2``, ``h = 2**(b-1)``, in ``int8``: ``"twos"``: sign extension
    ``code = (w XOR h) - h`` (range ``[-h, h - 1]``); ``"offset"``: ``code = w - h`` (same range);
    ``"sign_magnitude"``: ``code = (1 - 2 [w >= h]) (w mod h)`` (range ``[-(h - 1), h - 1]``).
    ``saturate``: codes are then clamped to ``[-qmax, qmax]``, ``qmax = h - 1``.
    ``signed``, ``b = 1``: ``code = 2 w - 1``; unsigned: ``code = w`` in ``uint8`` (every format;
    ``saturate`` changes nothing there: every word is in the quantizer's range).
    """
    check_bits(bits)
    storage = check_storage(storage)
    if signed and bits == 1:
        return (words.to(torch.int8) & 1) * 2 - 1
    if signed:
        h = 1 << (bits - 1)
        w = words.to(torch.int16) & ((1 << bits) - 1)
        if storage == "twos":
            c = (w ^ h) - h
        elif storage == "offset":
            c = w - h
        else:
            c = torch.where(w >= h, h - w, w)  # -(w - h) for a set sign bit
        if saturate:
            c = c.clamp(-(h - 1), h - 1)
        return c.to(torch.int8)
    return (words.to(torch.int16) & ((1 << bits) - 1)).to(torch.uint8)


def popcount(words: Tensor) -> Tensor:
    """Number of set bits of each 8-bit word (``uint8``/``int8`` in, ``uint8`` out).

    SWAR on bytes: pair sums ``x - ((x >> 1) & 0x55)``, nibble sums ``(x & 0x33) + ((x >> 2) & 0x33)``,
    byte sum ``(x + (x >> 4)) & 0x0F``.
    """
    if words.dtype not in (torch.uint8, torch.int8):
        raise TypeError(f"popcount works on 8-bit words, got {words.dtype}")
    x = words.view(torch.uint8)
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def bit_differences(a: Tensor, b: Tensor, bits: int, storage: StorageFormat = DEFAULT_STORAGE) -> int:
    """Hamming distance between the stored words (format ``storage``) of two code tensors of one shape."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"code tensors differ: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
    return int(popcount(to_words(a, bits, storage) ^ to_words(b, bits, storage)).sum(dtype=torch.int64))


def bit_weights(bits: int, signed: bool, storage: StorageFormat = DEFAULT_STORAGE) -> Tensor:
    """The value ``w_j`` that bit ``j`` of a stored word adds to its code: ``(bits,)`` float64.

    ``w_j = 2^j``, except the most significant bit of a symmetric two's-complement word, whose weight
    is ``-2^(b-1)``; the 1-bit sign code (``code = 2 * bit - 1``) has weight 2. Offset binary
    (``code = word - 2^(b-1)``) has ``w_j = 2^j`` for every bit. Flipping bit ``j`` of a word
    therefore changes its code by ``w_j (1 - 2 bit_j)`` (without saturation). Sign-magnitude is not
    linear in its bits and raises ``ValueError``.
    """
    check_bits(bits)
    storage = check_storage(storage)
    if signed and bits == 1:
        return torch.tensor([2.0], dtype=torch.float64)
    if signed and storage == "sign_magnitude":
        raise ValueError("sign-magnitude codes are not a weighted sum of their bits")
    weights = 2.0 ** torch.arange(bits, dtype=torch.float64)
    if signed and storage == "twos":
        weights[-1] = -weights[-1]
    return weights
