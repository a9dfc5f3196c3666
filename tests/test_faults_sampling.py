"""Exact sparse bit-error sampling (design.md §2): law, conventions, edge cases, reproducibility.

Every statistical test uses fixed seeds (so it is deterministic) and compares with the exact law of
independent Bernoulli bits through a proper test statistic; the thresholds are p-values > 1e-3.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from qmargin.faults import (
    BitSites,
    bit_differences,
    derive_seed,
    exposed_positions,
    flip_bits_,
    flip_random_bits,
    from_words,
    make_generator,
    popcount,
    sample_bit_sites,
    sample_flips,
    sample_stuck_bits,
    stuck_at,
    to_words,
)

ALPHA = 1e-3


def _word_masks(sites: BitSites) -> np.ndarray:
    """Dense per-word selection masks (only for small test tensors)."""
    out = np.zeros(sites.numel, dtype=np.int64)
    out[sites.index.numpy()] = sites.mask.numpy()
    return out


def _chisquare(observed: np.ndarray, expected: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness-of-fit p-value, pooling cells with small expectation into one."""
    observed = np.asarray(observed, dtype=float)
    expected = np.asarray(expected, dtype=float)
    small = expected < min_expected
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    expected = expected * observed.sum() / expected.sum()
    return float(stats.chisquare(observed, expected).pvalue)


def _mask_law(b_u: int, p: float) -> np.ndarray:
    """P(mask = m) over the 2**b_u patterns of b_u independent Bernoulli(p) bits."""
    k = np.array([bin(m).count("1") for m in range(1 << b_u)])
    return p**k * (1 - p) ** (b_u - k)


# ---------------------------------------------------------------------------------------------
# the law of the sampler
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("numel", "bits", "p", "protected"), [(500, 8, 0.02, ()), (300, 4, 0.05, (0, -1))])
def test_flip_count_is_binomial(numel, bits, p, protected):
    n = numel * (bits - len(protected))
    counts = np.array(
        [sample_bit_sites(numel, bits, p, seed=s, protected_bits=protected).n_bits for s in range(400)]
    )
    r = counts.size
    # mean: z-test against n p; variance: s^2 / (n p (1-p)) ~ chi2(R-1)
    z = (counts.mean() - n * p) / math.sqrt(n * p * (1 - p) / r)
    assert 2 * stats.norm.sf(abs(z)) > ALPHA
    t = (r - 1) * counts.var(ddof=1) / (n * p * (1 - p))
    assert 2 * min(stats.chi2.cdf(t, r - 1), stats.chi2.sf(t, r - 1)) > ALPHA
    # the whole distribution: chi-square against Binomial(n, p) on integer bins
    support = np.arange(counts.max() + 2)
    observed = np.bincount(counts, minlength=support.size)[: support.size].astype(float)
    expected = stats.binom.pmf(support, n, p) * r
    expected[-1] += stats.binom.sf(support[-1], n, p) * r
    assert _chisquare(observed, expected) > ALPHA


def test_tiny_rate_count_matches_binomial():
    numel, p, r = 1_000_000, 1e-7, 300  # 8e6 bits, 0.8 expected flips per pattern
    counts = np.array([sample_bit_sites(numel, 8, p, seed=1000 + s).n_bits for s in range(r)])
    n = numel * 8
    support = np.arange(5)
    observed = np.array([(counts == k).sum() for k in support[:-1]] + [(counts >= 4).sum()], dtype=float)
    expected = np.append(stats.binom.pmf(support[:-1], n, p), stats.binom.sf(3, n, p)) * r
    assert _chisquare(observed, expected, min_expected=1.0) > ALPHA


@pytest.mark.parametrize(("bits", "p", "protected"), [(4, 0.3, ()), (5, 0.2, (2,)), (3, 0.9, ())])
def test_word_masks_follow_product_bernoulli_law(bits, p, protected):
    """Whole-word law, including words with several flipped bits; large enough to cross chunks."""
    numel = 60_000
    sites = sample_bit_sites(numel, bits, p, seed=7, protected_bits=protected)
    exposed = exposed_positions(bits, protected)
    masks = _word_masks(sites)
    assert not np.any(masks & sum(1 << j for j in range(bits) if j not in exposed))
    # compress each mask onto the exposed positions: subset index over b_u bits
    subset = np.zeros_like(masks)
    for i, j in enumerate(exposed):
        subset |= ((masks >> j) & 1) << i
    observed = np.bincount(subset, minlength=1 << len(exposed))
    assert _chisquare(observed, _mask_law(len(exposed), p) * numel) > ALPHA


