"""SECDED memory (issue 12, part 2): the code, the decoder, and the decoded error law against an
independent dense simulation (a parity-check matrix product per codeword)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults import SECDED, FaultModel, Selection, decode_errors, inject, secded_layout
from qmargin.faults.functional import make_generator
from qmargin.quant import QuantSpec, quantize_model, quantized_modules


def _H(layout) -> np.ndarray:
    """The parity-check matrix, built independently of the decoder: column j = bits of j, plus the
    all-ones overall-parity row."""
    n, r = layout.n, layout.r
    H = np.zeros((r + 1, n), dtype=np.int64)
    for j in range(1, n):
        for i in range(r):
            H[i, j] = (j >> i) & 1
    H[r, :] = 1
    return H


def _reference_decode(layout, e: np.ndarray) -> tuple[int, np.ndarray]:
    """Dense reference: syndrome = H e mod 2; returns (outcome, residual error vector)."""
    H = _H(layout)
    s = (H @ e) % 2
    syn = int(sum(int(b) << i for i, b in enumerate(s[:-1])))
    odd = bool(s[-1])
    e = e.copy()
    if not odd and syn == 0:
        return 0, e
    if odd and syn <= layout.k + layout.r:
        e[syn] ^= 1
        return 1, e
    return 2, e


@pytest.mark.parametrize(("k", "n", "overhead"), [(64, 72, 0.125), (32, 39, 7 / 32), (8, 13, 5 / 8)])
def test_layouts(k, n, overhead):
    lay = secded_layout(k)
    assert lay.n == n and lay.overhead == pytest.approx(overhead)
    assert sorted(lay.data_of_position[lay.data_of_position >= 0]) == list(range(k))
    checks = [j for j in range(n) if lay.data_of_position[j] < 0]
    assert checks == [0] + [2**i for i in range(lay.r)]
    H = _H(lay)
    cols = {tuple(H[:, j]) for j in range(n)}
    assert len(cols) == n and all(any(c) for c in cols)  # distinct, nonzero columns: distance >= 3 ...
    assert all(H[-1, j] == 1 for j in range(n))  # ... and the parity row makes it 4 (SECDED)


def test_every_single_error_is_corrected_and_every_double_detected():
    lay = secded_layout(32)
    singles = np.arange(lay.n)
    cw, pos, due, outcome = decode_errors(lay, np.arange(lay.n), singles)
    assert cw.size == 0 and due.size == 0 and (outcome == 1).all()
    pairs = [(a, b) for a in range(lay.n) for b in range(a + 1, lay.n)]
    cws = np.repeat(np.arange(len(pairs)), 2)
    pos = np.array(pairs).reshape(-1)
    _, _, due, outcome = decode_errors(lay, cws, pos)
    assert (outcome == 2).all() and due.size == len(pairs)


def test_decoder_equals_the_dense_reference_on_random_patterns():
    lay = secded_layout(16)
    rng = np.random.default_rng(0)
    for _ in range(400):
        w = int(rng.integers(1, 6))
        e = np.zeros(lay.n, dtype=np.int64)
        e[rng.choice(lay.n, size=w, replace=False)] = 1
        outcome, residual = _reference_decode(lay, e)
        pos = np.flatnonzero(e)
        cw, rpos, _, out = decode_errors(lay, np.zeros(pos.size, dtype=np.int64), pos)
        assert int(out[0]) == outcome
        got = np.zeros(lay.n, dtype=np.int64)
        got[rpos] = 1
        assert (got == residual).all() and (cw == 0).all()


def _outcome_counts(layout, p: float, n_cw: int, seed: int) -> np.ndarray:
    """Counts of (no error, corrected to clean, DUE, silent data corruption) from the sparse path."""
    from qmargin.faults.functional import _bernoulli_chunks

    g = make_generator(seed)
    raw = np.concatenate([c.to(torch.int64).numpy() for c in _bernoulli_chunks(n_cw * layout.n, p, g)])
    cw, pos, due, outcome = decode_errors(layout, raw // layout.n, raw % layout.n)
    hit = np.unique(raw // layout.n)
    data_err = set((cw[layout.data_of_position[pos] >= 0]).tolist())
    counts = np.zeros(4, dtype=np.int64)
    counts[0] = n_cw - hit.size
    for c, o in zip(hit.tolist(), outcome.tolist(), strict=True):
        if o == 2:
            counts[2] += 1
        elif c in data_err:
            counts[3] += 1  # decoded without complaint, data still wrong (miscorrection / undetected)
        else:
            counts[1] += 1
    return counts


def _dense_counts(layout, p: float, n_cw: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros(4, dtype=np.int64)
    for _ in range(n_cw):
        e = (rng.random(layout.n) < p).astype(np.int64)
        if not e.any():
            counts[0] += 1
            continue
        outcome, residual = _reference_decode(layout, e)
        if outcome == 2:
            counts[2] += 1
        elif residual[layout.data_of_position >= 0].any():
            counts[3] += 1
        else:
            counts[1] += 1
    return counts


def test_decoded_law_matches_an_independent_dense_simulation():
    """Chi-square test of the 4 outcome categories, sparse sampler + decoder vs dense Bernoulli + H;
    at p = 0.03 on (39, 32) codewords every category is populated. Fixed seeds; a correct sampler
    fails this at the 1e-3 level with probability 1e-3."""
    lay = secded_layout(32)
    p, n = 0.03, 20000
    sparse = _outcome_counts(lay, p, n, seed=5)
    dense = _dense_counts(lay, p, n, seed=6)
    assert (sparse > 20).all() and (dense > 20).all(), (sparse, dense)
    _, pval, _, _ = stats.chi2_contingency(np.stack([sparse, dense]))
    assert pval > 1e-3, (sparse, dense, pval)
    # and both agree with the analytic law of the first three categories
    q0 = (1 - p) ** lay.n
    q1 = lay.n * p * (1 - p) ** (lay.n - 1)
    q2 = math.comb(lay.n, 2) * p**2 * (1 - p) ** (lay.n - 2)
    assert abs(sparse[0] / n - q0) < 4 * math.sqrt(q0 * (1 - q0) / n)
    assert sparse[1] / n >= q1 - 4 * math.sqrt(q1 / n)  # singles, plus rare >= 3-error corrections
    assert sparse[2] / n >= q2 - 4 * math.sqrt(q2 / n)  # every double is a DUE


def _model(bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    quantize_model(m, QuantSpec(bits))
    for _, q in quantized_modules(m):
        q.freeze()
    return m.eval()


def _codes(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.stored("weight").codes.clone() for n, q in quantized_modules(m)}


def test_injection_restores_and_corrects_most_errors():
    m = _model()
    clean = _codes(m)
    plain = FaultModel((_flips(1e-3),), Selection())
    ecc = FaultModel((SECDED(1e-3, k=64),), Selection())
    changed = {}
    for label, em in (("plain", plain), ("ecc", ecc)):
        total = 0
        for seed in range(20):
            with inject(m, em, seed):
                total += sum(
                    int((q.stored("weight").codes != clean[n]).sum()) for n, q in quantized_modules(m)
                )
        changed[label] = total
        assert all(torch.equal(q.stored("weight").codes, clean[n]) for n, q in quantized_modules(m))
    # 4-bit words, 16 per 72-bit codeword: at p = 1e-3 a codeword has >= 2 errors with probability
    # about 2.5e-3, so SECDED leaves far fewer corrupted weights than unprotected memory
    assert changed["plain"] > 100 and changed["ecc"] * 10 < changed["plain"], changed


def test_due_zero_policy_zeroes_whole_codewords():
    m = _model()
    clean = _codes(m)
    em = FaultModel((SECDED(0.05, k=32, due="zero"),), Selection())
    with inject(m, em, 1):
        for n, q in quantized_modules(m):
            codes = q.stored("weight").codes.reshape(-1)
            words = codes.reshape(-1, 8)  # 8 four-bit words per 32-bit data word
            zero_rows = (words == 0).all(dim=1) & ~(clean[n].reshape(-1, 8) == 0).all(dim=1)
            assert zero_rows.any()  # at p = 0.05 many (39, 32) codewords see a double error
    assert all(torch.equal(q.stored("weight").codes, clean[n]) for n, q in quantized_modules(m))


def test_bad_parameters():
    with pytest.raises(ConfigError):
        SECDED(1e-3, k=0)
    with pytest.raises(ConfigError):
        SECDED(1e-3, due="flag-later")
    with pytest.raises(ConfigError):
        SECDED(2.0)
    m = _model(bits=3)
    em = FaultModel((SECDED(0.1, k=64),), Selection())
    with pytest.raises(ConfigError, match="whole 3-bit words"), inject(m, em, 0):
        pass


def _flips(p: float):
    from qmargin.faults import RandomFlips

    return RandomFlips(p, p)
