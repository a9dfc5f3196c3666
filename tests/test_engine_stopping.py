"""Sequential stopping (``--ci-halfwidth``, :mod:`qmargin.engine.stopping`): the rule, its campaigns
(prefix of the fixed run, any executor, resume), its result files and the CLI's refusals."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from qmargin.engine import Evaluation, run_campaign, stress
from qmargin.engine.cells import CellOutcome
from qmargin.engine.executors import SequentialExecutor
from qmargin.engine.grid import Cell
from qmargin.engine.stopping import StoppingRule
from qmargin.engine.store import SCHEMA_VERSION, load_campaign, merge_results, validate_campaign
from qmargin.errors import CheckpointError, ConfigError
from qmargin.experiments.evaluate import halfwidth_in_metric_units, metric_from_spec
from qmargin.quant import QuantSpec, quantize_model
from qmargin.stats import mean_confidence_interval, summarize_accuracies

# -- the rule -------------------------------------------------------------------------------------


def test_checkpoints_and_validation():
    assert StoppingRule(0.01).checkpoints(8) == [5, 6, 7, 8]
    assert StoppingRule(0.01, min_patterns=4, step=3).checkpoints(12) == [4, 7, 10, 12]
    assert StoppingRule(0.01, min_patterns=10).checkpoints(6) == [6]  # the cap beats the minimum
    for bad in (0.0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ConfigError):
            StoppingRule(bad)  # type: ignore[arg-type]
    for kw in ({"min_patterns": 1}, {"step": 0}, {"level": 1.0}, {"min_patterns": 2.5}):
        with pytest.raises(ConfigError):
            StoppingRule(0.01, **kw)  # type: ignore[arg-type]
    rule = StoppingRule(0.02, min_patterns=3, step=2, level=0.9)
    assert StoppingRule.from_dict(rule.to_dict()) == rule


def test_halfwidth_is_the_student_t_interval():
    vals = [0.91, 0.88, 0.93, 0.90, 0.87, 0.92]
    s = summarize_accuracies(vals)
    lo, hi = mean_confidence_interval(s["mean"], s["std"], len(vals))
    assert StoppingRule(0.01).halfwidth_of(vals) == pytest.approx((hi - lo) / 2, rel=1e-12)
    # by hand: t_{5, 0.975} = 2.5705818366, sample std (ddof 1)
    mean = sum(vals) / 6
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 5)
    assert StoppingRule(0.01).halfwidth_of(vals) == pytest.approx(2.5705818366 * sd / math.sqrt(6), rel=1e-9)
    assert StoppingRule(0.01).halfwidth_of([0.5]) is None


def test_stop_point():
    rule = StoppingRule(0.05, min_patterns=3)
    assert rule.stop_point([0.9, 0.9, 0.9, 0.1], 10) == 3  # no spread: stops at the minimum
    assert rule.stop_point([0.9, 0.9], 10) is None  # not enough values to decide
    noisy = [0.0, 1.0] * 5
    assert rule.stop_point(noisy[:9], 10) is None and rule.stop_point(noisy, 10) == 10  # the cap
    # the first checkpoint where the half-width is small enough, not a later one
    vals = [0.5, 0.9, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    hws = [StoppingRule(0.2).halfwidth_of(vals[:n]) for n in range(3, 15)]
    first = next(n for n, h in zip(range(3, 15), hws, strict=True) if h <= 0.2)
    assert StoppingRule(0.2, min_patterns=3).stop_point(vals, 14) == first
    assert 3 < first < 14


# -- campaigns ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_mlp():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantize_model(model, QuantSpec(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        opt.step()
    return model.eval(), x[1400:], y[1400:]


BERS = [0.0, 1e-3, 2e-2]
KW = dict(bers=BERS, repeats=30, base_seed=7, batch_size=200)


def _no_timing(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "timing"}


def test_stopped_campaign_is_a_prefix_of_the_fixed_run(digits_mlp):
    model, x, y = digits_mlp
    fixed = stress(model, (x, y), **KW)
    stopped = stress(model, (x, y), ci_halfwidth=0.01, **KW)
    rule = StoppingRule(0.01)
    assert stopped["stopping"] == rule.to_dict() and stopped["status"] == "complete"
    ns = []
    for f, s in zip(fixed["results"], stopped["results"], strict=True):
        n = len(s["accuracies"])
        ns.append(n)
        assert s["accuracies"] == f["accuracies"][:n]  # same seeds: pairable with any fixed run
        assert n == rule.stop_point(f["accuracies"], 30)
        assert s["ci_halfwidth"] == pytest.approx(rule.halfwidth_of(f["accuracies"][:n]))
        assert s["ci_target_met"] == (s["ci_halfwidth"] <= 0.01)
    assert ns[0] == 5  # BER 0: every pattern equals the clean pass, zero spread
    assert ns[1] < 30 < ns[2] + 1  # a low BER stops early, a high one needs the cap (noisy)
    assert not stopped["results"][2]["ci_target_met"]
    validate_campaign("stopped", stopped)


class _ShuffledExecutor(SequentialExecutor):
    """Evaluates every cell of a map call, then yields the outcomes in a random order (as Ray may)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.rounds: list[int] = []

    def map(self, cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        self.rounds.append(len(cells))
        outs = list(super().map(cells))
        self.rng.shuffle(outs)
        yield from outs


def test_same_result_whatever_the_order_of_outcomes(digits_mlp):
    model, x, y = digits_mlp
    kw = {**KW, "ci_halfwidth": 0.01, "base_seed": 3}
    del kw["batch_size"]
    ref = run_campaign(model, Evaluation((x, y), "top1", batch_size=200), **kw)
    ex = _ShuffledExecutor(0)
    other = run_campaign(model, Evaluation((x, y), "top1", batch_size=200), executor=ex, **kw)
    assert _no_timing(other) == _no_timing(ref)
    # rounds: the first holds the minimum of every BER, then one pattern per running BER; BER 0
    # cannot change a bit, so its cells are the clean pass and never reach the executor
    assert ex.rounds[0] == 2 * 5 and all(r <= 2 for r in ex.rounds[1:])
    assert sum(ex.rounds) == sum(len(e["accuracies"]) for e in ref["results"][1:])
    assert ref["results"][0]["accuracies"] == [ref["clean_accuracy"]] * 5


class _StopError(Exception):
    pass


def test_interrupted_stopped_campaign_resumes_identically(digits_mlp, tmp_path: Path):
    model, x, y = digits_mlp
    kw = {**KW, "ci_halfwidth": 0.01}
    full = stress(model, (x, y), out=tmp_path / "full.json", **kw)
    total = sum(len(e["accuracies"]) for e in full["results"])
    seen: list[tuple[int, int]] = []

    def stop_after_12(p):
        seen.append((p.done, p.total))
        if p.done == 12:
            raise _StopError

    out = tmp_path / "part.json"
    with pytest.raises(_StopError):
        stress(model, (x, y), out=out, progress=stop_after_12, **kw)
    part = json.loads(out.read_text())
    assert part["status"] == "partial" and sum(len(e["accuracies"]) for e in part["results"]) == 12
    validate_campaign(out, part)
    resumed = stress(model, (x, y), out=out, progress=lambda p: seen.append((p.done, p.total)), **kw)
    assert _no_timing(resumed) == _no_timing(full)
    assert [d for d, _ in seen] == list(range(1, total + 1))
    assert seen[-1] == (total, total)  # the upper bound shrank to the patterns used
    assert seen[0][1] == 3 * 30  # before anything stopped: every BER up to the cap
    assert out.with_suffix(".csv").read_text() == (tmp_path / "full.csv").read_text()
    # another half-width is another campaign: refused, not mixed
    with pytest.raises(ConfigError, match="stopping.halfwidth"):
        stress(model, (x, y), out=out, **{**kw, "ci_halfwidth": 0.02})


def test_stopped_files_are_checked(digits_mlp, tmp_path: Path):
    model, x, y = digits_mlp
    res = stress(model, (x, y), out=tmp_path / "r.json", ci_halfwidth=0.01, **KW)
    bad = json.loads(json.dumps(res))
    entry = bad["results"][1]
    entry["accuracies"] = entry["accuracies"][:-1]
    entry.update(summarize_accuracies(entry["accuracies"]))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="stopping rule stops at"):
        load_campaign(path)
    assert load_campaign(tmp_path / "r.json")["schema_version"] == SCHEMA_VERSION
    with pytest.raises(ConfigError, match="stopping rule"):
        merge_results([("a", res)])