def test_law_and_structure_do_not_depend_on_chunking(monkeypatch):
    """Tiny chunks put many chunk boundaries inside words: bits of one word must still merge."""
    from qmargin.faults import functional

    numel, bits, p = 6000, 3, 0.3
    codes = torch.randint(-4, 4, (numel,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    default = (
        sample_bit_sites(numel, bits, p, seed=3),
        sample_flips(codes, bits, p01=0.2, p10=0.05, seed=3),
        sample_stuck_bits(numel, bits, rate_0=0.1, rate_1=0.2, seed=3),
    )
    monkeypatch.setattr(functional, "_CHUNK", 5)
    sites = sample_bit_sites(numel, bits, p, seed=3)
    thinned = sample_flips(codes, bits, p01=0.2, p10=0.05, seed=3)
    stuck = sample_stuck_bits(numel, bits, rate_0=0.1, rate_1=0.2, seed=3)
    # the same patterns as with the default chunk size: chunking is not part of the law
    assert torch.equal(sites.index, default[0].index) and torch.equal(sites.mask, default[0].mask)
    assert torch.equal(thinned.index, default[1].index) and torch.equal(thinned.mask, default[1].mask)
    assert torch.equal(stuck.index, default[2].index) and torch.equal(stuck.to_one, default[2].to_one)
    assert torch.all(sites.index[1:] > sites.index[:-1]) and torch.all(sites.mask != 0)
    assert sites.n_bits == int(popcount(torch.from_numpy(_word_masks(sites).astype(np.uint8))).sum())
    assert _chisquare(np.bincount(_word_masks(sites), minlength=8), _mask_law(bits, p) * numel) > ALPHA


def test_neighbouring_words_are_independent():
    """Joint law of consecutive 2-bit words (16 cells) equals the product law."""
    numel, p = 40_000, 0.25
    masks = _word_masks(sample_bit_sites(numel, 2, p, seed=11))
    pairs = masks[0::2] * 4 + masks[1::2]
    law = _mask_law(2, p)
    assert _chisquare(np.bincount(pairs, minlength=16), np.outer(law, law).ravel() * (numel // 2)) > ALPHA


def test_flips_are_uniform_over_bit_positions_and_elements():
    bits, numel, p = 8, 2000, 0.01
    per_bit = np.zeros(bits)
    per_elem = np.zeros(numel)
    for s in range(60):
        sites = sample_bit_sites(numel, bits, p, seed=s)
        masks = _word_masks(sites)
        per_bit += [((masks >> j) & 1).sum() for j in range(bits)]
        per_elem += popcount(torch.from_numpy(masks.astype(np.uint8))).numpy()
    assert stats.chisquare(per_bit).pvalue > ALPHA
    # 2000 elements, ~9.6 flips each: chi-square over elements
    assert stats.chisquare(per_elem).pvalue > ALPHA


def test_protected_bits_never_flip_and_others_stay_uniform():
    bits, numel, p = 8, 3000, 0.02
    per_bit = np.zeros(bits)
    for s in range(20):
        masks = _word_masks(sample_bit_sites(numel, bits, p, seed=s, protected_bits=(1, -1)))
        per_bit += [((masks >> j) & 1).sum() for j in range(bits)]
    assert per_bit[1] == 0 and per_bit[7] == 0
    assert stats.chisquare(np.delete(per_bit, [1, 7])).pvalue > ALPHA


# ---------------------------------------------------------------------------------------------
# p01 / p10 and stuck-at
# ---------------------------------------------------------------------------------------------
def test_p10_only_on_zero_codes_changes_nothing_and_p01_only_sets_bits():
    zeros = torch.zeros(5000, dtype=torch.uint8)
    assert torch.equal(flip_random_bits(zeros, 8, 0.0, p10=0.3, seed=1), zeros)
    out = flip_random_bits(zeros, 8, 0.0, p01=0.01, seed=1)
    assert bit_differences(zeros, out, 8) == int(popcount(out).sum())  # every change is 0 -> 1
    k = bit_differences(zeros, out, 8)
    assert stats.binomtest(k, 5000 * 8, 0.01).pvalue > ALPHA
    ones = torch.full((5000,), -1, dtype=torch.int8)  # two's complement 11111111
    assert torch.equal(flip_random_bits(ones, 8, 0.0, p01=0.3, seed=2), ones)


@pytest.mark.parametrize(("dtype", "bits"), [(torch.int8, 8), (torch.int8, 5), (torch.uint8, 6)])
def test_unequal_rates_act_on_the_stored_bit_values(dtype, bits):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if dtype == torch.int8 else (0, 2**bits)
    p01, p10 = 0.05, 0.01
    shifts = torch.arange(bits)
    zeros = ones = up = down = 0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(lo, hi, (10_000,), generator=g).to(dtype)
        out = flip_random_bits(codes, bits, 0.5, p01=p01, p10=p10, seed=seed)  # ber is overridden
        b0 = (to_words(codes, bits).long().unsqueeze(1) >> shifts) & 1
        b1 = (to_words(out, bits).long().unsqueeze(1) >> shifts) & 1
        zeros, ones = zeros + int((b0 == 0).sum()), ones + int((b0 == 1).sum())
        up += int(((b0 == 0) & (b1 == 1)).sum())
        down += int(((b0 == 1) & (b1 == 0)).sum())
    assert stats.binomtest(up, zeros, p01).pvalue > ALPHA
    assert stats.binomtest(down, ones, p10).pvalue > ALPHA


def test_stuck_at_forces_bits_with_the_right_rates():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-7, 8, (4000,), generator=g).to(torch.int8)
    assert torch.equal(to_words(stuck_at(codes, 4, 1.0, 1, seed=0), 4), torch.full_like(codes, 15).byte())
    assert torch.equal(stuck_at(codes, 4, 1.0, 0, seed=0), torch.zeros_like(codes))
    # protected bits keep their values even when every other bit is stuck
    kept = stuck_at(codes, 4, 1.0, 1, seed=0, protected_bits=(-1,))
    assert torch.equal(to_words(kept, 4) & 8, to_words(codes, 4) & 8)
    assert torch.equal(to_words(kept, 4) & 7, torch.full_like(codes, 7).byte())
    # mixed rates: stuck bits ~ Binomial(n, s0 + s1), and each is stuck at 1 w.p. s1 / (s0 + s1)
    s0, s1, numel = 0.03, 0.01, 50_000
    stuck = sample_stuck_bits(numel, 8, rate_0=s0, rate_1=s1, seed=5)
    assert not torch.any(stuck.to_zero & stuck.to_one)
    ones = int(popcount(stuck.to_one).sum())
    assert stats.binomtest(stuck.n_bits, numel * 8, s0 + s1).pvalue > ALPHA
    assert stats.binomtest(ones, stuck.n_bits, s1 / (s0 + s1)).pvalue > ALPHA


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------
def test_rate_zero_changes_nothing_and_allocates_nothing():
    codes = torch.randint(-127, 128, (1000,), dtype=torch.int8)
    out = flip_random_bits(codes, 8, 0.0, seed=0)
    assert torch.equal(out, codes) and out.data_ptr() != codes.data_ptr()
    sites = sample_bit_sites(10**12, 8, 0.0, seed=0)
    assert len(sites) == 0 and sites.index.numel() == 0


@pytest.mark.parametrize(
    ("dtype", "bits", "protected"),
    [(torch.int8, 8, ()), (torch.int8, 3, (1,)), (torch.uint8, 5, (0, 4)), (torch.int8, 1, ())],
)
def test_rate_one_flips_every_exposed_bit(dtype, bits, protected):
    if bits == 1:
        codes = torch.tensor([-1, 1, 1, -1], dtype=dtype)
    elif dtype == torch.int8:
        codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=dtype)
    else:
        codes = torch.arange(0, 2**bits, dtype=dtype)
    out = flip_random_bits(codes, bits, 1.0, seed=0, protected_bits=protected)
    exposed_mask = sum(1 << j for j in exposed_positions(bits, protected))
    assert torch.equal(to_words(out, bits), to_words(codes, bits) ^ exposed_mask)
    assert bit_differences(codes, out, bits) == codes.numel() * len(exposed_positions(bits, protected))


def test_huge_tensors_are_sampled_without_dense_allocation():
    # 1.25e8 words = 1e9 bits at p = 1e-7: ~100 flips, positions only
    sites = sample_bit_sites(125_000_000, 8, 1e-7, seed=0)
    mean = 125_000_000 * 8 * 1e-7
    assert min(stats.poisson.cdf(len(sites), mean), stats.poisson.sf(len(sites) - 1, mean)) > ALPHA / 2
    assert torch.all(sites.index[1:] > sites.index[:-1]) and int(sites.index[-1]) < 125_000_000
    # 1e12 words (8e12 bits): anything dense would need terabytes
    big = sample_bit_sites(10**12, 8, 1e-12, seed=1)
    assert len(big) < 100 and (len(big) == 0 or int(big.index.max()) < 10**12)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        sample_bit_sites(2**51, 8, 1e-9, seed=0)


@pytest.mark.parametrize("ber", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_bad_rates_raise(ber):
    codes = torch.zeros(4, dtype=torch.int8)
    with pytest.raises(ValueError):
        flip_random_bits(codes, 8, ber, seed=0)
    with pytest.raises(ValueError):
        flip_random_bits(codes, 8, 0.1, p10=ber, seed=0)


def test_bad_words_dtypes_and_positions_raise():
    with pytest.raises(TypeError, match="int8"):
        flip_random_bits(torch.zeros(3), 8, 0.1, seed=0)
    with pytest.raises(ValueError, match="bits"):
        flip_random_bits(torch.zeros(3, dtype=torch.int8), 9, 0.1, seed=0)
    with pytest.raises(ValueError, match="protected bit 4"):
        flip_random_bits(torch.zeros(3, dtype=torch.int8), 4, 0.1, seed=0, protected_bits=(4,))
    with pytest.raises(ValueError, match="does not fit"):  # 100 is no 4-bit two's complement word
        flip_random_bits(torch.tensor([100], dtype=torch.int8), 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="sign code"):
        flip_random_bits(torch.tensor([0], dtype=torch.int8), 1, 1.0, seed=0)
    with pytest.raises(ValueError, match="stuck-at value"):
        stuck_at(torch.zeros(3, dtype=torch.int8), 8, 0.1, 2, seed=0)


# ---------------------------------------------------------------------------------------------
# word conventions
# ---------------------------------------------------------------------------------------------
def _decode_twos(word: int, bits: int) -> int:
    return word - (1 << bits) if word >= 1 << (bits - 1) else word


@pytest.mark.parametrize("bits", range(2, 9))
def test_twos_complement_words_every_code_and_mask(bits):
    codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int8)
    for m in range(1, 1 << bits):
        out = codes.clone()
        sites = BitSites(
            torch.arange(codes.numel()),
            torch.full((codes.numel(),), m, dtype=torch.uint8),
            codes.numel(),
            bits,
        )
        patch = flip_bits_(out, bits, sites)
        expected = [_decode_twos((c % (1 << bits)) ^ m, bits) for c in codes.tolist()]
        assert out.tolist() == expected
        patch.undo_(out)
        assert torch.equal(out, codes)
    # the MSB flip of 0 decodes to -2**(b-1), one below the quantizer's -qmax
    assert flip_random_bits(
        torch.zeros(1, dtype=torch.int8), bits, 1.0, seed=0, protected_bits=tuple(range(bits - 1))
    ).item() == -(2 ** (bits - 1))


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_unsigned_words(bits):
    codes = torch.arange(0, 2**bits, dtype=torch.uint8)
    m = (1 << bits) - 2
    sites = BitSites(
        torch.arange(codes.numel()), torch.full((codes.numel(),), m, dtype=torch.uint8), codes.numel(), bits
    )
    out = codes.clone()
    flip_bits_(out, bits, sites)
    assert out.tolist() == [c ^ m for c in codes.tolist()]


def test_popcount_and_bit_differences_match_python():
    words = torch.arange(256).to(torch.uint8)
    assert popcount(words).tolist() == [bin(w).count("1") for w in range(256)]
    assert popcount(words.view(torch.int8)).tolist() == [bin(w).count("1") for w in range(256)]
    a, b = torch.tensor([-8, 7, 0], dtype=torch.int8), torch.tensor([7, 7, -1], dtype=torch.int8)
    assert bit_differences(a, b, 4) == 4 + 0 + 4  # 1000 vs 0111, 0000 vs 1111


def test_sign_code_words():
    codes = torch.tensor([-1, 1], dtype=torch.int8)
    assert to_words(codes, 1).tolist() == [0, 1]
    assert from_words(torch.tensor([0, 1]), 1, signed=True).tolist() == [-1, 1]
    assert flip_random_bits(codes, 1, 1.0, seed=0).tolist() == [1, -1]


def test_codes_of_any_layout_are_edited_in_place():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-7, 8, (6, 9), generator=g).to(torch.int8)
    view = base.t()  # not contiguous
    sites = sample_bit_sites(view.numel(), 4, 0.2, seed=1)
    expected = flip_random_bits(view.contiguous(), 4, 0.2, seed=1)
    patch = flip_bits_(view, 4, sites)
    assert torch.equal(view, expected)
    patch.undo_(view)
    assert torch.equal(base.t(), view) and torch.equal(base, base.t().t())


# ---------------------------------------------------------------------------------------------
# reproducibility
# ---------------------------------------------------------------------------------------------
def test_pattern_is_a_function_of_seed_shape_bits_and_rate():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (4096,), generator=g).to(torch.int8)
    b = torch.randint(-127, 128, (4096,), generator=g).to(torch.int8)
    xa = to_words(flip_random_bits(a, 8, 0.01, seed=42), 8) ^ to_words(a, 8)
    xb = to_words(flip_random_bits(b, 8, 0.01, seed=42), 8) ^ to_words(b, 8)
    assert torch.equal(xa, xb) and int(xa.count_nonzero()) > 0  # same pattern on other values
    assert torch.equal(flip_random_bits(a, 8, 0.01, seed=42), flip_random_bits(a, 8, 0.01, seed=42))
    assert not torch.equal(flip_random_bits(a, 8, 0.01, seed=43), flip_random_bits(a, 8, 0.01, seed=42))
    # a shared generator gives successive, different patterns
    gen = make_generator(5)
    s1, s2 = sample_bit_sites(4096, 8, 0.01, seed=gen), sample_bit_sites(4096, 8, 0.01, seed=gen)
    assert not torch.equal(s1.index, s2.index) or not torch.equal(s1.mask, s2.mask)


