"""Functional core of the bit-error model (design.md §2): exact sparse samplers and word edits.

Plain tensors in, plain tensors out. The word format lives in :mod:`qmargin.quant.codes`
(docs/bit-conventions.md has the long form); in short:

* A stored code is one b-bit word, ``1 <= b <= 8``; bit 0 is the least significant bit.
* ``int8`` codes are symmetric: the word is the low ``b`` bits of the two's complement, so
  ``word = code mod 2**b`` and ``code = word - 2**b * [word >= 2**(b-1)]`` (sign extension).
  A corrupted word may decode to ``-2**(b-1)``, one below the quantizer's ``-qmax``: a legal value.
* ``int8`` codes with ``b = 1`` are the binary sign code: word 1 is ``+1``, word 0 is ``-1``.
* ``uint8`` codes are unsigned: ``word = code``, ``0 <= code < 2**b``.

Random bit errors at rate p flip every exposed (not protected) bit independently with probability
p. With separate rates, a stored 0 reads as 1 with probability ``p01`` and a stored 1 as 0 with
``p10``. Stuck-at faults force a bit to 0 (rate ``s0``) or 1 (rate ``s1``), independently per bit.

Exact sparse sampling. The ``b_u`` exposed bits of ``n`` words form ``N = n b_u`` slots (slot
``s`` is exposed bit ``s mod b_u`` of word ``s div b_u``). Selecting each slot independently with
probability p is a Bernoulli(p) process, whose gaps between successive selected slots are i.i.d.
``Geometric(p)`` on ``{1, 2, ...}``; they are drawn by inversion, ``G = ceil(log U / log(1 - p))``
with ``U ~ Uniform[0, 1)``, and their cumulative sum lists the selected slots in increasing order,
without duplicates. The result has exactly the law of ``N`` independent Bernoulli(p) draws (up to the
2**-53 resolution of the uniforms): the number of selected bits is Binomial(N, p) and, given K, the
selected slots are a uniform K-subset. It costs one uniform and O(1) work per selected bit: O(K)
time and memory, never O(N).

Every random draw comes from a CPU ``torch.Generator``; patterns are then moved to the codes' device,
so a pattern depends on ``(seed, numel, bits, rates, protected bits)`` only, never on the device or
on the number of threads.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from qmargin.errors import SeedError
from qmargin.quant.codes import (
    bit_differences,
    check_bits,
    exposed_positions,
    from_words,
    popcount,
    to_words,
)

__all__ = [
    "check_seed",
    "SEED_RANGE",
    "derive_seed",
    "make_generator",
    "BitSites",
    "StuckBits",
    "WordPatch",
    "sample_bit_sites",
    "sample_flips",
    "sample_stuck_bits",
    "flip_bits_",
    "force_bits_",
    "flip_random_bits",
    "stuck_at",
]

_SEED_MASK = (1 << 63) - 1
_MAX_SLOTS = 1 << 53  # bit positions are exact float64 integers below this
_INT32_MAX = (1 << 31) - 1
# Uniforms drawn per chunk. Patterns do not depend on it: positions are a function of the uniform
# stream only (torch draws CPU uniforms one after the other) and per-bit decisions use a substream
# (`_substream`). Below ATen's 32768-element grain size, so every per-chunk op runs on the calling
# thread (no OpenMP fork/join per op, which on a loaded machine can cost a scheduler time slice
# each) and chunks stay in L2.
_CHUNK = 32_000


# --------------------------------------------------------------------------------------------
# seeds and generators
# --------------------------------------------------------------------------------------------
SEED_RANGE = (0, 1 << 63)
"""Seeds are integers ``s`` with ``0 <= s < 2**63`` (the range of a seeded torch generator here)."""


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` if it is an ``int`` (not a ``bool``) in ``[0, 2**63)``, else :class:`SeedError`.

    Seeds outside the range used to be reduced modulo ``2**63``, so ``s`` and ``s + 2**63`` (or
    ``-1`` and ``2**63 - 1``) gave one pattern; they are refused instead.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SeedError(f"{what} must be an integer in [0, 2**63), got {seed!r}")
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise SeedError(f"{what} must be in [0, 2**63), got {seed}")
    return seed


def derive_seed(seed: int, *names: str) -> int:
    """A stable 63-bit seed for the stream named ``names`` under the base ``seed``.

    ``derive_seed(s, n_1, ..., n_k) = BLAKE2b_64(s, len(n_1), n_1, ..., len(n_k), n_k) mod 2**63``
    (personalised with ``b"qmargin.faults"``). Unlike ``hash()`` it is the same in every process and
    on every machine, and length prefixes make ``("ab", "c")`` and ``("a", "bc")`` different streams.
    ``seed`` must be in ``[0, 2**63)`` (:func:`check_seed`).
    """
    check_seed(seed)
    h = hashlib.blake2b(digest_size=8, person=b"qmargin.faults")
    s = str(seed).encode()
    h.update(len(s).to_bytes(8, "little") + s)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"derive_seed names must be str, got {type(name).__name__}")
        b = name.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return int.from_bytes(h.digest(), "little") & _SEED_MASK


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU generator seeded with ``seed`` in ``[0, 2**63)`` (an existing generator is returned as is).

    Other seeds raise :class:`SeedError` (they used to be reduced modulo ``2**63``).
    """
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator(device="cpu").manual_seed(check_seed(seed))


