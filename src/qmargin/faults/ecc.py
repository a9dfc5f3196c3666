"""Error-correcting memory: SECDED (extended Hamming) codes over the stored weight words, exact in law.

A layer's b-bit words (bit 0 = LSB, flat storage order) are packed into **data words of k bits**:
data bit ``d`` of codeword ``c`` is bit ``(c k + d) mod b`` of word ``(c k + d) // b`` (consecutive
words, LSB first; a last partial codeword is padded with zero bits that are stored, and hit, like any
other). Each codeword adds ``r`` Hamming check bits (the smallest ``r`` with ``2**r >= k + r + 1``) and
one overall parity bit: ``n = k + r + 1`` stored bits, (72, 64) for ``k = 64``, (39, 32) for ``k = 32``.
Memory overhead ``(r + 1) / k``: 12.5 % and 21.9 %.

Code positions (the classic layout): position 0 is the overall parity bit; positions ``1 .. k + r``
are the Hamming code, with the check bits at the powers of two and the data bits, in order, at the
other positions. The parity-check matrix ``H`` has, for position ``j >= 1``, the binary expansion of
``j`` as its column (rows ``0 .. r-1``), and an all-ones row for the overall parity.

**Raw errors** hit each of the ``n`` stored bits of every codeword independently with probability
``p`` (data, check and parity bits alike). The code is linear, so what the decoder does depends on the
raw error vector ``e`` only (never on the data): with syndrome ``s = XOR_{j in e, j >= 1} j`` and
overall parity ``q = |e| mod 2``, a real SECDED decoder

* ``q = 0, s = 0``: sees no error (``e`` empty, or an undetectable pattern of >= 4 errors);
* ``q = 1, s = 0``: corrects the overall parity bit (position 0);
* ``q = 1, 1 <= s <= k + r``: corrects position ``s`` (the right one for a single error; for three
  or more errors a **miscorrection**: it may flip a data bit that was fine);
* ``q = 1, s > k + r`` (no such position) or ``q = 0, s != 0``: a **detected uncorrectable error**
  (DUE: exactly the double errors, and some odd patterns of >= 3).

What reaches the weights is the residual error on the data positions: ``e`` with the decoder's
correction XORed in, or for a DUE the policy's outcome: ``"keep"`` (the data as read, raw errors
included), ``"zero"`` (the controller returns an all-zero data word: every data bit of the codeword
reads 0, which is code 0 in two's complement and the most negative code in offset binary) or
``"flag"`` (the data as read, like ``"keep"``, but the pattern is flagged). Every policy counts the
codewords with a DUE (``FaultResult.n_due``; campaigns store it per pattern).

**Parity** (:class:`Parity`, detection only): one even-parity bit per ``k``-bit data word, ``n = k + 1``
stored bits, the same packing. Raw errors hit the ``n`` bits at rate ``p``; an even number of them
(``0, 2, 4, ...``) is not seen (the data errors stay), an odd number is a DUE, handled by the policy.

Sampling is exact and sparse: the raw error positions over all ``W n`` stored bits come from the same
O(K) Bernoulli sampler as plain bit errors (:mod:`qmargin.faults.functional`), grouped by codeword and
decoded as above; only codewords with at least one raw error cost anything.

Sources: R. W. Hamming, *Error detecting and error correcting codes*, Bell System Technical Journal 29
(1950); M. Y. Hsiao, *A class of optimal minimum odd-weight-column SEC-DED codes*, IBM J. Res. Dev. 14
(1970) (real memories often use Hsiao's odd-weight columns; the decoded law differs from the extended
Hamming code's only in which >= 3-error patterns miscorrect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from qmargin.errors import ConfigError
from qmargin.faults.functional import (
    BitSites,
    StuckBits,
    WordPatch,
    _bernoulli_chunks,
    flip_bits_,
    force_bits_,
)
from qmargin.faults.kinds import FaultKind, FaultResult, _rate, register_fault_kind

__all__ = ["SECDED", "Parity", "secded_layout", "decode_errors", "parity_decode", "DUE_POLICIES"]

DUE_POLICIES = ("keep", "zero", "flag")
"""What a detected uncorrectable error (DUE) does to the data of its codeword: ``"keep"`` (the data as
read, raw errors included), ``"zero"`` (an all-zero data word), ``"flag"`` (the data as read, like
``"keep"``, and the pattern is flagged: the controller raised an interrupt the system could act on).
Every policy counts the DUEs (:attr:`FaultResult.n_due`); ``"flag"`` only says the count is the point."""


@dataclass(frozen=True)
class SecdedLayout:
    """Positions of an extended Hamming code with ``k`` data bits (module doc)."""

    k: int
    r: int
    n: int
    data_of_position: np.ndarray  # [n] int64: data bit index of each code position, -1 for check bits

    @property
    def overhead(self) -> float:
        """Stored check bits per data bit, ``(r + 1) / k``."""
        return (self.r + 1) / self.k


def secded_layout(k: int) -> SecdedLayout:
    """The layout of the SECDED code with ``k`` data bits (``1 <= k <= 1024``)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1024:
        raise ConfigError(f"SECDED data word width k must be an integer in 1..1024, got {k!r}")
    r = 1
    while 2**r < k + r + 1:
        r += 1
    n = k + r + 1
    data_of = np.full(n, -1, dtype=np.int64)
    d = 0
    for j in range(1, k + r + 1):
        if j & (j - 1):  # not a power of two: a data position
            data_of[j] = d
            d += 1
    assert d == k
    return SecdedLayout(k, r, n, data_of)


