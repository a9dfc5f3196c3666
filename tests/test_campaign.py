"""Bit-error evaluation campaigns: statistics, paired seeds, resume, CSV, convergence failures."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qmargin.errors import ConfigError, DataError
from qmargin.experiments import campaign_csv_path, load_campaign, run_ber_campaign
from qmargin.quant import QuantSpec, quantize_model, quantized_modules


@pytest.fixture()
def faults_module():
    import qmargin.faults

    return qmargin.faults


# ------------------------------------------------------------------------------------------------
# a small trained 4-bit MLP on sklearn digits
# ------------------------------------------------------------------------------------------------
def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _trained(digits, seed: int, steps: int = 150) -> nn.Module:
    xtr, ytr, _, _ = digits
    model = _mlp(seed)
    quantize_model(model, QuantSpec(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def model_a(digits):
    return _trained(digits, 0)


@pytest.fixture(scope="module")
def model_b(digits):
    return _trained(digits, 1)


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in quantized_modules(model):
        m.freeze()
        out[name] = m.stored("weight").codes.clone()
    return out


def _no_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timing"}


BERS = [0.0, 0.01, 0.1]


# ------------------------------------------------------------------------------------------------
def test_campaign_statistics_and_clean(model_a, digits, faults_module):
    _, _, xte, yte = digits
    model_a.eval()
    res = run_ber_campaign(model_a, xte, yte, bers=BERS, repeats=3, base_seed=7, batch_size=100)
    with torch.inference_mode():
        manual_clean = (model_a(xte).argmax(1) == yte).sum().item() / len(yte)
    assert res["clean_accuracy"] == pytest.approx(manual_clean, abs=1e-12)
    assert res["clean_accuracy"] > 0.8  # the model learned something, so bit errors can hurt it
    assert [e["ber"] for e in res["results"]] == BERS
    assert res["seeds"] == [7, 8, 9] and res["repeats"] == 3 and res["base_seed"] == 7
    assert res["status"] == "complete"
    for e in res["results"]:
        a = np.array(e["accuracies"])
        assert len(a) == 3 and ((a >= 0) & (a <= 1)).all()
        assert e["mean"] == pytest.approx(a.mean()) and e["std"] == pytest.approx(a.std())
        assert e["min"] == a.min() and e["max"] == a.max()
    # BER 0 injects nothing: every pattern equals the clean accuracy
    assert res["results"][0]["accuracies"] == [res["clean_accuracy"]] * 3
    # a 10% BER on 4-bit codes destroys the model; 1% already costs accuracy on some pattern
    assert res["results"][2]["mean"] < res["clean_accuracy"] - 0.2
    assert res["results"][1]["min"] < res["clean_accuracy"]
    assert res["qmargin_version"] and res["error_model"]["ber"] is None
    json.dumps(res, allow_nan=False)


def test_campaign_restores_model_state(digits, faults_module):
    _, _, xte, yte = digits
    model = _trained(digits, 2, steps=5)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_ber_campaign(model, xte, yte, bers=[0.2], repeats=2, base_seed=0)
    assert model.training
    assert not any(m.frozen for _, m in quantized_modules(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # a frozen model keeps its codes bit for bit
    model.eval()
    codes = _codes(model)
    run_ber_campaign(model, xte, yte, bers=[0.2], repeats=2, base_seed=0)
    assert all(m.frozen for _, m in quantized_modules(model))
    for name, m in quantized_modules(model):
        assert torch.equal(m.stored("weight").codes, codes[name])


def test_paired_patterns_across_models(model_a, model_b, digits, faults_module, monkeypatch):
    """Two models (same architecture) receive exactly the same flip masks for the same (BER, pattern)."""
    _, _, xte, yte = digits
    real_inject = faults_module.inject
    masks: dict[int, dict] = {}

    @contextlib.contextmanager
    def recording_inject(model, em, seed):
        orig = {n: m.stored("weight").codes.clone() for n, m in quantized_modules(model)}
        with real_inject(model, em, seed) as rep:
            flips = {
                n: (m.stored("weight").codes.to(torch.int16) ^ orig[n].to(torch.int16)) & 0xF
                for n, m in quantized_modules(model)
            }
            masks.setdefault(id(model), {})[(em.ber, seed)] = flips
            yield rep

    monkeypatch.setattr(faults_module, "inject", recording_inject)
    ra = run_ber_campaign(model_a, xte, yte, bers=[0.01, 0.05], repeats=3, base_seed=100)
    rb = run_ber_campaign(model_b, xte, yte, bers=[0.01, 0.05], repeats=3, base_seed=100)
    ma, mb = masks[id(model_a)], masks[id(model_b)]
    assert sorted(ma) == sorted(mb) == sorted((p, s) for p in (0.01, 0.05) for s in (100, 101, 102))
    n_flipped = 0
    for key in ma:
        for layer in ma[key]:
            assert torch.equal(ma[key][layer], mb[key][layer]), (key, layer)
            n_flipped += int(ma[key][layer].ne(0).sum())
    assert n_flipped > 0
    # different patterns really differ
    assert not torch.equal(ma[(0.05, 100)]["0"], ma[(0.05, 101)]["0"])
    # and the same model run twice gives the same result
    ra2 = run_ber_campaign(model_a, xte, yte, bers=[0.01, 0.05], repeats=3, base_seed=100)
    assert _no_timing(ra) == _no_timing(ra2)
    assert ra["fingerprint"]["model_sha256"] != rb["fingerprint"]["model_sha256"]
    assert ra["fingerprint"]["data_sha256"] == rb["fingerprint"]["data_sha256"]


class _StopError(Exception):
    pass


@pytest.mark.parametrize("per_pass", [1, 2])
def test_interrupt_and_resume_is_identical(model_a, digits, tmp_path: Path, faults_module, per_pass):
    _, _, xte, yte = digits
    kw = dict(
        bers=BERS,
        repeats=3,
        base_seed=11,
        batch_size=64,
        config={"model": "mlp", "bits": (4,)},
        patterns_per_pass=per_pass,
    )
    full = run_ber_campaign(model_a, xte, yte, out_path=tmp_path / "full.json", **kw)
    codes = _codes(model_a)

    seen: list[int] = []

    def stop_after_4(ev):
        seen.append(ev.done)
        if ev.done == 4:
            raise _StopError

    out = tmp_path / "part.json"
    with pytest.raises(_StopError):
        run_ber_campaign(model_a, xte, yte, out_path=out, progress=stop_after_4, **kw)
    partial = json.loads(out.read_text())
    assert partial["status"] == "partial"
    assert [len(e["accuracies"]) for e in partial["results"]] == [3, 1, 0]
    assert not campaign_csv_path(out).exists()
    for name, m in quantized_modules(model_a):  # the exception did not leave corrupted codes behind
        assert torch.equal(m.stored("weight").codes, codes[name])

    resumed = run_ber_campaign(
        model_a, xte, yte, out_path=out, progress=lambda ev: seen.append(ev.done), **kw
    )
    assert seen == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert _no_timing(resumed) == _no_timing(full)
    assert _no_timing(load_campaign(out)) == _no_timing(load_campaign(tmp_path / "full.json"))
    assert campaign_csv_path(out).read_text() == campaign_csv_path(tmp_path / "full.json").read_text()
    # rerunning a complete file evaluates nothing and returns the same
    again = run_ber_campaign(model_a, xte, yte, out_path=out, progress=lambda ev: seen.append(-1), **kw)
    assert -1 not in seen and _no_timing(again) == _no_timing(full)
    assert not list(tmp_path.glob(".*tmp"))


def test_csv_matches_json(model_a, digits, tmp_path: Path, faults_module):
    _, _, xte, yte = digits
    out = tmp_path / "sub" / "c.json"
    res = run_ber_campaign(model_a, xte, yte, bers=[0.003, 0.03], repeats=4, base_seed=5, out_path=out)
    assert json.loads(out.read_text())["results"] == res["results"]
    with campaign_csv_path(out).open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for row in rows:
        e = next(e for e in res["results"] if e["ber"] == float(row["ber"]))
        r = int(row["pattern"])
        assert int(row["seed"]) == 5 + r
        assert float(row["accuracy"]) == e["accuracies"][r]


def test_settings_mismatch_raises_or_overwrites(model_a, model_b, digits, tmp_path: Path, faults_module):
    _, _, xte, yte = digits
    out = tmp_path / "c.json"
    run_ber_campaign(model_a, xte, yte, bers=[0.01], repeats=2, base_seed=0, out_path=out)
    with pytest.raises(ConfigError, match="repeats"):
        run_ber_campaign(model_a, xte, yte, bers=[0.01], repeats=3, base_seed=0, out_path=out)
    with pytest.raises(ConfigError, match="fingerprint"):
        run_ber_campaign(model_b, xte, yte, bers=[0.01], repeats=2, base_seed=0, out_path=out)
    with pytest.raises(ConfigError, match="config"):
        run_ber_campaign(
            model_a, xte, yte, bers=[0.01], repeats=2, base_seed=0, out_path=out, config={"a": 1}
        )
    res = run_ber_campaign(
        model_a, xte, yte, bers=[0.01], repeats=3, base_seed=0, out_path=out, overwrite=True
    )
    assert len(res["results"][0]["accuracies"]) == 3
    out.write_text("not json")
    with pytest.raises(ConfigError, match="not a campaign result"):
        run_ber_campaign(model_a, xte, yte, bers=[0.01], repeats=2, base_seed=0, out_path=out)


def test_bad_inputs(model_a, digits, faults_module):
    _, _, xte, yte = digits
    with pytest.raises(DataError, match="samples"):
        run_ber_campaign(model_a, xte, yte[:-1], bers=[0.1], repeats=1, base_seed=0)
    for bers in ([], [1.5], [0.1, 0.1], [float("nan")]):
        with pytest.raises(ConfigError):
            run_ber_campaign(model_a, xte, yte, bers=bers, repeats=1, base_seed=0)
    with pytest.raises(ConfigError, match="repeats"):
        run_ber_campaign(model_a, xte, yte, bers=[0.1], repeats=0, base_seed=0)
    with pytest.raises(ConfigError, match="quantized"):
        run_ber_campaign(_mlp(0), xte, yte, bers=[0.1], repeats=1, base_seed=0)
    with pytest.raises(ConfigError, match="JSON"):
        run_ber_campaign(model_a, xte, yte, bers=[0.1], repeats=1, base_seed=0, config={"f": object()})


class _FlaggedModel(nn.Module):
    """Wraps a classifier and reports ``converged``: False where the logit range is small."""

    def __init__(self, inner: nn.Module, threshold: float) -> None:
        super().__init__()
        self.inner = inner
        self.threshold = threshold
        self.converged: torch.Tensor | None = None

    def forward(self, x):
        z = self.inner(x)
        self.converged = (z.max(1).values - z.min(1).values) > self.threshold
        return z


def test_convergence_failures_count_as_errors(model_a, digits, tmp_path: Path, faults_module):
    _, _, xte, yte = digits
    model = _FlaggedModel(model_a, threshold=0.0)
    model.eval()
    with torch.inference_mode():
        z = model(xte)
    spread = z.max(1).values - z.min(1).values
    model.threshold = float(spread.median())
    flags = spread > model.threshold
    expected = ((z.argmax(1) == yte) & flags).sum().item() / len(yte)
    out = tmp_path / "f.json"
    res = run_ber_campaign(
        model, xte, yte, bers=[0.0, 0.05], repeats=2, base_seed=3, batch_size=50, out_path=out
    )
    assert res["evaluation"]["count_failures"] is True
    assert res["clean_failures"] == int((~flags).sum()) > 0
    assert res["clean_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert res["results"][0]["failures"] == [res["clean_failures"]] * 2
    assert all(isinstance(f, int) and f >= 0 for f in res["results"][1]["failures"])
    header = campaign_csv_path(out).read_text().splitlines()[0]
    assert header == "ber,pattern,seed,accuracy,failures"
    # a model without flags cannot be asked to count failures; with count_failures=False flags are ignored
    with pytest.raises(ConfigError, match="converged"):
        run_ber_campaign(model_a, xte, yte, bers=[0.0], repeats=1, base_seed=0, count_failures=True)
    plain = run_ber_campaign(model, xte, yte, bers=[0.0], repeats=1, base_seed=0, count_failures=False)
    assert "clean_failures" not in plain and "failures" not in plain["results"][0]
    assert plain["clean_accuracy"] > res["clean_accuracy"]


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x.view(-1, 1, 8, 8))))
        return self.fc(nn.functional.max_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_patterns_per_pass_matches_loop(model_a, digits, faults_module, arch):
    """Several patterns in one vmapped forward pass give exactly the per-pattern loop's accuracies."""
    xtr, ytr, xte, yte = digits
    if arch == "mlp":
        model = model_a
    else:
        torch.manual_seed(0)
        model = _SmallCNN()
        quantize_model(model, QuantSpec(4, per_channel=True), bias_spec=QuantSpec(8))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr), ytr).backward()
            opt.step()
    kw = dict(bers=[0.005, 0.05], repeats=6, base_seed=21, batch_size=128)
    loop = run_ber_campaign(model, xte, yte, **kw)
    many = run_ber_campaign(model, xte, yte, patterns_per_pass=4, **kw)
    assert many["evaluation"]["patterns_per_pass"] == 4
    assert many["results"] == loop["results"]
    assert many["clean_accuracy"] == loop["clean_accuracy"]
    assert len({a for e in loop["results"] for a in e["accuracies"]}) > 3  # patterns really differ