# --------------------------------------------------------------------------------------------
# words
# --------------------------------------------------------------------------------------------
def _check_codes(codes: Tensor, bits: int) -> bool:
    """Validate ``codes``/``bits``; return True for signed (``int8``) codes."""
    check_bits(bits)
    if not isinstance(codes, Tensor):
        raise TypeError(f"codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype == torch.int8:
        return True
    if codes.dtype == torch.uint8:
        return False
    raise TypeError(f"codes must be int8 (two's complement) or uint8 (unsigned), got {codes.dtype}")


def _check_seed_arg(seed: object) -> None:
    """Samplers take a seed in ``[0, 2**63)`` or a ``torch.Generator``; checked before any shortcut."""
    if not isinstance(seed, torch.Generator):
        check_seed(seed)


def _check_rate(name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {p!r}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {p}")
    return p


# --------------------------------------------------------------------------------------------
# sparse samplers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BitSites:
    """Selected bits of a flat array of ``numel`` b-bit words.

    ``index``: ``int64`` flat word indices, strictly increasing; ``mask``: ``uint8`` of the same
    length, bit j set when bit j of that word is selected (every mask is nonzero). Cost O(K).
    """

    index: Tensor
    mask: Tensor
    numel: int
    bits: int

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def n_bits(self) -> int:
        """Total number of selected bits (sum of popcounts)."""
        return int(popcount(self.mask).sum(dtype=torch.int64)) if len(self) else 0

    def to(self, device: torch.device | str) -> BitSites:
        return BitSites(self.index.to(device), self.mask.to(device), self.numel, self.bits)


@dataclass(frozen=True)
class StuckBits:
    """Stuck-at faults of a flat array of words: ``to_zero``/``to_one`` masks on the words ``index``.

    For every listed word ``to_zero & to_one == 0`` and ``to_zero | to_one != 0``.
    """

    index: Tensor
    to_zero: Tensor
    to_one: Tensor
    numel: int
    bits: int

    def __len__(self) -> int:
        return int(self.index.numel())

    @property
    def n_bits(self) -> int:
        """Number of stuck bits."""
        if not len(self):
            return 0
        return int(popcount(self.to_zero | self.to_one).sum(dtype=torch.int64))


def _empty_sites(numel: int, bits: int) -> BitSites:
    return BitSites(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.uint8), numel, bits)


def _bernoulli_chunks(n: int, p: float, generator: torch.Generator) -> Iterator[Tensor]:
    """Sorted positions of the successes of ``n`` i.i.d. Bernoulli(p) trials, chunk by chunk.

    Positions are ``int32`` when ``n < 2**31`` (half the memory traffic of ``int64``), else ``int64``.

    Gaps ``G_i = ceil(log(U_i) / log(1 - p))``, ``U_i ~ Uniform[0, 1)``, are i.i.d. Geometric(p) on
    ``{1, 2, ...}``: ``P(G > k) = P(log U < k log(1 - p)) = P(U < (1 - p)**k) = (1 - p)**k``.
    Positions are ``cumsum(G) - 1``; ``U = 0`` (probability 2**-53) gives an infinite gap, i.e. no
    further success. Requires ``0 < p < 1``.

    Uniforms are drawn ``_CHUNK`` at a time (every pass then runs in cache), and never many more
    than the remaining expected count ``r p + 6 sqrt(r p) + 16``. The running sum is float64: exact
    for integers below 2**53, and rounding is monotone, so a sum past ``n`` stays past ``n``.
    """
    inv_log_keep = 1.0 / math.log1p(-p)  # < 0
    last = -1  # position of the last success so far
    while last < n - 1:
        remaining = n - 1 - last
        mean = remaining * p
        c = int(min(_CHUNK, remaining, math.ceil(mean + 6.0 * math.sqrt(mean) + 16.0)))
        x = torch.rand(c, dtype=torch.float64, generator=generator)
        # G = 1 + floor(L) with L = log U / log(1 - p) > 0; equal to ceil(L) unless L is an integer
        # (probability 0, i.e. at the rounding level): P(ceil(L) > k) = P(U < (1 - p)**k).
        x.log_().mul_(inv_log_keep).ceil_()  # the gaps G_i >= 1 (float, +inf for U = 0)
        x[0] += float(last)
        x.cumsum_(0)
        done = float(x[-1]) >= n
        if done:
            x = x[: int(torch.searchsorted(x, float(n)))]
        if x.numel():
            pos = x.to(torch.int32 if n <= _INT32_MAX else torch.int64)  # int32 halves the traffic
            yield pos
            last = int(pos[-1])
        if done:
            return


def sample_bit_sites(
    numel: int,
    bits: int,
    p: float,
    *,
    seed: int | torch.Generator,
    protected_bits: Iterable[int] = (),
) -> BitSites:
    """Select every exposed bit of ``numel`` b-bit words independently with probability ``p``.

    Shape-only: no codes are needed and nothing of size ``numel`` is allocated. The ``b_u`` exposed
    bits of word ``i`` are the slots ``i b_u .. i b_u + b_u - 1`` of one Bernoulli(p) process over
    ``n = numel * b_u`` slots, sampled exactly through Geometric(p) gaps (:func:`_bernoulli_chunks`);
    slot ``s`` is bit ``exposed[s mod b_u]`` of word ``s div b_u``, and selected bits of the same
    word merge into one mask. ``E[n_bits] = n p``; time and memory O(n_bits), one uniform per bit.
    """
    p = _check_rate("ber", p)
    _check_seed_arg(seed)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative integer, got {numel!r}")
    positions = exposed_positions(bits, protected_bits)
    b_u = len(positions)
    if numel * b_u >= _MAX_SLOTS:
        raise ValueError(f"{numel} words x {b_u} exposed bits exceed the 2**53 bits the sampler indexes")
    if p == 0.0 or numel == 0 or not b_u:
        return _empty_sites(numel, bits)
    if p == 1.0:
        full = sum(1 << j for j in positions)
        return BitSites(torch.arange(numel), torch.full((numel,), full, dtype=torch.uint8), numel, bits)
    g = make_generator(seed)
    slot_bit = torch.tensor([1 << j for j in positions], dtype=torch.uint8)
    shift = b_u.bit_length() - 1 if b_u & (b_u - 1) == 0 else None
    n = numel * b_u
    mean = n * p
    cap = int(min(numel, math.ceil(mean + 6.0 * math.sqrt(mean) + 16.0)))
    index = torch.empty(cap, dtype=torch.int64)
    mask = torch.empty(cap, dtype=torch.uint8)
    filled = 0
    last_word = -1
    for pos in _bernoulli_chunks(n, p, g):
        if shift is not None:
            word, slot = pos >> shift, pos & (b_u - 1)
        else:
            word = torch.div(pos, b_u, rounding_mode="floor")
            slot = pos - word * b_u
        bit = slot_bit.index_select(0, slot)
        unique, group = torch.unique_consecutive(word, return_inverse=True)
        k = unique.numel()
        if k < word.numel():  # several bits of one word: one entry, masks ORed (distinct bits: a sum)
            bit = torch.zeros(k, dtype=torch.uint8).scatter_add_(0, group, bit)
            word = unique
        if filled and int(word[0]) == last_word:  # continues the last word of the previous chunk
            mask[filled - 1] |= bit[0]
            word, bit = word[1:], bit[1:]
            k -= 1
        if not k:
            continue
        if filled + k > index.numel():
            grow = max(k, index.numel() // 2)
            index = torch.cat([index[:filled], torch.empty(grow, dtype=torch.int64)])
            mask = torch.cat([mask[:filled], torch.empty(grow, dtype=torch.uint8)])
        index[filled : filled + k] = word
        mask[filled : filled + k] = bit
        filled += k
        last_word = int(word[-1])
    return BitSites(index[:filled], mask[:filled], numel, bits)


def _substream(generator: torch.Generator) -> torch.Generator:
    """A second generator seeded from one draw of ``generator``, taken before any other draw.

    Per-bit decisions (thinning, stuck-at value) use it, so they do not depend on how many uniforms
    the position sampler consumed (which depends on its chunking).
    """
    return torch.Generator().manual_seed(int(torch.randint(0, _SEED_MASK, (1,), generator=generator)))


def _bit_matrix(mask: Tensor, bits: int) -> Tensor:
    """``[K, bits]`` 0/1 matrix of the bits of ``mask`` (column j = bit j)."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=mask.device)
    return (mask.unsqueeze(1) >> shifts) & 1


def _pack_bits(matrix: Tensor) -> Tensor:
    """Inverse of :func:`_bit_matrix`: ``uint8`` words from a ``[K, bits]`` 0/1 matrix."""
    weights = 1 << torch.arange(matrix.shape[1], dtype=torch.int16, device=matrix.device)
    return (matrix.to(torch.int16) * weights).sum(dim=1).to(torch.uint8)


def _flat_gather(codes: Tensor, index: Tensor) -> Tensor:
    if codes.is_contiguous():
        return codes.view(-1).gather(0, index)
    return codes[torch.unravel_index(index, codes.shape)]


def _flat_scatter_(codes: Tensor, index: Tensor, values: Tensor) -> None:
    with torch.no_grad():
        if codes.is_contiguous():
            codes.view(-1).scatter_(0, index, values)
        else:
            codes.index_put_(torch.unravel_index(index, codes.shape), values)


def sample_flips(
    codes: Tensor,
    bits: int,
    *,
    p01: float,
    p10: float,
    seed: int | torch.Generator,
    protected_bits: Iterable[int] = (),
    nested_max: float | None = None,
) -> BitSites:
    """Bits of ``codes`` that random bit errors flip: a stored 0 flips with ``p01``, a 1 with ``p10``.

    Equal rates need no codes (``sample_bit_sites``). Unequal rates: candidates are drawn at
    ``p_max = max(p01, p10)`` and each candidate bit is kept with probability ``p_v / p_max`` for its
    stored value v (thinning); a bit thus flips with probability ``p_max * p_v / p_max = p_v``,
    independently. O(K * b) for K candidate words.

    Nested patterns (``nested_max = P``, ``P >= max(p01, p10)``): candidates are drawn at ``P`` and
    candidate bit ``i`` is kept when its own uniform ``u_i < p_v / P``, whatever the rates (also when
    they are equal). A bit flips with probability ``P * p_v / P = p_v``, independently: the law is the
    same. The candidates and the ``u_i`` depend on the seed and ``P`` only, so for one seed the bits
    flipped at lower rates are a subset of those flipped at higher ones (every rate ``<= P``).
    """
    signed = _check_codes(codes, bits)
    _check_seed_arg(seed)
    p01 = _check_rate("p01", p01)
    p10 = _check_rate("p10", p10)
    p_max = max(p01, p10)
    if nested_max is not None:
        top = _check_rate("nested_max", nested_max)
        if p_max > top:
            raise ValueError(f"rates p01={p01}, p10={p10} exceed nested_max={top}")
        if p_max == 0.0:
            return _empty_sites(codes.numel(), bits)
    g = make_generator(seed)
    if nested_max is None and p01 == p10:
        return sample_bit_sites(codes.numel(), bits, p_max, seed=g, protected_bits=protected_bits)
    cand = p_max if nested_max is None else top
    thin = _substream(g)
    sites = sample_bit_sites(codes.numel(), bits, cand, seed=g, protected_bits=protected_bits)
    if not len(sites):
        return sites
    candidate = _bit_matrix(sites.mask, bits).bool()
    if p01 == p10:  # nested, equal rates: no stored values needed
        keep_prob = torch.full(candidate.shape, p01 / cand, dtype=torch.float64)
    else:
        old = _flat_gather(codes, sites.index.to(codes.device)).cpu()
        _check_representable(old, bits, signed)
        value = _bit_matrix(to_words(old, bits), bits).bool()
        ratios = torch.tensor([p01 / cand, p10 / cand], dtype=torch.float64)
        keep_prob = ratios[value.long()]
    u = torch.rand(keep_prob.shape, dtype=torch.float64, generator=thin)
    mask = _pack_bits(candidate & (u < keep_prob))
    nonzero = mask != 0
    return BitSites(sites.index[nonzero], mask[nonzero], sites.numel, bits)


def sample_stuck_bits(
    numel: int,
    bits: int,
    *,
    rate_0: float = 0.0,
    rate_1: float = 0.0,
    seed: int | torch.Generator,
    protected_bits: Iterable[int] = (),
) -> StuckBits:
    """Stuck-at faults: each exposed bit is stuck at 0 with ``rate_0``, at 1 with ``rate_1``, else free.

    The three outcomes are exclusive (``rate_0 + rate_1 <= 1``): stuck bits are drawn at
    ``s = rate_0 + rate_1`` (:func:`sample_bit_sites`) and each is stuck at 1 with probability
    ``rate_1 / s``. Shape-only, O(K).
    """
    _check_seed_arg(seed)
    rate_0 = _check_rate("stuck_at_0", rate_0)
    rate_1 = _check_rate("stuck_at_1", rate_1)
    s = rate_0 + rate_1
    if s > 1.0 + 1e-12:
        raise ValueError(f"stuck_at_0 + stuck_at_1 must be <= 1, got {s}")
    g = make_generator(seed)
    split = _substream(g) if rate_0 > 0.0 and rate_1 > 0.0 else None
    sites = sample_bit_sites(numel, bits, min(s, 1.0), seed=g, protected_bits=protected_bits)
    if split is None:
        zeros = torch.zeros_like(sites.mask)
        to_zero, to_one = (sites.mask, zeros) if rate_1 == 0.0 else (zeros, sites.mask)
        return StuckBits(sites.index, to_zero, to_one, numel, bits)
    u = torch.rand((len(sites), bits), dtype=torch.float64, generator=split)
    ones = _pack_bits(_bit_matrix(sites.mask, bits).bool() & (u < rate_1 / s))
    return StuckBits(sites.index, sites.mask & ~ones, ones, numel, bits)


# --------------------------------------------------------------------------------------------
# in-place edits (restorable)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordPatch:
    """A restorable edit of a code tensor: words at flat ``index`` went from ``old`` to ``new``.

    ``undo_(codes)`` writes ``old`` back (exact restore in O(K)); ``apply_(codes)`` re-applies it.
    """

    index: Tensor
    old: Tensor
    new: Tensor
    bits: int

    def __len__(self) -> int:
        return int(self.index.numel())

    def apply_(self, codes: Tensor) -> Tensor:
        if len(self):
            _flat_scatter_(codes, self.index, self.new)
        return codes

    def undo_(self, codes: Tensor) -> Tensor:
        if len(self):
            _flat_scatter_(codes, self.index, self.old)
        return codes

    @property
    def n_changed(self) -> int:
        """Number of bits whose value differs between ``old`` and ``new``."""
        return bit_differences(self.old, self.new, self.bits) if len(self) else 0


def _check_representable(values: Tensor, bits: int, signed: bool) -> None:
    if bits == 8:
        return  # every int8 / uint8 value is an 8-bit word
    if values.numel() and not torch.equal(from_words(to_words(values, bits), bits, signed), values):
        bad = values[from_words(to_words(values, bits), bits, signed) != values][0].item()
        kind = "sign code (+1/-1)" if signed and bits == 1 else f"{bits}-bit word"
        raise ValueError(f"code {bad} does not fit a {kind}; are `bits` and the codes' dtype right?")


def _empty_patch(codes: Tensor, bits: int) -> WordPatch:
    empty = torch.empty(0, dtype=codes.dtype, device=codes.device)
    return WordPatch(torch.empty(0, dtype=torch.int64, device=codes.device), empty, empty, bits)


def flip_bits_(codes: Tensor, bits: int, sites: BitSites) -> WordPatch:
    """XOR the selected bits into ``codes`` in place: ``word <- word XOR mask``; returns the patch.

    Codes are re-decoded after the XOR (sign extension for ``int8``), so e.g. flipping bit 3 of the
    4-bit code ``+1`` (``0001``) gives ``1001 = -7``. Flipping the same sites twice is the identity.
    """
    signed = _check_codes(codes, bits)
    if sites.numel != codes.numel() or sites.bits != bits:
        raise ValueError(
            f"sites for {sites.numel} {sites.bits}-bit words applied to {codes.numel()} {bits}-bit codes"
        )
    if not len(sites):
        return _empty_patch(codes, bits)
    index = sites.index.to(codes.device)
    old = _flat_gather(codes, index)
    _check_representable(old, bits, signed)
    mask = sites.mask.to(codes.device)
    if bits == 8:  # the word is the byte itself: XOR the raw bytes
        new = (old.view(torch.uint8) ^ mask).view(codes.dtype)
    else:
        new = from_words(to_words(old, bits) ^ mask, bits, signed)
    _flat_scatter_(codes, index, new)
    return WordPatch(index, old, new, bits)


def force_bits_(codes: Tensor, bits: int, stuck: StuckBits) -> WordPatch:
    """Force stuck bits in place: ``word <- (word AND NOT to_zero) OR to_one``; returns the patch."""
    signed = _check_codes(codes, bits)
    if stuck.numel != codes.numel() or stuck.bits != bits:
        raise ValueError(
            f"stuck bits for {stuck.numel} {stuck.bits}-bit words applied to {codes.numel()} {bits}-bit codes"
        )
    if not len(stuck):
        return _empty_patch(codes, bits)
    index = stuck.index.to(codes.device)
    old = _flat_gather(codes, index)
    _check_representable(old, bits, signed)
    words = (to_words(old, bits) & ~stuck.to_zero.to(codes.device)) | stuck.to_one.to(codes.device)
    new = from_words(words, bits, signed)
    _flat_scatter_(codes, index, new)
    return WordPatch(index, old, new, bits)


# --------------------------------------------------------------------------------------------
# copy-returning conveniences
# --------------------------------------------------------------------------------------------
def flip_random_bits(
    codes: Tensor,
    bits: int,
    ber: float,
    *,
    seed: int | torch.Generator,
    p01: float | None = None,
    p10: float | None = None,
    protected_bits: Iterable[int] = (),
) -> Tensor:
    """A copy of ``codes`` with random bit errors: each exposed bit flips independently.

    A stored 0 flips with probability ``p01`` (default ``ber``), a stored 1 with ``p10`` (default
    ``ber``). The pattern is a pure function of ``(seed, codes.shape, bits, rates, protected_bits)``
    (plus the stored values when ``p01 != p10``). Cost: one copy plus O(K) for K hit words.
    """
    _check_codes(codes, bits)
    _check_seed_arg(seed)
    ber = _check_rate("ber", ber)
    p01 = ber if p01 is None else p01
    p10 = ber if p10 is None else p10
    out = codes.clone()
    sites = sample_flips(out, bits, p01=p01, p10=p10, seed=seed, protected_bits=protected_bits)
    flip_bits_(out, bits, sites)
    return out


def stuck_at(
    codes: Tensor,
    bits: int,
    rate: float,
    value: int,
    *,
    seed: int | torch.Generator,
    protected_bits: Iterable[int] = (),
) -> Tensor:
    """A copy of ``codes`` where each exposed bit is independently stuck at ``value`` with prob ``rate``."""
    _check_codes(codes, bits)
    if value not in (0, 1) or isinstance(value, bool):
        raise ValueError(f"stuck-at value must be 0 or 1, got {value!r}")
    rate = _check_rate("rate", rate)
    _check_seed_arg(seed)
    stuck = sample_stuck_bits(
        codes.numel(),
        bits,
        rate_0=rate if value == 0 else 0.0,
        rate_1=rate if value == 1 else 0.0,
        seed=seed,
        protected_bits=protected_bits,
    )
    out = codes.clone()
    force_bits_(out, bits, stuck)
    return out