def decode_errors(
    layout: SecdedLayout, codeword: np.ndarray, position: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode raw errors: ``codeword`` / ``position`` (int64, sorted by codeword) list every raw bit
    error. Returns ``(err_cw, err_pos, due_cw, outcome_cw)``: the residual error positions after the
    decoder's correction (code positions, check bits included), the codewords with a DUE (their raw
    errors are among the residual ones, for the ``"keep"`` policy), and for each codeword with raw
    errors its outcome: 0 none seen, 1 corrected, 2 DUE (the order of ``np.unique(codeword)``)."""
    if codeword.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty, empty
    cws, starts, counts = np.unique(codeword, return_index=True, return_counts=True)
    syndrome = np.bitwise_xor.reduceat(position, starts)  # position 0 adds nothing to the XOR
    odd = (counts % 2) == 1
    hamming_len = layout.k + layout.r
    correct_at = np.where(odd & (syndrome <= hamming_len), syndrome, -1)  # 0 = the parity bit
    due = (~odd & (syndrome != 0)) | (odd & (syndrome > hamming_len))
    outcome = np.where(due, 2, np.where(odd, 1, 0))
    # residual = raw XOR {correction}
    fix = correct_at >= 0
    pos_all = np.concatenate([position, correct_at[fix]])
    cw_all = np.concatenate([codeword, cws[fix]])
    key = cw_all * layout.n + pos_all
    uniq, cnt = np.unique(key, return_counts=True)
    kept = uniq[cnt % 2 == 1]
    return kept // layout.n, kept % layout.n, cws[due], outcome


@dataclass(frozen=True)
class SECDED(FaultKind):
    """Random bit errors at rate ``p`` on SECDED-protected memory (module doc): words packed into
    ``k``-bit data words, each stored with ``r + 1`` check bits; what reaches the weights is what a
    real decoder leaves. ``due``: ``"keep"``, ``"zero"`` or ``"flag"`` (:data:`DUE_POLICIES`).
    Protected bit positions (``protected``) are never changed (they sit in reliable memory)."""

    p: float
    k: int = 64
    due: str = "keep"
    stream: ClassVar[tuple[str, ...]] = ("secded",)
    detects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _rate("p", self.p))
        secded_layout(self.k)
        if self.due not in DUE_POLICIES:
            raise ConfigError(f"due must be one of {', '.join(DUE_POLICIES)}, got {self.due!r}")

    @property
    def is_null(self) -> bool:
        return self.p == 0.0

    @property
    def overhead(self) -> float:
        """Check bits stored per data bit."""
        return secded_layout(self.k).overhead

    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        layout = secded_layout(self.k)
        if layout.k % bits:
            raise ConfigError(
                f"SECDED over {layout.k}-bit data words needs whole {bits}-bit words per codeword"
            )
        numel = codes.numel()
        n_cw = math.ceil(numel * bits / layout.k)
        raw = _raw_errors(n_cw * layout.n, self.p, generator)
        err_cw, err_pos, due_cw, _ = decode_errors(layout, raw // layout.n, raw % layout.n)
        d = layout.data_of_position[err_pos]
        on_data = d >= 0
        return _apply_decoded(codes, bits, protected, layout.k, err_cw[on_data], d[on_data], due_cw, self.due)

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict()


def parity_decode(
    k: int, codeword: np.ndarray, position: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parity over ``k`` data bits: ``codeword`` / ``position`` (int64, sorted by codeword; positions
    ``0 .. k-1`` data, ``k`` the parity bit) list every raw bit error. Returns ``(cw, data_bit, due_cw)``:
    the raw errors on data bits (all of them stay: parity corrects nothing) and the codewords with an
    odd number of raw errors (detected, uncorrectable)."""
    if codeword.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty
    cws, counts = np.unique(codeword, return_counts=True)
    on_data = position < k
    return codeword[on_data], position[on_data], cws[counts % 2 == 1]