def test_load_campaign_errors(tmp_path: Path):
    from qmargin.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no campaign result"):
        load_campaign(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_campaign(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(CheckpointError, match="not a campaign result"):
        load_campaign(tmp_path / "other.json")


def test_error_model_template(model_a, digits, faults_module):
    _, _, xte, yte = digits
    em = faults_module.BitErrorModel(layers=("2",), protected_bits=(-1,))
    kw = dict(bers=[0.05], repeats=3, base_seed=0)
    last = run_ber_campaign(model_a, xte, yte, error_model=em, **kw)
    full = run_ber_campaign(model_a, xte, yte, **kw)
    assert last["error_model"] == {**em.to_dict(), "ber": None}
    assert full["error_model"]["layers"] == ["*"] and full["error_model"]["protected_bits"] == []
    # fewer exposed bits (one layer, no sign bit): the damage is smaller on average
    assert last["results"][0]["mean"] > full["results"][0]["mean"]
    with pytest.raises(ConfigError, match="selects no stored tensor"):
        run_ber_campaign(model_a, xte, yte, error_model=faults_module.BitErrorModel(layers=("nope",)), **kw)
    with pytest.raises(ConfigError, match="p01"):
        run_ber_campaign(model_a, xte, yte, error_model=faults_module.BitErrorModel(p01=0.1, p10=0.01), **kw)
