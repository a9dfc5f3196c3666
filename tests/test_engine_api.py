"""The engine's API: qmargin.stress on streamed data (DataLoader, tuple and dict inputs), metrics,
identity strings, settings diffs, merging cells in any order, library checks, bounded memory."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qmargin
from qmargin.engine import (
    CampaignState,
    Evaluation,
    Grid,
    Metric,
    MetricError,
    evaluate_cell,
    load_campaign,
    run_campaign,
)
from qmargin.engine.cells import evaluate_pass, prepared
from qmargin.engine.store import settings_diff
from qmargin.errors import ConfigError, DataError
from qmargin.quant import QuantSpec, quantize_model

BERS = [0.0, 0.02, 0.1]


def _no_timing(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "timing"}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


@pytest.fixture(scope="module")
def model(digits):
    x, y = digits
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantize_model(m, QuantSpec(4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[:1400]), y[:1400]).backward()
        opt.step()
    return m


@pytest.fixture(scope="module")
def test_set(digits):
    x, y = digits
    return x[1400:], y[1400:]


@pytest.fixture(scope="module")
def reference(model, test_set):
    """The in-memory campaign every streamed variant must reproduce."""
    return qmargin.stress(model, test_set, bers=BERS, repeats=3, base_seed=7)


def _vals(res):
    return res["clean_accuracy"], [e["accuracies"] for e in res["results"]]


class _TupleModel(nn.Sequential):
    """The same layers (same names, so the same bit-error patterns), input as two halves: ``model(a, b)``."""

    def forward(self, a, b):  # type: ignore[override]
        return super().forward(torch.cat([a, b], dim=1))


class _DictModel(nn.Sequential):
    """The same layers, keyword inputs: ``model(left=..., right=...)``."""

    def forward(self, left, right):  # type: ignore[override]
        return super().forward(torch.cat([left, right], dim=1))


def test_streamed_inputs_equal_in_memory(model, test_set, reference):
    x, y = test_set
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    assert _vals(qmargin.stress(model, loader, bers=BERS, repeats=3, base_seed=7)) == _vals(reference)
    pairs = [((x[i : i + 40, :32], x[i : i + 40, 32:]), y[i : i + 40]) for i in range(0, len(y), 40)]
    res = qmargin.stress(_TupleModel(*model), pairs, bers=BERS, repeats=3, base_seed=7)
    assert _vals(res) == _vals(reference)
    dicts = [({"left": a, "right": b}, t) for (a, b), t in pairs]
    res = qmargin.stress(_DictModel(*model), lambda: iter(dicts), bers=BERS, repeats=3, base_seed=7)
    assert _vals(res) == _vals(reference)
    assert res["evaluation"]["data_fingerprint"] == "sha256" and len(res["fingerprint"]["data_sha256"]) == 64
    assert res["evaluation"]["n_test"] == len(y)
    # several patterns per pass (vmap) over streamed tuple inputs: same numbers
    res = qmargin.stress(_TupleModel(*model), pairs, bers=BERS, repeats=3, base_seed=7, patterns_per_pass=2)
    assert _vals(res) == _vals(reference)
    with pytest.raises(ConfigError, match="one-shot"):
        qmargin.stress(model, iter(pairs), bers=BERS, repeats=1)


def test_metrics_against_direct_computation(model, test_set):
    x, y = test_set
    ev = {m: Evaluation((x, y), m, batch_size=100) for m in ("top1", "top3", "cross_entropy")}
    with prepared(model, torch.device("cpu")), torch.inference_mode():
        z = model(x)
        got = {m: evaluate_pass(model, e, count_failures=False).value for m, e in ev.items()}
    assert got["top1"] == (z.argmax(1) == y).sum().item() / len(y)
    assert got["top3"] == (z.topk(3, dim=1).indices == y[:, None]).any(1).sum().item() / len(y)
    assert got["cross_entropy"] == pytest.approx(nn.functional.cross_entropy(z.double(), y).item(), rel=1e-12)
    assert got["top3"] > got["top1"]


def test_cross_entropy_and_callable_metric_results(model, test_set, tmp_path: Path):
    x, y = test_set
    res = qmargin.stress(
        model, (x, y), bers=[0.05], repeats=2, metric="cross_entropy", out=tmp_path / "ce.json"
    )
    assert res["metric"] == {"name": "cross_entropy", "higher_is_better": False, "fraction": False}
    assert "clean_value" in res and "values" in res["results"][0] and "accuracies" not in res["results"][0]
    assert res["results"][0]["mean"] > res["clean_value"]  # bit errors raise the loss
    assert load_campaign(tmp_path / "ce.json")["clean_value"] == res["clean_value"]
    assert (tmp_path / "ce.csv").read_text().splitlines()[0] == "ber,pattern,seed,value"

    def margin(z, t):  # mean logit margin of the true class over the best other class
        zt = z.gather(1, t[:, None])[:, 0]
        other = z.scatter(1, t[:, None], float("-inf")).max(1).values
        return (zt - other).sum(), len(t)

    metric = Metric.from_callable(margin, name="margin", higher_is_better=True)
    res = qmargin.stress(model, (x, y), bers=[0.05], repeats=2, metric=metric)
    with torch.inference_mode():
        z = model(x)
    assert res["clean_value"] == pytest.approx(margin(z, y)[0].item() / len(y), rel=1e-6)
    assert res["metric"]["name"] == "margin"


def test_nan_metric_is_one_line_and_writes_nothing(model, test_set, tmp_path: Path):
    x, y = test_set
    out = tmp_path / "nan.json"

    def bad(z, t):
        return float("nan"), len(t)

    with pytest.raises(MetricError) as err:
        qmargin.stress(model, (x, y), bers=[0.05], repeats=2, metric=bad, out=out)
    assert "\n" not in str(err.value) and "non-finite" in str(err.value)
    assert isinstance(err.value, DataError)
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left either

    calls = {"n": 0}

    def nan_later(z, t):  # finite on the clean pass, NaN once bit errors are in
        calls["n"] += 1
        return (float("nan") if calls["n"] > len(y) // 100 + 1 else 1.0), len(t)

    with pytest.raises(MetricError):
        qmargin.stress(model, (x, y), bers=[0.05], repeats=2, metric=nan_later, out=out, batch_size=100)
    stored = json.loads(out.read_text())  # the clean pass only: a valid partial result, never complete
    assert stored["status"] == "partial" and stored["results"][0]["values"] == []
    with pytest.raises(MetricError, match="pair"):
        qmargin.stress(model, (x, y), bers=[0.05], repeats=1, metric=lambda z, t: 1.0)


def test_identity_is_recorded_instead_of_a_hash(model, test_set, tmp_path: Path):
    x, y = test_set
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    out = tmp_path / "id.json"
    res = qmargin.stress(model, batches, bers=[0.05], repeats=2, identity="digits-test-v1", out=out)
    assert res["fingerprint"]["data_identity"] == "digits-test-v1" and "data_sha256" not in res["fingerprint"]
    assert res["evaluation"]["data_fingerprint"] == "identity"
    # resumes on the identity; another identity is named as the differing setting
    again = qmargin.stress(model, batches, bers=[0.05], repeats=2, identity="digits-test-v1", out=out)
    assert _no_timing(again) == _no_timing(res)
    with pytest.raises(ConfigError, match=r'fingerprint.data_identity "digits-test-v1" -> "v2"'):
        qmargin.stress(model, batches, bers=[0.05], repeats=2, identity="v2", out=out)


def test_settings_diff_names_each_setting(model, test_set, tmp_path: Path):
    x, y = test_set
    out = tmp_path / "s.json"
    qmargin.stress(model, (x, y), bers=[0.01, 0.1], repeats=2, base_seed=3, out=out, batch_size=64)
    with pytest.raises(ConfigError) as err:
        qmargin.stress(model, (x, y), bers=[0.01, 0.2], repeats=3, base_seed=3, out=out, metric="top2")
    msg = str(err.value)
    assert "\n" not in msg
    for part in (
        "bers [0.01, 0.1] -> [0.01, 0.2]",
        "repeats 2 -> 3",
        'metric.name "top1" -> "topk"',
        "metric.k (absent) -> 2",
        "evaluation.batch_size 64 -> 1024",
    ):
        assert part in msg, (part, msg)
    assert "seeds" not in msg  # implied by repeats
    # streamed data whose content changed: named after the clean pass, nothing overwritten
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
    out2 = tmp_path / "t.json"
    qmargin.stress(model, batches, bers=[0.1], repeats=1, out=out2)
    before = out2.read_text()
    changed = [(b[0].flip(0), b[1].flip(0)) for b in batches]
    with pytest.raises(ConfigError, match=r"fingerprint.data_sha256 \"[0-9a-f]{10}.*\" -> \""):
        qmargin.stress(model, changed, bers=[0.1], repeats=1, out=out2)
    assert out2.read_text() == before
    assert settings_diff({"repeats": 1}, {"repeats": 1}) == []


def test_cells_merged_in_any_order_equal_a_sequential_run(model, test_set):
    x, y = test_set
    ev = Evaluation((x, y))
    seq = run_campaign(model, ev, bers=BERS, repeats=4, base_seed=2)
    grid = Grid.make(BERS, 4, 2)
    cells = list(grid.cells())
    random.Random(0).shuffle(cells)
    from qmargin.faults import BitErrorModel

    settings = {
        k: seq[k]
        for k in (
            "bers",
            "repeats",
            "base_seed",
            "seeds",
            "error_model",
            "config",
            "fingerprint",
            "evaluation",
            "metric",
            "qmargin_version",
        )
    }
    state = CampaignState(grid, settings)
    with prepared(model, torch.device("cpu")):
        state.record_clean(evaluate_pass(model, ev, count_failures=False))
        half = [evaluate_cell(model, ev, BitErrorModel(ber=0.0), c, count_failures=False) for c in cells]
    for i, outcome in enumerate(half):
        state.record(outcome)
        if i == len(half) // 2:
            assert state.result(0.0)["status"] == "partial"
    assert _no_timing(state.result(0.0)) == _no_timing(seq)


def test_library_checks(model, test_set):
    x, y = test_set
    for kwargs, match in (
        ({"repeats": 10**9}, "at most 100000"),
        ({"repeats": 0}, "positive"),
        ({"base_seed": 2**63 - 1, "repeats": 2}, "2\\*\\*63"),
        ({"bers": [float("inf")]}, "\\[0, 1\\]"),
        ({"bers": [-0.1]}, "\\[0, 1\\]"),
        ({"bers": ["a"]}, "number"),
        ({"metric": "top0"}, "positive"),
        ({"metric": "accuracy"}, "unknown metric"),
    ):
        args = {"bers": [0.1], "repeats": 1, **kwargs}
        with pytest.raises(ConfigError, match=match):
            qmargin.stress(model, (x, y), **args)
    with pytest.raises(DataError, match="pair"):
        qmargin.stress(model, [x[:10]], bers=[0.1], repeats=1)


def _numpy_batches(n_batches: int, batch: int = 256):
    """A factory of streamed batches made on the fly (numpy memory, which tracemalloc sees)."""

    def factory():
        rng = np.random.default_rng(0)
        for _ in range(n_batches):
            xb = rng.random((batch, 64), dtype=np.float32)
            yb = rng.integers(0, 10, size=batch)
            yield torch.from_numpy(xb), torch.from_numpy(yb)

    return factory


def test_peak_memory_does_not_grow_with_the_test_set(model):
    peaks = {}
    for n_batches in (10, 100):
        tracemalloc.start()
        qmargin.stress(model, _numpy_batches(n_batches), bers=[0.05], repeats=2)
        peaks[n_batches] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    growth = peaks[100] - peaks[10]
    data_growth = 90 * 256 * (64 * 4 + 8)  # bytes of the 90 extra batches
    assert growth < 0.05 * data_growth, (peaks, data_growth)
