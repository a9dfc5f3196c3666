"""Nested bit-error patterns (``nested_max``): exact law at every rate, nested across rates per seed.

Statistical tests use fixed seeds (deterministic) and compare with the exact law of independent
Bernoulli bits; thresholds are p-values > 1e-3, as in tests/test_faults_sampling.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults import BitErrorModel, BitSites, RandomFlips, inject, popcount, sample_flips
from qmargin.quant import QuantSpec, freeze_model, quantize_model, quantized_modules
from qmargin.quant.codes import to_words

ALPHA = 1e-3
GRID = (0.005, 0.02, 0.05, 0.2)


def _dense(sites: BitSites) -> np.ndarray:
    out = np.zeros(sites.numel, dtype=np.int64)
    out[sites.index.numpy()] = sites.mask.numpy()
    return out


def _bits(sites: BitSites, bits: int) -> np.ndarray:
    """Dense ``[numel, bits]`` 0/1 matrix of the selected bits."""
    return (_dense(sites)[:, None] >> np.arange(bits)) & 1


@pytest.mark.parametrize(("p", "protected"), [(0.005, ()), (0.05, (0, -1)), (0.2, ())])
def test_nested_law_at_each_rate(p, protected):
    """Counts are Binomial(N, p) and every exposed bit position is hit uniformly, at each grid rate."""
    numel, bits = 400, 8
    codes = torch.zeros(numel, dtype=torch.int8)
    n = numel * (bits - len(protected))
    counts, per_bit = [], np.zeros(bits)
    for s in range(300):
        sites = sample_flips(
            codes, bits, p01=p, p10=p, seed=s, protected_bits=protected, nested_max=max(GRID)
        )
        counts.append(sites.n_bits)
        per_bit += _bits(sites, bits).sum(axis=0)
    counts_a = np.array(counts)
    r = counts_a.size
    z = (counts_a.mean() - n * p) / math.sqrt(n * p * (1 - p) / r)
    assert 2 * stats.norm.sf(abs(z)) > ALPHA
    t = (r - 1) * counts_a.var(ddof=1) / (n * p * (1 - p))
    assert 2 * min(stats.chi2.cdf(t, r - 1), stats.chi2.sf(t, r - 1)) > ALPHA
    exposed = [j for j in range(bits) if j not in {k % bits for k in protected}]
    assert per_bit[[j for j in range(bits) if j not in exposed]].sum() == 0
    assert stats.chisquare(per_bit[exposed]).pvalue > ALPHA


def test_nested_bits_are_independent_within_a_word():
    """The law of a word's mask is the product Bernoulli(p) law (pairs of bits, chi-square)."""
    numel, bits, p = 20000, 2, 0.3
    sites = sample_flips(torch.zeros(numel, dtype=torch.int8), bits, p01=p, p10=p, seed=7, nested_max=0.5)
    observed = np.bincount(_dense(sites), minlength=4)
    law = np.array([(1 - p) ** 2, p * (1 - p), p * (1 - p), p**2]) * numel
    assert stats.chisquare(observed, law).pvalue > ALPHA


@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_lower_rates_flip_a_subset(seed):
    codes = torch.randint(-7, 8, (3000,), dtype=torch.int8)
    masks = [_dense(sample_flips(codes, 4, p01=p, p10=p, seed=seed, nested_max=max(GRID))) for p in GRID]
    for low, high in zip(masks, masks[1:], strict=False):
        assert np.all((low & ~high) == 0)  # every bit flipped at the lower rate is flipped at the higher
        assert (high & ~low).any()  # and the higher rate adds some
    # at the top rate the pattern is all the candidates
    assert masks[-1].sum() > 0


def test_unequal_rates_nested_keep_their_law_and_nest():
    """p01 fixed, p10 = ber on the grid: each stored value flips at its rate, patterns nest."""
    numel, bits, p01 = 4000, 4, 0.02
    codes = torch.randint(-7, 8, (numel,), dtype=torch.int8)
    ones = int(np.unpackbits(to_words(codes, bits).numpy()[:, None], axis=1).sum())
    zeros = numel * bits - ones
    prev = None
    for p10 in (0.01, 0.05, 0.1):
        up = down = 0
        for s in range(40):
            sites = sample_flips(codes, bits, p01=p01, p10=p10, seed=s, nested_max=0.1)
            hit = _bits(sites, bits)
            value = (to_words(codes, bits).numpy()[:, None] >> np.arange(bits)) & 1
            up += int((hit & (1 - value)).sum())
            down += int((hit & value).sum())
        assert stats.binomtest(up, zeros * 40, p01).pvalue > ALPHA
        assert stats.binomtest(down, ones * 40, p10).pvalue > ALPHA
        mask = _dense(sample_flips(codes, bits, p01=p01, p10=p10, seed=3, nested_max=0.1))
        if prev is not None:
            assert np.all((prev & ~mask) == 0)
        prev = mask


def test_nested_is_an_option_default_patterns_unchanged():
    codes = torch.zeros(2000, dtype=torch.int8)
    plain = sample_flips(codes, 8, p01=0.05, p10=0.05, seed=5)
    again = sample_flips(codes, 8, p01=0.05, p10=0.05, seed=5, nested_max=None)
    assert torch.equal(plain.index, again.index) and torch.equal(plain.mask, again.mask)
    nested = sample_flips(codes, 8, p01=0.05, p10=0.05, seed=5, nested_max=0.05)
    assert nested.n_bits > 0
    assert not torch.equal(nested.index, plain.index)  # another stream: nesting is a choice


def test_validation_and_serialisation():
    with pytest.raises(ValueError, match="exceed nested_max"):
        sample_flips(torch.zeros(10, dtype=torch.int8), 8, p01=0.2, p10=0.2, seed=0, nested_max=0.1)
    with pytest.raises(ConfigError, match="exceed nested_max"):
        RandomFlips(0.2, 0.2, nested_max=0.1)
    with pytest.raises(ConfigError, match="positive"):
        RandomFlips(0.0, 0.0, nested_max=0.0)
    assert RandomFlips(0.1, 0.1).to_dict() == {"kind": "flips", "p01": 0.1, "p10": 0.1}
    assert RandomFlips(0.1, 0.1, 0.2).to_dict()["nested_max"] == 0.2
    template = BitErrorModel(nested_max=0.1)
    assert template.to_dict()["nested_max"] == 0.1
    assert "nested_max" not in BitErrorModel().to_dict()
    assert BitErrorModel.from_dict(template.to_dict()) == template
    assert template.with_ber(0.05).fault_kinds()[0] == RandomFlips(0.05, 0.05, 0.1)
    with pytest.raises(ConfigError, match="exceed nested_max"):
        template.with_ber(0.2)
    assert template.is_null  # rate 0 draws nothing


def _words(net: nn.Module) -> torch.Tensor:
    return torch.cat([to_words(m.stored("weight").codes.flatten(), 4) for _, m in quantized_modules(net)])


def test_inject_nests_across_the_grid():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    quantize_model(net, QuantSpec(4))
    freeze_model(net)
    clean = _words(net)
    template = BitErrorModel(nested_max=max(GRID))
    for seed in (0, 9):
        prev = torch.zeros_like(clean)
        for p in GRID:
            with inject(net, template.with_ber(p), seed=seed) as report:
                changed = _words(net) ^ clean  # only flips: the changed bits are the flipped bits
            assert report.n_flipped == int(popcount(changed).sum())
            assert torch.all((prev & ~changed) == 0)
            prev = changed
        assert torch.equal(_words(net), clean)