@dataclass(frozen=True)
class Parity(FaultKind):
    """Random bit errors at rate ``p`` on parity-protected memory (module doc), detection only.

    The b-bit words are packed into ``k``-bit data words as for :class:`SECDED` (``k = None``: one
    parity bit per stored word, ``k = b``); each is stored with one even-parity bit, ``n = k + 1`` bits,
    all hit at rate ``p``. With ``E`` raw errors in a codeword: ``E`` even, the errors on data bits
    reach the weights unseen; ``E`` odd, a DUE, handled by ``due`` (``"keep"``, ``"zero"``, ``"flag"``).
    Overhead ``1 / k``. ``protected`` positions are never changed.
    """

    p: float
    k: int | None = None
    due: str = "keep"
    stream: ClassVar[tuple[str, ...]] = ("parity",)
    detects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", _rate("p", self.p))
        if self.k is not None and (
            isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= 1024
        ):
            raise ConfigError(
                f"parity data word width k must be an integer in 1..1024 or None, got {self.k!r}"
            )
        if self.due not in DUE_POLICIES:
            raise ConfigError(f"due must be one of {', '.join(DUE_POLICIES)}, got {self.due!r}")

    @property
    def is_null(self) -> bool:
        return self.p == 0.0

    def apply_(
        self, codes: Tensor, bits: int, generator: torch.Generator, protected: frozenset[int]
    ) -> FaultResult:
        k = bits if self.k is None else self.k
        if k % bits:
            raise ConfigError(f"parity over {k}-bit data words needs whole {bits}-bit words per codeword")
        numel = codes.numel()
        n_cw = math.ceil(numel * bits / k)
        raw = _raw_errors(n_cw * (k + 1), self.p, generator)
        cw, data_bit, due_cw = parity_decode(k, raw // (k + 1), raw % (k + 1))
        return _apply_decoded(codes, bits, protected, k, cw, data_bit, due_cw, self.due)


def _raw_errors(total: int, p: float, generator: torch.Generator) -> np.ndarray:
    """Sorted positions (int64) of the raw errors among ``total`` stored bits: exact O(K) sampler."""
    if p >= 1.0:
        return np.arange(total, dtype=np.int64)
    if p <= 0.0:
        return np.empty(0, dtype=np.int64)
    chunks = [c.to(torch.int64).numpy() for c in _bernoulli_chunks(total, p, generator)]
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)


def _apply_decoded(
    codes: Tensor,
    bits: int,
    protected: frozenset[int],
    k: int,
    err_cw: np.ndarray,
    err_data_bit: np.ndarray,
    due_cw: np.ndarray,
    due: str,
) -> FaultResult:
    """Write a decoded pattern into ``codes``: the residual errors on data bits (codeword, data bit),
    and for the codewords with a DUE the policy (``"zero"``: every data bit reads 0; ``"keep"`` /
    ``"flag"``: nothing more). ``n_due`` counts the DUE codewords that hold at least one real word
    (a codeword of padding only is not read)."""
    numel = codes.numel()
    due_cw = due_cw[due_cw * k < numel * bits]
    zeroed = due == "zero" and due_cw.size > 0
    if zeroed:
        keep = ~np.isin(err_cw, due_cw)
        err_cw, err_data_bit = err_cw[keep], err_data_bit[keep]
    flips = _sites(err_cw * k + err_data_bit, numel, bits, protected)
    patch = flip_bits_(codes, bits, flips)
    n_stuck = 0
    if zeroed:
        word_lo = due_cw * k // bits
        word_hi = np.minimum(((due_cw + 1) * k + bits - 1) // bits, numel)
        spans = [np.arange(a, b) for a, b in zip(word_lo, word_hi, strict=True)]
        words = np.unique(np.concatenate(spans))
        mask = ((1 << bits) - 1) & ~sum(1 << b for b in protected)
        stuck = StuckBits(
            torch.from_numpy(words),
            torch.full((words.size,), mask, dtype=torch.uint8),
            torch.zeros(words.size, dtype=torch.uint8),
            numel,
            bits,
        )
        n_stuck = stuck.n_bits
        patch = _merge(patch, force_bits_(codes, bits, stuck))
    return FaultResult(patch, n_flipped=flips.n_bits, n_stuck=n_stuck, n_due=int(due_cw.size))


def _sites(flat_bit: np.ndarray, numel: int, bits: int, protected: frozenset[int]) -> BitSites:
    """Flat data-bit indices (padding beyond the last word dropped) as :class:`BitSites`."""
    word, bit = flat_bit // bits, flat_bit % bits
    keep = word < numel
    if protected:
        keep &= ~np.isin(bit, sorted(protected))
    word, bit = word[keep], bit[keep]
    if word.size == 0:
        return BitSites(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8), numel, bits)
    uniq, inv = np.unique(word, return_inverse=True)
    mask = np.zeros(uniq.size, dtype=np.uint8)
    np.bitwise_or.at(mask, inv, (1 << bit).astype(np.uint8))
    return BitSites(torch.from_numpy(uniq), torch.from_numpy(mask), numel, bits)


def _merge(a: WordPatch, b: WordPatch) -> WordPatch:
    """One patch for two edits of disjoint words (``a`` first)."""
    if not len(b):
        return a
    if not len(a):
        return b
    index = torch.cat([a.index, b.index])
    order = torch.argsort(index)
    old, new = torch.cat([a.old, b.old])[order], torch.cat([a.new, b.new])[order]
    return WordPatch(index[order], old, new, a.bits)


register_fault_kind("secded", SECDED)
register_fault_kind("parity", Parity)