def test_derive_seed_is_stable_across_processes_and_distinct():
    code = "from qmargin.faults import derive_seed; print(derive_seed(7, 'layer1.conv', 'weight'))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == derive_seed(7, "layer1.conv", "weight")
    # the documented definition: BLAKE2b-64 over length-prefixed fields, mod 2**63
    h = hashlib.blake2b(digest_size=8, person=b"qmargin.faults")
    for field in (b"7", b"layer1.conv", b"weight"):
        h.update(len(field).to_bytes(8, "little") + field)
    assert derive_seed(7, "layer1.conv", "weight") == int.from_bytes(h.digest(), "little") % 2**63
    seeds = {derive_seed(s, n, "weight") for s in range(50) for n in ("a", "b", "c")}
    assert len(seeds) == 150
    assert derive_seed(1, "ab", "c") != derive_seed(1, "a", "bc")


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    signed=st.booleans(),
    p=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**40),
    numel=st.integers(0, 300),
    protected=st.sets(st.integers(0, 7), max_size=3),
)
def test_flip_undo_and_double_flip_restore_exactly(bits, signed, p, seed, numel, protected):
    signed = signed or bits == 1
    protected = tuple(k for k in protected if k < bits)
    g = torch.Generator().manual_seed(seed % 1000)
    if bits == 1:
        codes = torch.randint(0, 2, (numel,), generator=g).to(torch.int8) * 2 - 1
    elif signed:
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (numel,), generator=g).to(torch.int8)
    else:
        codes = torch.randint(0, 2**bits, (numel,), generator=g).to(torch.uint8)
    clean = codes.clone()
    sites = sample_flips(codes, bits, p01=p, p10=p, seed=seed, protected_bits=protected)
    patch = flip_bits_(codes, bits, sites)
    assert bit_differences(clean, codes, bits) == sites.n_bits
    assert torch.equal(from_words(to_words(codes, bits), bits, signed), codes)  # still b-bit words
    flip_bits_(codes, bits, sites)  # XOR twice = identity
    assert torch.equal(codes, clean)
    patch.apply_(codes)
    patch.undo_(codes)
    assert torch.equal(codes, clean)


@settings(max_examples=40, deadline=None)
@given(p01=st.floats(0.0, 1.0), p10=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_unequal_rates_only_select_bits_that_can_flip(p01, p10, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (200,), generator=g).to(torch.uint8)
    sites = sample_flips(codes, 8, p01=p01, p10=p10, seed=seed)
    words = codes[sites.index]
    if p01 == 0.0:
        assert torch.all(sites.mask & ~words == 0)  # only stored ones flip
    if p10 == 0.0:
        assert torch.all(sites.mask & words == 0)  # only stored zeros flip
    assert torch.all(sites.mask != 0) and torch.all(sites.index[1:] > sites.index[:-1])