def test_refusals(digits_mlp):
    model, x, y = digits_mlp
    with pytest.raises(ConfigError, match="--shard"):
        stress(model, (x, y), ci_halfwidth=0.01, shard=(1, 2), **KW)
    with pytest.raises(ConfigError, match="half-width"):
        stress(model, (x, y), ci_halfwidth=-0.5, **KW)
    with pytest.raises(ConfigError, match="min_patterns"):
        stress(model, (x, y), ci_halfwidth=0.01, min_patterns=1, **KW)


def test_cli_units():
    assert halfwidth_in_metric_units(0.5, metric_from_spec("top1")) == pytest.approx(0.005)
    assert halfwidth_in_metric_units(0.5, metric_from_spec("top5")) == pytest.approx(0.005)
    assert halfwidth_in_metric_units(0.05, metric_from_spec("cross_entropy")) == 0.05
    assert halfwidth_in_metric_units(None, metric_from_spec("top1")) is None


# -- paired differences (compare) -----------------------------------------------------------------


def test_paired_difference_by_hand():
    from qmargin.stats import paired_difference

    ref = {1: 0.5, 2: 0.6, 3: 0.7}
    other = {2: 0.65, 3: 0.8, 4: 0.9}
    d = paired_difference(ref, other)
    assert d is not None and d["n"] == 2 and d["mean"] == pytest.approx(0.075)
    half = 12.706204736 * math.sqrt(((0.05 - 0.075) ** 2 + (0.1 - 0.075) ** 2) / 1) / math.sqrt(2)
    assert d["ci_low"] == pytest.approx(0.075 - half, rel=1e-8)
    assert d["ci_high"] == pytest.approx(0.075 + half, rel=1e-8)
    assert paired_difference(ref, {9: 0.1}) is None
    one = paired_difference(ref, {1: 0.4})
    assert one == {"n": 1, "mean": pytest.approx(-0.1), "ci_low": None, "ci_high": None}


