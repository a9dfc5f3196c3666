"""Bit errors in the stored codes of a MonDEQ's W (beyond the paper): worst-case bounds over all
patterns of k flips, the largest certified k, and random bit-error campaigns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qmargin.deq import (
    bit_flip_perturbation_bounds,
    code_bit_deltas,
    conv_frequency_blocks,
    max_certified_bit_flips,
    monotonicity_margin,
    spectral_norm,
)
from qmargin.quant import QuantSpec, dequantize, quantize

DT = torch.float64
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# an independent decoder of b-bit words (design.md §2) for brute force
# ------------------------------------------------------------------------------------------------
def to_word(code: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    c = code.to(torch.int64)
    if spec.symmetric and spec.bits == 1:
        return (c > 0).to(torch.int64)
    return c % (2**spec.bits)


def from_word(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    b = spec.bits
    if spec.symmetric and b == 1:
        return 2 * w - 1
    if spec.symmetric:
        return torch.where(w >= 2 ** (b - 1), w - 2**b, w)
    return w


def all_patterns(numel: int, bits: int) -> torch.Tensor:
    """Every flip pattern over ``numel`` words as word XOR masks: ``(2^(numel*bits), numel)``."""
    total = numel * bits
    ids = torch.arange(2**total, dtype=torch.int64)
    bit_set = (ids.unsqueeze(1) >> torch.arange(total)) & 1  # (P, total)
    per_word = bit_set.reshape(-1, numel, bits)
    return (per_word << torch.arange(bits)).sum(-1), bit_set.sum(1)


def brute_force_max(codes, scale, spec, op=None, exposed_bits: int | None = None) -> torch.Tensor:
    """max ||op(dW)||_2 over all patterns of <= k flips, for k = 0..numel*bits (dense when op is None).

    ``exposed_bits``: only the low bits of each word may flip (the others are protected)."""
    masks, counts = all_patterns(codes.numel(), spec.bits if exposed_bits is None else exposed_bits)
    w0 = to_word(codes.reshape(-1), spec)
    new = from_word(w0 ^ masks, spec)  # (P, numel)
    dcode = (new - codes.reshape(-1).to(torch.int64)).to(DT).reshape(-1, *codes.shape)
    s = scale.to(DT).reshape(-1, *([1] * (codes.dim() - 1))) if scale.numel() > 1 else scale.to(DT)
    norms = torch.linalg.matrix_norm(dcode * s, ord=2) if op is None else op(dcode * s)
    out = torch.zeros(int(counts.max()) + 1, dtype=DT)
    for k in range(out.numel()):
        out[k] = norms[counts <= k].max()
    return out


# ------------------------------------------------------------------------------------------------
# conventions
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [QuantSpec(bits=b, symmetric=s) for b in (2, 3, 5, 8) for s in (True, False)] + [QuantSpec(bits=1)],
)
def test_bit_deltas_match_the_word_encoding(spec: QuantSpec) -> None:
    if spec.symmetric and spec.bits == 1:
        codes = torch.tensor([-1, 1], dtype=torch.int8)
    elif spec.symmetric:
        codes = torch.arange(-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1), dtype=torch.int8)
    else:
        codes = torch.arange(0, 2**spec.bits, dtype=torch.uint8)
    deltas = code_bit_deltas(codes, spec)
    for j in range(spec.bits):
        flipped = from_word(to_word(codes, spec) ^ (1 << j), spec)
        assert torch.equal(flipped.to(DT) - codes.to(DT), deltas[:, j])
    # the most a whole word can change is 2^b - 1 code steps
    assert float(deltas.abs().sum(-1).max()) <= 2**spec.bits - 1 + (1 if spec.bits == 1 else 0)


def test_bit_deltas_agree_with_the_fault_engine() -> None:
    fx = pytest.importorskip("qmargin.quant.codes")
    for bits in (1, 2, 4, 8):
        spec = QuantSpec(bits=bits)
        lo = -1 if bits == 1 else -(2 ** (bits - 1))
        codes = torch.tensor([c for c in range(lo, 2 ** (bits - 1)) if bits > 1 or c != 0], dtype=torch.int8)
        deltas = code_bit_deltas(codes, spec)
        for j in range(bits):
            new = fx.from_words(fx.to_words(codes, bits) ^ (1 << j), bits, signed=True)
            assert torch.equal(new.to(DT) - codes.to(DT), deltas[:, j])


def test_protected_bits_do_not_count() -> None:
    codes = torch.tensor([[3, -2], [1, 0]], dtype=torch.int8)
    d = code_bit_deltas(codes, QuantSpec(bits=3), protected_bits=(-1,))
    assert bool((d[..., 2] == 0).all()) and bool((d[..., :2] != 0).all())
    with pytest.raises(ValueError):
        code_bit_deltas(codes, QuantSpec(bits=3), protected_bits=(3,))
    with pytest.raises(ValueError):
        code_bit_deltas(torch.tensor([5], dtype=torch.int8), QuantSpec(bits=3))


# ------------------------------------------------------------------------------------------------
# the worst-case bound beta(k) against brute force over every pattern
# ------------------------------------------------------------------------------------------------
@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    bits=st.integers(1, 3),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    shape=st.sampled_from([(2, 2), (1, 3), (3, 1), (1, 4)]),
    protect_msb=st.booleans(),
)
def test_dense_bound_dominates_every_pattern(seed, bits, symmetric, per_channel, shape, protect_msb) -> None:
    if bits == 1:
        symmetric = True
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_channel=per_channel)
    if shape[0] * shape[1] * bits > 12:
        shape = (1, 12 // bits)
    g = torch.Generator().manual_seed(seed)
    row_scales = torch.tensor([1.0, 5.0, 0.2, 2.0][: shape[0]], dtype=DT)[:, None]
    w = torch.randn(shape, generator=g, dtype=DT) * row_scales
    codes, scale, _ = quantize(w, spec)
    protected = (-1,) if protect_msb and bits > 1 else ()
    n_exposed = codes.numel() * (bits - len(protected))
    beta = bit_flip_perturbation_bounds(codes, scale, spec, codes.numel() * bits, protected_bits=protected)
    worst = brute_force_max(codes, scale, spec, exposed_bits=bits - len(protected))
    assert worst.numel() == n_exposed + 1
    assert bool((beta[1:] >= beta[:-1]).all())  # nondecreasing
    assert float(beta[0]) == 0.0
    k = min(worst.numel(), beta.numel())
    assert bool((worst[:k] <= beta[:k] * (1 + 1e-12) + 1e-15).all())
    if n_exposed >= 1:  # one flip, one entry: the bound is exact
        assert float(beta[1]) == pytest.approx(float(worst[1]), rel=1e-12)
    if shape[0] == 1:
        # one row: ||dW||_2 = ||dW||_F and every word can take its largest change at once
        assert float(beta[n_exposed]) == pytest.approx(float(worst[n_exposed]), rel=1e-12)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    bits=st.integers(1, 2),
    kshape=st.sampled_from([(1, 1, 1, 2), (1, 1, 2, 2), (2, 1, 1, 2), (1, 2, 2, 1), (1, 1, 1, 3)]),
    grid=st.sampled_from([(1, 2), (2, 2), (3, 3), (2, 5)]),
)
def test_conv_bound_dominates_every_pattern(seed, bits, kshape, grid) -> None:
    spec = QuantSpec(bits=bits, per_channel=True)
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(kshape, generator=g, dtype=DT)
    codes, scale, _ = quantize(K, spec)
    beta = bit_flip_perturbation_bounds(codes, scale, spec, codes.numel() * bits)

    def conv_norms(d: torch.Tensor) -> torch.Tensor:  # (P, c_out, c_in, kh, kw) -> (P,)
        P, c_out = d.shape[:2]
        blocks = conv_frequency_blocks(d.reshape(P * c_out, *d.shape[2:]), grid)
        blocks = blocks.reshape(-1, P, c_out, d.shape[2]).transpose(0, 1)  # (P, F, c_out, c_in)
        return torch.linalg.matrix_norm(blocks, ord=2).amax(dim=1)

    # the batched helper agrees with the library's spectral norm
    one = torch.randn(1, *kshape, generator=g, dtype=DT)
    direct = float(spectral_norm(conv_frequency_blocks(one[0], grid)))
    assert float(conv_norms(one)[0]) == pytest.approx(direct)
    worst = brute_force_max(codes, scale, spec, conv_norms)
    assert bool((worst <= beta * (1 + 1e-12) + 1e-15).all())


def test_bound_handles_large_k_and_saturates() -> None:
    codes, scale, _ = quantize(torch.randn(3, 3, dtype=DT), QuantSpec(bits=4))
    beta = bit_flip_perturbation_bounds(codes, scale, QuantSpec(bits=4), 100)
    assert beta.shape == (101,)
    assert bool((beta[36:] == beta[36]).all())  # only 36 bits exist
    # with every bit free, each word takes its largest change: max(sum of + deltas, sum of |- deltas|)
    d = code_bit_deltas(codes, 4)
    per_word = torch.maximum(d.clamp(min=0).sum(-1), (-d).clamp(min=0).sum(-1)) * scale
    assert float(beta[36]) == pytest.approx(float(torch.linalg.vector_norm(per_word)), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# the largest certified number of flips
# ------------------------------------------------------------------------------------------------
def mondeq_w(seed: int, n: int, m: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n // 2, n, generator=g, dtype=DT) / math.sqrt(n)
    B = torch.randn(n, n, generator=g, dtype=DT) / math.sqrt(n)
    return (1 - m) * torch.eye(n, dtype=DT) - A.T @ A + B - B.T


def apply_flips(codes: torch.Tensor, spec: QuantSpec, flat_bits: torch.Tensor) -> torch.Tensor:
    """Flip the listed bits (index = word * bits + bit) of ``codes``."""
    words = to_word(codes.reshape(-1), spec).clone()
    for i in flat_bits.tolist():
        words[i // spec.bits] ^= 1 << (i % spec.bits)
    return from_word(words, spec).reshape(codes.shape).to(codes.dtype)


def exposed_bit_ids(codes: torch.Tensor, bits: int, protected: tuple[int, ...]) -> torch.Tensor:
    keep = [j for j in range(bits) if j not in {p % bits for p in protected}]
    words = torch.arange(codes.numel()).unsqueeze(1) * bits
    return (words + torch.tensor(keep)).reshape(-1)


def worst_ish_patterns(W_q, codes, scale, spec, k, g, protected=()):
    """Patterns of k flips aimed at the margin: random ones, the largest per-bit changes in one row,
    and flips chosen to lower lambda_min along its eigenvector (sym(dW) pushed along v v^T)."""
    ids = exposed_bit_ids(codes, spec.bits, protected)
    change = code_bit_deltas(codes, spec, protected) * (
        scale.reshape(-1, 1, 1) if scale.numel() > 1 else scale
    )  # (n, n, bits), 0 on protected bits
    pats = [ids[torch.randperm(ids.numel(), generator=g)[:k]] for _ in range(4)]
    exposed = torch.zeros(codes.numel() * spec.bits, dtype=torch.bool)
    exposed[ids] = True
    exposed = exposed.reshape(change.shape)
    # greedy single row: the row with the largest possible changes
    row = int(change.abs().sum((1, 2)).argmax())
    size = change[row].abs().masked_fill(~exposed[row], -math.inf).reshape(-1)
    order = torch.argsort(size, descending=True)[: min(k, int(exposed[row].sum()))]
    pats.append(row * codes.shape[1] * spec.bits + order)
    # along the bottom eigenvector of sym(I - W~): raising v^T sym(W) v lowers the margin
    S = torch.eye(W_q.shape[0], dtype=DT) - W_q
    v = torch.linalg.eigh((S + S.T) / 2).eigenvectors[:, 0]
    gain = (change * (v[:, None] * v[None, :])[..., None]).masked_fill(~exposed, -math.inf).reshape(-1)
    pats.append(torch.argsort(gain, descending=True)[: min(k, ids.numel())])
    for p in pats:  # no pattern touches a protected bit
        assert bool(torch.isin(p, ids).all())
    return pats


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(3, 8),
    m=st.floats(0.2, 1.0),
    bits=st.integers(3, 8),
    per_channel=st.booleans(),
    symmetric=st.booleans(),
    n_protected=st.integers(1, 4),  # unprotected sign bits: see test_conv/..._not_monotone tests
)
def test_max_certified_flips_keep_the_margin_positive(
    seed, n, m, bits, per_channel, symmetric, n_protected
) -> None:
    spec = QuantSpec(bits=bits, per_channel=per_channel, symmetric=symmetric)
    protected = tuple(-1 - j for j in range(min(n_protected, bits - 1)))  # the top bits (ECC)
    W = mondeq_w(seed, n, m)
    codes, scale, zp = quantize(W, spec)
    W_q = dequantize(codes, scale, zp, spec)
    cert = max_certified_bit_flips(W_q, codes, scale, spec, protected_bits=protected)
    event(f"max_flips {'0' if not cert.max_flips else '>0'}")
    json.dumps(cert.to_dict(), allow_nan=False)
    mu_q = float(monotonicity_margin(W_q))
    assert cert.margin_quantized == pytest.approx(mu_q)
    if mu_q <= 0:
        assert cert.max_flips is None
        return
    k = cert.max_flips
    assert 0 <= k <= cert.n_bits
    assert cert.perturbation_bound < mu_q
    if not cert.all_bits:
        assert cert.next_bound >= mu_q
    assert cert.n_bits == codes.numel() * (bits - len(protected))
    if k == 0:
        return
    g = torch.Generator().manual_seed(seed)
    for pat in worst_ish_patterns(W_q, codes, scale, spec, k, g, protected):
        corrupted = apply_flips(codes, spec, pat)
        W_err = dequantize(corrupted, scale, zp, spec)
        assert float(spectral_norm(W_err - W_q)) <= cert.perturbation_bound * (1 + 1e-12)
        assert float(monotonicity_margin(W_err)) > 0


def test_max_certified_flips_conv_kernel_against_blocks() -> None:
    """A convolutional W stored as its kernel: every worst-ish pattern of k flips keeps the exact
    per-frequency margin positive."""
    g = torch.Generator().manual_seed(0)
    C, grid = 4, (6, 6)
    K = torch.randn(C, C, 3, 3, generator=g, dtype=DT) * 0.05
    K[:, :, 1, 1] += 0.3 * torch.eye(C, dtype=DT)
    spec = QuantSpec(bits=8, per_channel=True)
    codes, scale, zp = quantize(K, spec)
    K_q = dequantize(codes, scale, zp, spec)
    blocks_q = conv_frequency_blocks(K_q, grid)
    # a single sign-bit flip of a large centre tap costs more than the whole margin
    assert max_certified_bit_flips(blocks_q, codes, scale, spec).max_flips == 0
    protected = (-1, -2)  # sign bit and the next one protected (e.g. by ECC)
    cert = max_certified_bit_flips(blocks_q, codes, scale, spec, protected_bits=protected)
    assert cert.max_flips is not None and cert.max_flips >= 1
    ids = exposed_bit_ids(codes, 8, protected)
    for _ in range(10):
        pat = ids[torch.randperm(ids.numel(), generator=g)[: cert.max_flips]]
        K_err = dequantize(apply_flips(codes, spec, pat), scale, zp, spec)
        blocks = conv_frequency_blocks(K_err, grid)
        assert float(spectral_norm(blocks - conv_frequency_blocks(K_q, grid))) <= cert.perturbation_bound
        assert float(monotonicity_margin(blocks)) > 0
    # the top exposed bits concentrated in one (o, c) pair of taps (the centre tap first)
    top = torch.tensor([4, 0, 1, 2, 3, 5, 6, 7, 8]).repeat_interleave(2) * 8 + torch.tensor([5, 4]).repeat(9)
    pat = top[: cert.max_flips]
    K_err = dequantize(apply_flips(codes, spec, pat), scale, zp, spec)
    assert float(monotonicity_margin(conv_frequency_blocks(K_err, grid))) > 0


def test_not_monotone_quantized_model_certifies_nothing() -> None:
    W = 1.2 * torch.eye(3, dtype=DT)
    codes, scale, zp = quantize(W, QuantSpec(bits=4))
    cert = max_certified_bit_flips(dequantize(codes, scale, zp, QuantSpec(bits=4)), codes, scale, 4)
    assert cert.max_flips is None and cert.perturbation_bound is None


def test_per_channel_scales_matter() -> None:
    """With one tiny-scale row the bound per bit of that row is tiny; per-tensor it is not."""
    W = torch.diag(torch.tensor([0.5, 0.5, 0.5], dtype=DT))
    W[2] *= 1e-3
    spec_c, spec_t = QuantSpec(bits=8, per_channel=True), QuantSpec(bits=8)
    codes_c, scale_c, _ = quantize(W, spec_c)
    codes_t, scale_t, _ = quantize(W, spec_t)
    beta_c = bit_flip_perturbation_bounds(codes_c, scale_c, spec_c, 3 * 3 * 8)
    beta_t = bit_flip_perturbation_bounds(codes_t, scale_t, spec_t, 3 * 3 * 8)
    # all flips certified in the tiny row only cost 1e-3 of a big row: the totals differ
    assert float(beta_c[-1]) < float(beta_t[-1])
    with pytest.raises(ValueError):
        bit_flip_perturbation_bounds(codes_c, torch.ones(2, dtype=DT), spec_c, 3)


# ------------------------------------------------------------------------------------------------
# random bit errors at a BER
# ------------------------------------------------------------------------------------------------
def test_bit_error_campaign_shares() -> None:
    pytest.importorskip("qmargin.faults.functional")
    from qmargin.deq import certify_under_bit_errors

    spec = QuantSpec(bits=6, per_channel=True)
    W = mondeq_w(2, 10, 0.3)
    codes, scale, zp = quantize(W, spec)
    W_q = dequantize(codes, scale, zp, spec)
    clean = certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.0, 5, seed=0)
    assert clean.certified_share == 1.0 and clean.monotone_share == 1.0
    assert clean.flips == [0] * 5 and clean.delta_norms == [0.0] * 5
    mu_q = float(monotonicity_margin(W_q))
    for ber in (1e-3, 1e-2, 0.1, 0.5):
        res = certify_under_bit_errors(W_q, codes, scale, zp, spec, ber, 12, seed=3)
        assert 0.0 <= res.certified_share <= res.monotone_share <= 1.0
        assert len(res.margins) == len(res.delta_norms) == len(res.flips) == 12
        # the shares are what the per-pattern numbers say
        assert res.certified_share == sum(d < mu_q for d in res.delta_norms) / 12
        assert res.monotone_share == sum(m > 0 for m in res.margins) / 12
        # Weyl per pattern
        for d, m in zip(res.delta_norms, res.margins, strict=True):
            assert m >= mu_q - d - 1e-12
        json.dumps(res.to_dict(), allow_nan=False)
    heavy = certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.5, 12, seed=3)
    assert heavy.certified_share < 1.0  # at BER 0.5 the codes are noise
    # same seed, same patterns (paired comparisons); another seed, other patterns
    again = certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.01, 6, seed=3)
    assert again == certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.01, 6, seed=3)
    assert again.flips != certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.01, 6, seed=4).flips


def test_bit_error_campaign_matches_a_manual_pattern() -> None:
    faults = pytest.importorskip("qmargin.faults.functional")
    from qmargin.deq import certify_under_bit_errors

    spec = QuantSpec(bits=4)
    W = mondeq_w(5, 6, 0.4)
    codes, scale, zp = quantize(W, spec)
    W_q = dequantize(codes, scale, zp, spec)
    res = certify_under_bit_errors(W_q, codes, scale, zp, spec, 0.05, 3, seed=10)
    for i in range(3):
        corrupted = faults.flip_random_bits(codes, 4, 0.05, seed=faults.derive_seed(10 + i, "mon.core", "W"))
        W_err = dequantize(corrupted, scale, zp, spec)
        assert res.margins[i] == pytest.approx(float(monotonicity_margin(W_err)), abs=1e-12)
        assert res.delta_norms[i] == pytest.approx(float(spectral_norm(W_err - W_q)), abs=1e-12)


def test_bit_error_campaign_with_an_assembled_conv_operator() -> None:
    pytest.importorskip("qmargin.faults.functional")
    from qmargin.deq import certify_under_bit_errors

    g = torch.Generator().manual_seed(1)
    C, grid = 3, (5, 5)
    K = torch.randn(C, C, 3, 3, generator=g, dtype=DT) * 0.05
    K[:, :, 1, 1] += 0.3 * torch.eye(C, dtype=DT)
    spec = QuantSpec(bits=8)
    codes, scale, zp = quantize(K, spec)
    K_q = dequantize(codes, scale, zp, spec)

    def assemble(k: torch.Tensor) -> torch.Tensor:
        return conv_frequency_blocks(k, grid)

    res = certify_under_bit_errors(assemble(K_q), codes, scale, zp, spec, 0.0, 2, seed=0, assemble=assemble)
    assert res.certified_share == 1.0
    res = certify_under_bit_errors(
        assemble(K_q), codes, scale, zp, spec, 0.01, 8, seed=0, assemble=assemble, protected_bits=(-1,)
    )
    assert 0.0 <= res.certified_share <= res.monotone_share <= 1.0
    with pytest.raises(ValueError):
        certify_under_bit_errors(assemble(K_q), codes, scale, zp, spec, 0.01, 2, seed=0)


def test_every_bit_pattern_small_enough_is_certified() -> None:
    """Tie the two together: patterns with at most max_flips flips are always certified."""
    pytest.importorskip("qmargin.faults.functional")
    from qmargin.deq import certify_under_bit_errors

    spec = QuantSpec(bits=8, per_channel=True)
    W = mondeq_w(7, 8, 0.6)
    codes, scale, zp = quantize(W, spec)
    W_q = dequantize(codes, scale, zp, spec)
    protected = (-1, -2)
    k = max_certified_bit_flips(W_q, codes, scale, spec, protected_bits=protected).max_flips
    assert k is not None and k >= 2
    res = certify_under_bit_errors(W_q, codes, scale, zp, spec, 1e-2, 40, seed=0, protected_bits=protected)
    assert any(0 < f <= k for f in res.flips)  # the check below is not vacuous
    assert any(f > k for f in res.flips)
    for flips, d in zip(res.flips, res.delta_norms, strict=True):
        if flips <= k:
            assert d < res.margin_quantized
