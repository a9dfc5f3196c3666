"""Activation bit errors in campaigns (issue 12, part 4): ``run_campaign(..., activations=...)`` and
``qmargin evaluate --act-bits``. Errors change results only when the activation BER is positive;
patterns are paired (same seed, same values; any cell order or worker); resume and shards give the
sequential result; a resume or merge with another batch size or other activation settings is refused;
the CLI's mistakes are one line with exit status 2; the result records the activation settings."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from qmargin.cli import main
from qmargin.cli import options as opt
from qmargin.engine import Evaluation, run_campaign, stress
from qmargin.engine.activations import ActivationSetup, activation_layers, parse_calibration
from qmargin.engine.cells import CellOutcome
from qmargin.engine.executors import CellJob, evaluate_chunk
from qmargin.engine.grid import Cell
from qmargin.engine.store import SCHEMA_VERSION, load_campaign, merge_results, upgrade, validate_campaign
from qmargin.errors import CheckpointError, ConfigError
from qmargin.quant import QuantLinear, QuantSpec

P = 0.02
BERS = [0.0, P]
R = 4
BATCH = 64


def _no_timing(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "timing"}


def _values(res: dict) -> list[list[float]]:
    return [e["accuracies"] for e in res["results"]]


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A 4-bit MLP trained briefly on digits; its test tensors; calibration inputs (train split)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    m = nn.Sequential(
        QuantLinear(64, 32, spec=QuantSpec(4)), nn.ReLU(), QuantLinear(32, 10, spec=QuantSpec(4))
    )
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[:1400]), y[:1400]).backward()
        opt.step()
    return m.eval(), (x[1400:], y[1400:]), x[:256]


def _setup(mlp, ber: float | None = 0.0, *, weights: bool = True, bits: int = 6) -> ActivationSetup:
    model, _, x_cal = mlp
    return ActivationSetup.calibrate(
        model, QuantSpec(bits), x_cal.split(BATCH), source="digits[:256]", ber=ber, weights=weights
    )


def _run(mlp, setup: ActivationSetup | None, **kw) -> dict:
    model, data, _ = mlp
    kw.setdefault("bers", BERS)
    kw.setdefault("repeats", R)
    kw.setdefault("batch_size", BATCH)
    return stress(model, data, activations=setup, **kw)


# -- semantics ----------------------------------------------------------------------------------
def test_activation_errors_change_results_only_when_the_activation_ber_is_positive(mlp):
    weights_only = _run(mlp, _setup(mlp, 0.0))
    clean = weights_only["clean_accuracy"]
    assert _values(weights_only)[0] == [clean] * R  # act BER 0 and weight BER 0: nothing changes
    assert _values(weights_only)[1] != [clean] * R

    fixed = _run(mlp, _setup(mlp, P))  # act BER P in every cell, weights swept
    assert fixed["clean_accuracy"] == clean  # the clean pass has quantized, uncorrupted activations
    assert _values(fixed)[0] != [clean] * R  # weight BER 0, activation errors only
    assert _values(fixed)[1] != _values(weights_only)[1]

    follows = _run(mlp, _setup(mlp, None))  # one grid sweeps both
    assert _values(follows)[0] == [clean] * R
    assert _values(follows)[1] == _values(fixed)[1]  # same cells (weights P, activations P), paired

    only = _run(mlp, _setup(mlp, None, weights=False))  # the grid hits activations only
    assert _values(only)[0] == [clean] * R
    assert _values(only)[1] == _values(fixed)[0]  # = activations at P, weights clean

    plain = _run(mlp, None)  # no activation quantization at all: another clean value
    assert plain["clean_accuracy"] != clean or _values(plain)[1] != _values(weights_only)[1]
    assert "activations" not in plain


def test_protected_bits_of_the_template_protect_activations_too(mlp):
    from qmargin.faults import BitErrorModel

    every = list(range(6))
    res = _run(mlp, _setup(mlp, None, weights=False), error_model=BitErrorModel(protected_bits=every))
    assert _values(res)[1] == [res["clean_accuracy"]] * R
    assert res["activations"]["protected_bits"] == every


def test_the_result_records_the_activation_settings(mlp):
    setup = _setup(mlp, P)
    res = _run(mlp, setup)
    act = res["activations"]
    assert res["schema_version"] == SCHEMA_VERSION == 4
    assert act["bits"] == 6 and act["layers"] == ["0", "2"] and act["ber"] == P
    assert act["weight_errors"] is True and act["batch_size"] == BATCH
    assert act["calibration"] == {
        "method": "minmax",
        "percentile": None,
        "source": "digits[:256]",
        "samples": 256,
    }
    assert act["ranges_sha256"] == setup.ranges_sha256()
    assert set(act["ranges"]) == {"0", "2"} and act["ranges"]["0"]["scale"] > 0
    assert res["evaluation"]["patterns_per_pass"] == 1
    assert _run(mlp, _setup(mlp, None))["activations"]["ber"] == "grid"


# -- pairing, executors, resume, shards ---------------------------------------------------------
def test_same_seed_same_values_across_runs_and_models_see_the_same_errors(mlp):
    a = _run(mlp, _setup(mlp, P))
    b = _run(mlp, _setup(mlp, P))
    assert _no_timing(a) == _no_timing(b)
    c = _run(mlp, _setup(mlp, P), base_seed=1)  # other seeds: other patterns
    assert _values(c) != _values(a)
    assert _values(c)[0][: R - 1] == _values(a)[0][1:]  # seed 1 .. R-1 are shared: paired


class _ShuffledExecutor:
    """Cells one at a time, in a random order (what workers may do)."""

    def __init__(self) -> None:
        self.job: CellJob | None = None
        self.seen: list[Cell] = []

    def start(self, job: CellJob) -> None:
        self.job = job

    def map(self, cells: Sequence[Cell]) -> Iterator[CellOutcome]:
        assert self.job is not None and self.job.activations is not None
        order = list(cells)
        random.Random(3).shuffle(order)
        for c in order:
            self.seen.append(c)
            yield from evaluate_chunk(self.job, [c])

    def close(self) -> None:
        self.job = None


def test_any_cell_order_gives_the_sequential_result(mlp):
    model, data, _ = mlp
    setup = _setup(mlp, P)
    seq = _run(mlp, setup, patterns_per_pass=3)  # ignored with activations: one cell per pass
    ex = _ShuffledExecutor()
    ev = Evaluation(data, batch_size=BATCH)
    shuffled = run_campaign(model, ev, bers=BERS, repeats=R, base_seed=0, executor=ex, activations=setup)
    assert [c.pattern for c in ex.seen] != sorted(c.pattern for c in ex.seen)
    assert _values(shuffled) == _values(seq)


def test_resume_and_shards_give_the_sequential_result(mlp, tmp_path: Path):
    setup = _setup(mlp, P)
    full = _run(mlp, setup)

    class StopError(Exception):
        pass

    def stop_after_3(p) -> None:
        if p.done == 3:
            raise StopError

    out = tmp_path / "r.json"
    with pytest.raises(StopError):
        _run(mlp, setup, out=out, progress=stop_after_3)
    assert load_campaign(out)["status"] == "partial"
    assert _no_timing(_run(mlp, setup, out=out)) == _no_timing(full)

    shards = [_run(mlp, setup, out=tmp_path / f"s{i}.json", shard=(i, 2)) for i in (1, 2)]
    merged = merge_results([("s1", shards[0]), ("s2", shards[1])])
    assert _no_timing(merged) == _no_timing(full)


def test_resume_or_merge_with_another_batch_size_or_activation_setting_is_refused(mlp, tmp_path: Path):
    setup = _setup(mlp, P)
    out = tmp_path / "r.json"
    first = _run(mlp, setup, out=out)
    with pytest.raises(ConfigError, match="batch_size"):
        _run(mlp, setup, out=out, batch_size=32)
    with pytest.raises(ConfigError, match=r"activations\.ber"):
        _run(mlp, _setup(mlp, 2 * P), out=out)
    with pytest.raises(ConfigError, match=r"activations\.bits"):
        _run(mlp, _setup(mlp, P, bits=8), out=out)
    with pytest.raises(ConfigError, match="activations"):
        _run(mlp, None, out=out)  # the stored file has activation errors, this run none
    other = _run(mlp, setup, out=tmp_path / "b.json", batch_size=32, shard=(2, 2))
    s1 = _run(mlp, setup, out=tmp_path / "a.json", shard=(1, 2))
    with pytest.raises(ConfigError, match="batch_size"):
        merge_results([("a", s1), ("b", other)])
    assert load_campaign(out) == json.loads(out.read_text()) and first["status"] == "complete"


def test_old_results_stay_readable_and_activations_need_schema_4(mlp, tmp_path: Path):
    res = _run(mlp, None)
    old = {**res, "schema_version": 3}
    assert validate_campaign("old", old) is old
    assert upgrade(old)["schema_version"] == SCHEMA_VERSION
    bad = {**_run(mlp, _setup(mlp, P)), "schema_version": 3}
    with pytest.raises(CheckpointError, match="activations"):
        validate_campaign("bad", bad)
    broken = _run(mlp, _setup(mlp, P))
    broken["activations"]["bits"] = 12
    with pytest.raises(CheckpointError, match="activations.bits"):
        validate_campaign("broken", broken)


# -- library refusals ---------------------------------------------------------------------------
def test_library_refusals(mlp):
    model, _, x_cal = mlp
    with pytest.raises(ConfigError, match="no quantized layer matching"):
        activation_layers(model, ["fc*"])
    with pytest.raises(ConfigError, match="no qmargin quantized layers"):
        activation_layers(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="from the grid"):
        ActivationSetup.calibrate(model, QuantSpec(6), [x_cal], ber=P, weights=False)
    assert parse_calibration("percentile:99.9") == ("percentile", 99.9)
    for bad in ("mse", "percentile:20", "percentile:x"):
        with pytest.raises(ConfigError):
            parse_calibration(bad)
    setup = ActivationSetup.calibrate(model, QuantSpec(6), [x_cal], method="percentile", percentile=99.0)
    assert setup.calibration["percentile"] == 99.0
    assert setup.ranges["0"][0] < _setup(mlp).ranges["0"][0]  # percentile ranges clip the tail


# -- the command line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from qmargin.experiments.runs import TrainConfig, load_dataset, train_run

    run = tmp_path_factory.mktemp("act") / "run"
    cfg = TrainConfig(
        dataset="digits", model="mlp", bits=4, epochs=1, device="cpu", model_kwargs={"hidden": [16, 16]}
    )
    train_run(cfg, dataset=load_dataset("digits"), out_dir=run)
    return run


def _exit_code(args: list[str]) -> int:
    try:
        return int(main(args) or 0)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_cli_defaults_are_the_librarys():
    import inspect

    from qmargin.cli.app import evaluate
    from qmargin.experiments.evaluate import DEFAULT_CALIBRATION_BATCHES

    params = inspect.signature(evaluate).parameters
    assert params["act_calibration_batches"].default == DEFAULT_CALIBRATION_BATCHES
    assert opt.ACT_CALIBRATION_BATCHES == DEFAULT_CALIBRATION_BATCHES


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--act-ber", "0.01"], "--act-ber needs --act-bits"),
        (["--act-ber-follows"], "--act-ber-follows needs --act-bits"),
        (["--act-only"], "--act-only needs --act-bits"),
        (["--act-calibration", "percentile:99"], "--act-calibration needs --act-bits"),
        (["--act-bits", "8", "--act-ber", "0.01", "--act-ber-follows"], "give one"),
        (["--act-bits", "8", "--layers", "nomatch*"], "no activation buffers"),
        (["--act-bits", "9"], "--act-bits"),
        (["--act-bits", "8", "--act-calibration", "percentile:40"], "--act-calibration"),
    ],
)
def test_cli_mistakes_are_one_line_exit_2(run_dir: Path, tmp_path: Path, capsys, extra, needle):
    args = ["evaluate", str(run_dir), "--ber", "0,0.01", "--repeats", "2", "--out", str(tmp_path / "r.json")]
    assert _exit_code([*args, "--no-plot", "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_cli_result_records_activations_and_refuses_another_batch_size(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "r.json"
    args = [
        "evaluate",
        str(run_dir),
        "--ber",
        "0,0.01",
        "--repeats",
        "2",
        "--out",
        str(out),
        "--no-plot",
        "-q",
    ]
    act = ["--act-bits", "8", "--act-ber", "0.01", "--act-calibration", "percentile:99.9"]
    assert _exit_code([*args, *act, "--batch-size", "100"]) == 0
    text = capsys.readouterr().out
    assert "activations: 8-bit codes of 3 layer(s)" in text and "training split" in text
    res = json.loads(out.read_text())
    assert res["activations"]["ber"] == 0.01 and res["activations"]["batch_size"] == 100
    assert res["activations"]["calibration"]["method"] == "percentile"
    assert res["activations"]["calibration"]["percentile"] == 99.9
    assert res["activations"]["calibration"]["samples"] == 400  # 4 batches of 100 training samples
    assert res["results"][0]["accuracies"] != [res["clean_accuracy"]] * 2
    assert _exit_code([*args, *act, "--batch-size", "50"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert _exit_code([*args, *act, "--batch-size", "100"]) == 0  # same settings: resumed, unchanged
    assert json.loads(out.read_text())["results"] == res["results"]


def test_two_ray_workers_give_the_sequential_result(mlp):
    """Workers evaluate the cells of one campaign on their own copies of the model: the hooks are
    installed per pass from the plain setup, so the values are a sequential run's."""
    pytest.importorskip("ray")
    setup = _setup(mlp, None)
    seq = _run(mlp, setup)
    par = _run(mlp, setup, workers=2)
    assert _no_timing(par) == _no_timing(seq)


def test_cli_own_model_calibrates_on_test_batches(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef make():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    args = ["evaluate", "--model", "net.py:make", "--data", "digits", "--out", "r.json", "--ber", "0,0.01"]
    args += ["--repeats", "2", "--batch-size", "100", "--no-plot", "-q", "--act-bits", "8", "--act-only"]
    assert _exit_code([*args, "--act-calibration-batches", "2"]) == 0
    assert "the first 2 batches of the test data digits" in capsys.readouterr().out
    act = json.loads((tmp_path / "r.json").read_text())["activations"]
    assert act["layers"] == ["1", "3"] and act["calibration"]["samples"] == 200
    assert act["batch_size"] == 100 and act["weight_errors"] is False and act["ber"] == "grid"
