"""Bit-error certificates of monotone operator equilibrium networks (beyond the paper, design.md §2, §5).

Errors hit the *stored* integer codes of ``W`` (the word codec of :mod:`qmargin.quant.codes`). What is
certified, from the weights alone:

* the largest number of *arbitrary* bit flips that provably keeps ``W~`` monotone
  (:func:`max_certified_bit_flips`, from the bounds :func:`bit_flip_perturbation_bounds` on
  ``||dW||_2`` over every pattern of ``k`` flips);
* the share of random error patterns at a bit error rate that stay certified / monotone
  (:func:`certify_under_bit_errors`), with the patterns :func:`qmargin.faults.inject` draws for the
  same seed, so certificates and bit-error campaigns pair up pattern by pattern.

The only module of :mod:`qmargin.deq` that imports :mod:`qmargin.faults`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from qmargin.deq.certificates import as_operator, check_same_form, monotonicity_margin, spectral_norm
from qmargin.errors import ConfigError
from qmargin.faults.functional import check_seed, derive_seed, flip_random_bits
from qmargin.quant import QuantSpec, dequantize
from qmargin.quant.codes import (
    bit_differences,
    bit_weights,
    check_bits,
    exposed_positions,
    protected_positions,
    to_words,
)

__all__ = [
    "MONDEQ_LAYER",
    "code_bit_deltas",
    "bit_flip_perturbation_bounds",
    "BitFlipCertificate",
    "max_certified_bit_flips",
    "bit_error_pattern",
    "BitErrorCertificate",
    "certify_under_bit_errors",
]


def _as_spec(spec: QuantSpec | int) -> QuantSpec:
    if isinstance(spec, QuantSpec):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise TypeError(f"spec must be a QuantSpec or a bit width, got {spec!r}")
    return QuantSpec(bits=spec)


def _check_code_range(c: Tensor, spec: QuantSpec) -> None:
    bits = spec.bits
    if spec.symmetric and bits == 1:
        if bool(((c != 1) & (c != -1)).any()):
            raise ValueError("1-bit sign codes must be -1 or +1")
        return
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if spec.symmetric else (0, 2**bits - 1)
    if bool(((c < lo) | (c > hi)).any()):
        raise ValueError(f"codes outside the {bits}-bit word range [{lo}, {hi}]")


def code_bit_deltas(codes: Tensor, spec: QuantSpec | int, protected_bits: Sequence[int] = ()) -> Tensor:
    """Signed change of every stored code when one of its bits flips: ``(*codes.shape, bits)`` float64.

    The word codec of :mod:`qmargin.quant.codes`: bit ``j`` of the stored word
    (:func:`~qmargin.quant.codes.to_words`) adds ``w_j`` (:func:`~qmargin.quant.codes.bit_weights`:
    ``2^j``, ``-2^(b-1)`` for the sign bit of a two's complement word, 2 for the 1-bit sign code) to the
    code, so flipping it changes the code by ``w_j (1 - 2 bit_j)``: ``+w_j`` for 0 -> 1, ``-w_j`` for
    1 -> 0. Flips in one word add up, so a set ``S`` of flips changes the code by
    ``sum_{j in S} w_j (1 - 2 bit_j)``; the dequantized weight changes by ``scale`` times that (the
    zero point cancels). Protected bits (:func:`~qmargin.quant.codes.protected_positions`) get 0.
    ``codes`` may be of any integer dtype; values outside the b-bit range raise ``ValueError``.
    """
    spec = _as_spec(spec)
    bits = check_bits(spec.bits)
    c = codes.to(torch.int64)
    _check_code_range(c, spec)
    words = to_words(c.to(torch.int8 if spec.symmetric else torch.uint8), bits).to(torch.int64)
    bit_vals = (words.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int64)) & 1
    deltas = bit_weights(bits, spec.symmetric) * (1 - 2 * bit_vals).to(torch.float64)
    for j in protected_positions(protected_bits, bits):
        deltas[..., j] = 0.0
    return deltas


def _word_max_change(deltas: Tensor) -> Tensor:
    """``A(m) = max over <= m flips of |code change|`` for ``m = 0..b``: ``(..., b + 1)``.

    A set of flips changes a word by the sum of its bits' signed deltas; the absolute value is at most
    the larger of its positive and its negative parts, so the maximum over ``<= m`` flips is
    ``max(sum of the m largest positive deltas, sum of the m largest |negative| deltas)``, attained.
    """
    pos = torch.sort(deltas.clamp(min=0.0), dim=-1, descending=True).values
    neg = torch.sort((-deltas).clamp(min=0.0), dim=-1, descending=True).values
    zero = torch.zeros((*deltas.shape[:-1], 1), dtype=deltas.dtype)
    return torch.cat([zero, torch.maximum(pos.cumsum(-1), neg.cumsum(-1))], dim=-1)


def _concave_slopes(G: np.ndarray) -> np.ndarray:
    """Slopes of the least concave majorant of each row of ``G`` (rows start at 0 and are nondecreasing).

    Output ``(rows, M)``: slope ``i`` is ``G^(i + 1) - G^(i)`` of the majorant ``G^ >= G``, nonincreasing
    along a row (upper hull, monotone chain, one row at a time).
    """
    rows, L = G.shape
    out = np.empty((rows, L - 1), dtype=np.float64)
    for r in range(rows):
        g = G[r]
        hull = [0]
        for i in range(1, L):
            while len(hull) >= 2:
                i0, i1 = hull[-2], hull[-1]
                # drop i1 if it lies on or below the chord i0 -> i
                if (g[i1] - g[i0]) * (i - i0) <= (g[i] - g[i0]) * (i1 - i0):
                    hull.pop()
                else:
                    break
            hull.append(i)
        for a, c in zip(hull[:-1], hull[1:], strict=True):
            out[r, a:c] = (g[c] - g[a]) / (c - a)
    return out


def _scales_per_row(scale: Tensor, codes: Tensor) -> Tensor:
    s = scale.detach().to(torch.float64).reshape(-1)
    if s.numel() == 1:
        s = s.expand(codes.shape[0])
    elif s.numel() != codes.shape[0]:
        raise ValueError(
            f"scale must be one value or one per output channel ({codes.shape[0]}), got {s.numel()}"
        )
    if bool((s < 0).any()):
        raise ValueError("scales must be nonnegative")
    return s.contiguous()


class _TopKSum:
    """``k -> sum of the k largest values`` of a multiset given as (values >= 0, multiplicities)."""

    def __init__(self, values: Tensor, counts: Tensor) -> None:
        values = values.reshape(-1).to(torch.float64)
        counts = counts.reshape(-1).to(torch.int64)
        keep = (counts > 0) & (values > 0)
        values, counts = values[keep], counts[keep]
        order = torch.argsort(values, descending=True)
        self.values = values[order]
        self.cum_count = torch.cumsum(counts[order], 0)
        self.cum_sum = torch.cumsum(self.values * counts[order].to(torch.float64), 0)

    def __call__(self, ks: Tensor) -> Tensor:
        ks = ks.to(torch.int64)
        out = torch.zeros(ks.shape, dtype=torch.float64)
        if self.values.numel() == 0:
            return out
        i = torch.searchsorted(self.cum_count, ks, right=False).clamp(max=self.values.numel() - 1)
        before_count = torch.where(i > 0, self.cum_count[(i - 1).clamp(min=0)], torch.zeros_like(i))
        before_sum = torch.where(i > 0, self.cum_sum[(i - 1).clamp(min=0)], torch.zeros_like(out))
        take = (ks - before_count).clamp(min=0)
        total = before_sum + take.to(torch.float64) * self.values[i]
        return torch.minimum(total, self.cum_sum[-1].expand_as(total))


class _FlipBound:
    """The bound ``beta(k)`` of :func:`bit_flip_perturbation_bounds`, evaluated at any ``k``."""

    def __init__(self, codes: Tensor, scale: Tensor, spec: QuantSpec, protected_bits: Sequence[int]) -> None:
        if codes.dim() not in (2, 4):
            raise ValueError(
                f"codes must be a dense (n, n) W or a (C_out, C_in, kh, kw) kernel, got {codes.dim()}-D"
            )
        s = _scales_per_row(scale, codes)
        rows = codes.shape[0]
        per_row = codes.numel() // rows
        # (1) single-bit changes: bit j of a word in row r changes it by |w_j| s_r (sign aside)
        probe = torch.ones(1, dtype=torch.int64) if spec.symmetric else torch.zeros(1, dtype=torch.int64)
        bit_sizes = code_bit_deltas(probe, spec, protected_bits).abs()[0]
        self.l1 = _TopKSum(s[:, None] * bit_sizes[None, :], torch.full((rows, spec.bits), per_row))
        if codes.dim() == 2:
            # word profiles A(m) depend only on the code: one per distinct code, scaled per row
            uniq, inverse = torch.unique(codes.to(torch.int64), return_inverse=True)
            prof = _word_max_change(code_bit_deltas(uniq, spec, protected_bits))  # (U, b+1)
            present = torch.zeros(rows, uniq.numel(), dtype=torch.int64)
            present.scatter_add_(1, inverse.reshape(rows, -1), torch.ones_like(inverse.reshape(rows, -1)))
            slopes = torch.from_numpy(_concave_slopes((prof**2).numpy()))  # (U, b)
            self.env = _TopKSum(
                (s**2)[:, None, None] * slopes[None, :, :], present[:, :, None].expand(-1, -1, spec.bits)
            )
            # largest single-word change per m: max over (row, code present in the row)
            best = (s[:, None, None] * prof[None, :, :]).masked_fill((present == 0)[:, :, None], 0.0)
            self.amax = best.amax(dim=(0, 1))  # (b+1,)
        else:
            # a group (o, c) of T = kh kw taps: a_g = sum_t |dK_t| <= scale_o * (sum of the m largest
            # single-bit sizes among its T words), one profile P(m) for every group of the row
            c_out, c_in, kh, kw = codes.shape
            sizes = torch.sort(bit_sizes.repeat(kh * kw), descending=True).values
            prof = torch.cat([torch.zeros(1, dtype=torch.float64), sizes.cumsum(0)])  # (T b + 1,)
            slopes = torch.from_numpy(_concave_slopes((prof**2)[None, :].numpy()))[0]  # (T b,)
            self.env = _TopKSum((s**2)[:, None] * slopes[None, :], torch.full((rows, slopes.numel()), c_in))
            self.amax = s.max() * prof

    def __call__(self, ks: Tensor) -> Tensor:
        ks = ks.to(torch.int64)
        env = self.env(ks).clamp(min=0.0).sqrt()
        amax = self.amax[ks.clamp(max=self.amax.numel() - 1)]
        mixed = (amax * self.l1(ks)).clamp(min=0.0).sqrt()
        return torch.minimum(env, mixed)


def bit_flip_perturbation_bounds(
    codes: Tensor,
    scale: Tensor,
    spec: QuantSpec | int,
    k_max: int,
    *,
    protected_bits: Sequence[int] = (),
) -> Tensor:
    """Upper bounds ``beta(k)`` on ``||dW||_2`` over *all* patterns of ``<= k`` bit flips, ``k = 0..k_max``.

    Stored form: ``codes`` of ``W`` itself (``(n, n)``: ``dW = scale * dcode`` entrywise) or of the
    kernel ``K`` (``(C_out, C_in, kh, kw)``) of a circular convolution that enters ``W`` linearly with
    coefficient +-1 (any image size). ``scale`` is per tensor or per output channel (dim 0). Protected
    bits never flip. Returns float64 ``(k_max + 1,)``, nondecreasing, ``beta(0) = 0``.

    Groups. Dense: a group is one word ``e`` and ``||dW||_2 <= ||dW||_F = sqrt(sum_e a_e^2)`` with
    ``a_e = |dW_e|``. Convolution: the block of every frequency is ``D_f = sum_t dK_t exp(i theta_t(f))``,
    so ``||D_f||_2 <= ||D_f||_F <= sqrt(sum_g a_g^2)`` with ``a_g = sum_t |dK_(o,c,t)|`` for the group
    ``g = (o, c)`` of ``kh kw`` taps. A group hit by ``m`` flips has ``a_g <= A_g(m)``: for one word,
    ``A(m) = scale * max(sum of its m largest positive bit deltas, sum of its m largest |negative|
    ones)`` (:func:`code_bit_deltas`; attained, at most ``(2^b - 1) scale`` for the whole word); for a
    group of taps ``A(m) = scale * (sum of the m largest single-bit sizes 2^j among its kh kw words)``
    (the same for every group of a row; signs across taps do not matter once ``|dK_t|`` is taken).
    With ``k`` flips in all:

    1. concave majorant: ``sum_g A_g(m_g)^2 <= sum_g G^_g(m_g)`` for the least concave majorant
       ``G^_g`` of ``A_g^2``; the greedy solves the relaxed knapsack exactly, so
       ``beta_1(k)^2`` = the sum of the ``k`` largest majorant slopes over all groups;
    2. mixed: ``sum_g a_g^2 <= (max_g a_g) (sum_g a_g) <= A_max(k) * l1(k)``, with ``A_max(k)`` the
       largest ``A_g(k)`` and ``l1(k)`` the sum of the ``k`` largest single-bit changes
       ``2^j scale`` (each flipped bit adds at most its own size to one ``a_g``).

    ``beta(k) = min(beta_1(k), sqrt(A_max(k) l1(k)))``. (1) is good for many flips spread over words,
    (2) for few flips (it is exact for ``k = 1``: one flip, one entry). For dense ``W`` whose worst
    words share a row (one scale per row), ``||dW||_2 = ||dW||_F`` and (1) is attained at its
    breakpoints; the bound is a proof, not an estimate.
    """
    spec = _as_spec(spec)
    if k_max < 0:
        raise ValueError(f"k_max must be >= 0, got {k_max}")
    bound = _FlipBound(codes, scale, spec, protected_bits)
    return bound(torch.arange(k_max + 1))


@dataclass(frozen=True)
class BitFlipCertificate:
    """Largest number of arbitrary bit flips in the stored codes that provably keeps ``W~`` monotone.

    Attributes:
        max_flips: largest ``k`` with ``beta(k) < mu(W~)`` (:func:`bit_flip_perturbation_bounds`):
            *every* pattern of at most ``k`` flips, at any positions, leaves ``mu(W~_err) > 0``.
            ``None`` when the error-free ``W~`` is itself not monotone (``mu(W~) <= 0``).
        margin_quantized: ``mu(W~)`` of the error-free quantized operator.
        perturbation_bound: ``beta(max_flips)`` (``< margin_quantized``); ``None`` with ``max_flips``.
        next_bound: ``beta(max_flips + 1)`` (``>= margin_quantized``); ``None`` if every bit may flip.
        n_bits: number of stored bits that can flip (protected bits excluded).
        all_bits: ``True`` when even flipping every flippable bit is certified.
    """

    max_flips: int | None
    margin_quantized: float
    perturbation_bound: float | None
    next_bound: float | None
    n_bits: int
    all_bits: bool

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def max_certified_bit_flips(
    W_q: Tensor,
    codes: Tensor,
    scale: Tensor,
    spec: QuantSpec | int,
    *,
    protected_bits: Sequence[int] = (),
) -> BitFlipCertificate:
    """The largest number ``k`` of ARBITRARY bit flips in ``codes`` that provably keeps ``mu(W~_err) > 0``.

    ``W_q`` is the error-free quantized operator (dense ``(n, n)`` or ``(F, c, c)`` blocks) whose exact
    margin ``mu(W~)`` is the budget; ``codes``/``scale`` are the stored form of ``W`` itself (dense) or of
    a convolution kernel entering ``W`` linearly (``spec`` = its ``QuantSpec``, or a bit width for
    symmetric codes). Every pattern of ``<= k`` flips moves ``W~`` by ``||dW||_2 <= beta(k)``
    (:func:`bit_flip_perturbation_bounds`), and Weyl gives ``mu(W~_err) >= mu(W~) - beta(k) > 0``.
    If ``mu(W~) <= 0`` nothing can be certified and ``max_flips`` is ``None``.
    """
    spec = _as_spec(spec)
    mu_q = float(monotonicity_margin(W_q))
    n_bits = codes.numel() * len(exposed_positions(spec.bits, protected_bits))
    if not mu_q > 0.0:
        return BitFlipCertificate(None, mu_q, None, None, n_bits, False)
    bound = _FlipBound(codes, scale, spec, protected_bits)

    def beta(k: int) -> float:
        return float(bound(torch.tensor([k]))[0])

    # beta is nondecreasing with beta(0) = 0 < mu_q: bisect for the last k with beta(k) < mu_q
    lo, hi = 0, n_bits
    if beta(hi) < mu_q:
        return BitFlipCertificate(n_bits, mu_q, beta(n_bits), None, n_bits, True)
    while hi - lo > 1:  # invariant: beta(lo) < mu_q <= beta(hi)
        mid = (lo + hi) // 2
        if beta(mid) < mu_q:
            lo = mid
        else:
            hi = mid
    return BitFlipCertificate(lo, mu_q, beta(lo), beta(hi), n_bits, False)


MONDEQ_LAYER = "mon.core"
"""Module name of the monotone core (which stores ``W``, ``U``, ``b``) in a
:class:`qmargin.deq.MonDEQClassifier`: the ``layer`` under which :func:`qmargin.faults.inject` seeds
the patterns of its tensors, and the default ``layer`` of :func:`certify_under_bit_errors`."""


def bit_error_pattern(
    codes: Tensor,
    bits: int,
    ber: float,
    seed: int,
    *,
    layer: str,
    tensor: str,
    p01: float | None = None,
    p10: float | None = None,
    protected_bits: Sequence[int] = (),
) -> Tensor:
    """The codes of tensor ``tensor`` of layer ``layer`` after the random flips ``inject`` draws for ``seed``.

    ``qmargin.faults.flip_random_bits(codes, bits, ber, seed=derive_seed(seed, layer, tensor), ...)``:
    the same stream, sampler and rates as :func:`qmargin.faults.inject` uses for that stored tensor
    under ``BitErrorModel(ber=ber, p01=p01, p10=p10, protected_bits=...)`` and the same ``seed`` (flips
    only; stuck-at faults are not modelled here). A copy; ``codes`` is unchanged.
    """
    return flip_random_bits(
        codes,
        bits,
        float(ber),
        seed=derive_seed(seed, layer, tensor),
        p01=p01,
        p10=p10,
        protected_bits=tuple(protected_bits),
    )


@dataclass(frozen=True)
class BitErrorCertificate:
    """Outcome of random bit-error patterns on the stored codes of ``W`` (design.md §2 error model).

    Attributes:
        ber: bit error rate p.
        n_patterns: number of sampled patterns (seeds ``seed, seed + 1, ...`` as in campaigns).
        margin_quantized: ``mu(W~)`` of the error-free quantized operator.
        certified_share: share of patterns with ``||W~_err - W~||_2 < mu(W~)`` (a-priori certificate).
        monotone_share: share with exact ``mu(W~_err) > 0`` (>= ``certified_share``).
        delta_norms: ``||W~_err - W~||_2`` per pattern.
        margins: exact ``mu(W~_err)`` per pattern.
        flips: number of flipped bits per pattern.
    """

    ber: float
    n_patterns: int
    margin_quantized: float
    certified_share: float
    monotone_share: float
    delta_norms: list[float]
    margins: list[float]
    flips: list[int]

    def to_dict(self) -> dict[str, float | int | list[float] | list[int]]:
        return asdict(self)


def certify_under_bit_errors(
    W_q: Tensor,
    codes: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    spec: QuantSpec,
    ber: float,
    n_patterns: int,
    seed: int,
    *,
    assemble: Callable[[Tensor], Tensor] | None = None,
    p01: float | None = None,
    p10: float | None = None,
    protected_bits: Sequence[int] = (),
    layer: str = MONDEQ_LAYER,
    tensor_name: str = "W",
) -> BitErrorCertificate:
    """Share of random bit-error patterns at BER ``ber`` for which the corrupted operator stays certified.

    Pattern ``i`` (``i = 0 .. n_patterns - 1``) corrupts ``codes`` exactly as
    ``qmargin.faults.inject(model, BitErrorModel(ber=ber, ...), seed + i)`` corrupts the stored tensor
    ``tensor_name`` of the module ``layer`` (:func:`bit_error_pattern`: the stream
    ``derive_seed(seed + i, layer, tensor_name)``, every bit independently, exact sparse sampling).
    Campaigns evaluate pattern ``i`` with seed ``base + i``, so for the same ``seed`` (and the same
    clean codes) the certified share and a campaign's accuracy refer to the same corrupted codes, and
    two models see the same patterns (paired comparisons). ``layer`` defaults to
    :data:`MONDEQ_LAYER`, the name of the core of a :class:`qmargin.deq.MonDEQClassifier`. The
    corrupted operator is ``W~_err = assemble(dequantize(codes_err))``; with ``assemble=None`` the
    codes are those of the dense ``W`` itself and ``W~_err = W_q + dequantize(codes_err) -
    dequantize(codes)``. A pattern is *certified* when ``||W~_err - W~||_2 < mu(W~)`` (no solver,
    Weyl) and *monotone* when the exact ``mu(W~_err) > 0``; certified implies monotone.
    """
    if not 0.0 <= float(ber) <= 1.0:
        raise ConfigError(f"ber must be in [0, 1], got {ber}")
    if isinstance(n_patterns, bool) or not isinstance(n_patterns, int) or n_patterns < 1:
        raise ConfigError(f"n_patterns must be an integer >= 1, got {n_patterns!r}")
    check_seed(seed, "seed")  # pattern i uses seed + i: all of them, before any work
    check_seed(seed + n_patterns - 1, f"seed + n_patterns - 1 (seed {seed}, {n_patterns} patterns)")
    Wq = as_operator(W_q, "W_q")
    if assemble is None and tuple(codes.shape) != tuple(Wq.shape):
        raise ValueError(
            f"without assemble= the codes must be those of the dense W_q {tuple(Wq.shape)}, "
            f"got {tuple(codes.shape)}"
        )
    mu_q = float(monotonicity_margin(Wq))
    w_hat = dequantize(codes, scale.to(torch.float64), zero_point, spec)
    deltas: list[float] = []
    margins: list[float] = []
    flips: list[int] = []
    for i in range(n_patterns):
        corrupted = bit_error_pattern(
            codes,
            spec.bits,
            ber,
            seed + i,
            layer=layer,
            tensor=tensor_name,
            p01=p01,
            p10=p10,
            protected_bits=protected_bits,
        )
        flips.append(bit_differences(codes, corrupted, spec.bits))
        w_err = dequantize(corrupted, scale.to(torch.float64), zero_point, spec)
        W_err = Wq + (w_err - w_hat) if assemble is None else as_operator(assemble(w_err), "assemble(W)")
        if W_err.is_complex() != Wq.is_complex():
            W_err, Wq = W_err.to(torch.complex128), Wq.to(torch.complex128)
        check_same_form(Wq, W_err)
        deltas.append(float(spectral_norm(W_err - Wq)))
        margins.append(float(monotonicity_margin(W_err)))
    certified = [d < mu_q for d in deltas]
    monotone = [m > 0.0 for m in margins]
    return BitErrorCertificate(
        ber=float(ber),
        n_patterns=n_patterns,
        margin_quantized=mu_q,
        certified_share=sum(certified) / n_patterns,
        monotone_share=sum(monotone) / n_patterns,
        delta_norms=deltas,
        margins=margins,
        flips=flips,
    )