def test_paired_rows_pair_by_seed_not_by_position(digits_mlp):
    from qmargin.report.tables import paired_rows

    model, x, y = digits_mlp
    a = stress(model, (x, y), bers=[2e-2], repeats=6, base_seed=10, batch_size=200)
    b = stress(model, (x, y), bers=[2e-2], repeats=6, base_seed=13, batch_size=200)
    (row,) = paired_rows([("a", a), ("b", b)])
    # the same model: on the 3 shared seeds (13, 14, 15) the difference is exactly 0
    assert row["n"] == 3 and row["mean"] == 0.0 and row["ci_low"] == row["ci_high"] == 0.0
    assert a["results"][0]["accuracies"][3:] == b["results"][0]["accuracies"][:3]


# -- the command line -----------------------------------------------------------------------------


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from qmargin.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_ci_halfwidth(digits_mlp, tmp_path: Path, capsys):
    import numpy as np
    from safetensors.torch import save_file

    model, x, y = digits_mlp
    py = tmp_path / "mlp.py"
    py.write_text(
        "from torch import nn\n"
        "def make():\n    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    npz = tmp_path / "d.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    torch.manual_seed(1)
    fm = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    save_file({k: v.contiguous() for k, v in fm.state_dict().items()}, str(tmp_path / "w.safetensors"))
    common = [
        "evaluate", "--model", f"{py}:make", "--weights", str(tmp_path / "w.safetensors"),
        "--data", f"npz:{npz}", "--ber", "0,0.001,0.05", "--repeats", "40", "--bits", "4", "--no-plot",
        "--quiet",
    ]  # fmt: skip
    code, out, err = _cli([*common, "--ci-halfwidth", "1", "--out", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    assert "95% CI ±" in out
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["stopping"]["halfwidth"] == pytest.approx(0.01)  # 1 point of accuracy
    ns = [len(e["accuracies"]) for e in res["results"]]
    assert ns[0] == 5 and all(5 <= n <= 40 for n in ns)
    for e in res["results"]:
        assert e["ci_target_met"] == (e["ci_halfwidth"] <= 0.01)
        assert e["ci_target_met"] or len(e["accuracies"]) == 40  # met, or the cap
    for argv, needle in (
        (["--ci-halfwidth", "0"], "--ci-halfwidth"),
        (["--ci-halfwidth", "-1"], "--ci-halfwidth"),
        (["--min-patterns", "3"], "--min-patterns is for --ci-halfwidth"),
        (["--ci-halfwidth", "1", "--min-patterns", "1"], "--min-patterns"),
        (["--ci-halfwidth", "1", "--shard", "1/2"], "--shard"),
    ):
        code, _, err = _cli([*common, *argv, "--out", str(tmp_path / "bad.json")], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, err)
        assert not (tmp_path / "bad.json").exists()
