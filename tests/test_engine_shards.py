"""Shards without Ray (issue 8, part 2): ``--shard I/N`` runs every N-th cell into its own file,
``qmargin merge`` combines the shards into the result of a sequential run, value for value, and
refuses shards of other campaigns, cells given twice and missing cells (or writes a partial result
that the campaign resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qmargin
from qmargin.cli import main
from qmargin.engine.store import load_campaign, merge_results, shard_patterns
from qmargin.errors import CheckpointError, ConfigError
from qmargin.experiments.campaign import merge_campaigns
from qmargin.faults import BitErrorModel
from qmargin.quant import QuantSpec, quantize_model

BERS = [0.0, 0.02, 0.1]
REPEATS = 4  # 12 cells


def _no_timing(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "timing"}


@pytest.fixture(scope="module")
def model_and_data():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    quantize_model(m, QuantSpec(4))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x[:1400]), y[:1400]).backward()
        opt.step()
    return m, (x[1400:], y[1400:])


def _run(model_and_data, out: Path | None = None, **kwargs) -> dict:
    m, data = model_and_data
    args = {"bers": BERS, "repeats": REPEATS, "base_seed": 7, **kwargs}
    return qmargin.stress(m, data, out=out, **args)


@pytest.fixture(scope="module")
def sequential(model_and_data, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("seq") / "seq.json"
    return _run(model_and_data, out), out


@pytest.fixture(scope="module")
def shards(model_and_data, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    paths = [root / f"s{i}.json" for i in (1, 2, 3)]
    for i, p in enumerate(paths, start=1):
        _run(model_and_data, p, shard=(i, 3))
    return paths


def test_shard_cells_are_every_nth_cell_ber_major():
    got = [(k, r) for k in range(3) for r in shard_patterns(k, 4, (2, 3))]
    assert got == [(k, r) for k in range(3) for r in range(4) if (k * 4 + r) % 3 == 1]
    cells = sorted((k, r) for i in (1, 2, 3) for k in range(3) for r in shard_patterns(k, 4, (i, 3)))
    assert cells == [(k, r) for k in range(3) for r in range(4)]  # a partition of the grid


def test_a_shard_result_says_which_shard_and_cells_it_holds(shards):
    res = load_campaign(shards[1])  # validated like any result
    assert res["shard"] == {"index": 2, "count": 3}
    assert res["status"] == "complete"
    for k, entry in enumerate(res["results"]):
        assert entry["patterns"] == shard_patterns(k, REPEATS, (2, 3))
        assert len(entry["accuracies"]) == len(entry["patterns"])
    assert res["timing"]["patterns_done"] == 4


def test_merged_shards_equal_a_sequential_run(shards, sequential, tmp_path):
    seq, seq_path = sequential
    out = tmp_path / "merged.json"
    merged = merge_campaigns(shards, out)
    assert _no_timing(merged) == _no_timing(seq)
    assert _no_timing(json.loads(out.read_text())) == _no_timing(json.loads(seq_path.read_text()))
    assert out.with_suffix(".csv").read_text() == seq_path.with_suffix(".csv").read_text()
    assert "patterns" not in json.dumps(merged["results"])  # a complete result lists every pattern


@pytest.mark.parametrize("per_pass", [1, 3])
def test_shards_in_any_order_and_with_stacked_passes(model_and_data, tmp_path, per_pass):
    seq = _run(model_and_data, patterns_per_pass=per_pass)
    parts = [_run(model_and_data, shard=(i, 5), patterns_per_pass=per_pass) for i in (4, 2, 5, 1, 3)]
    merged = merge_results([(f"s{i}", r) for i, r in enumerate(parts)])
    assert _no_timing(merged) == _no_timing(seq)


def test_cli_shards_and_merge(model_and_data, sequential, tmp_path, capsys):
    """``qmargin evaluate --shard`` (on a user's model) and ``qmargin merge`` through the CLI."""
    import numpy as np
    from safetensors.torch import save_file

    _, (x, y) = model_and_data
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
        "--data", f"npz:{npz}", "--ber", "0,0.05", "--repeats", "3", "--bits", "4", "--no-plot", "--quiet",
    ]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "seq.json")]) == 0
    for i in (1, 2):
        assert main([*common, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}.json")]) == 0
    out = capsys.readouterr().out
    assert "shard 2/2: 3 cells" in out
    code = main(
        ["merge", str(tmp_path / "s1.json"), str(tmp_path / "s2.json"), "--out", str(tmp_path / "m.json")]
    )
    assert code == 0
    seq = json.loads((tmp_path / "seq.json").read_text())
    merged = json.loads((tmp_path / "m.json").read_text())
    assert _no_timing(merged) == _no_timing(seq)
    assert (tmp_path / "m.csv").read_text() == (tmp_path / "seq.csv").read_text()
    assert "wrote" in capsys.readouterr().out


def _cli_error(argv: list[str], capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_merge_refuses_shards_of_other_campaigns(model_and_data, shards, tmp_path, capsys):
    other = tmp_path / "other.json"
    _run(model_and_data, other, shard=(3, 3), error_model=BitErrorModel(ber=0.0, protected_bits=(3,)))
    line = _cli_error(
        ["merge", str(shards[0]), str(shards[1]), str(other), "--out", str(tmp_path / "m.json")], capsys
    )
    assert "error_model.protected_bits [] -> [3]" in line, line
    assert not (tmp_path / "m.json").exists()
    seeds = tmp_path / "seeds.json"
    _run(model_and_data, seeds, shard=(3, 3), base_seed=8)
    line = _cli_error(["merge", *map(str, shards[:2]), str(seeds), "--out", str(tmp_path / "m.json")], capsys)
    assert "base_seed 7 -> 8" in line


def test_merge_refuses_a_cell_given_twice_and_missing_cells(shards, tmp_path, capsys):
    dup = tmp_path / "dup.json"
    dup.write_bytes(shards[0].read_bytes())
    line = _cli_error(["merge", *map(str, shards), str(dup), "--out", str(tmp_path / "m.json")], capsys)
    assert "both hold the cell BER 0, pattern 0" in line, line
    line = _cli_error(["merge", str(shards[0]), str(shards[0]), "--out", str(tmp_path / "m.json")], capsys)
    assert "given twice" in line
    line = _cli_error(["merge", str(shards[0]), str(shards[2]), "--out", str(tmp_path / "m.json")], capsys)
    assert "4 of 12 cells are missing" in line and "not given: shard 2/3" in line, line
    assert not (tmp_path / "m.json").exists()
    line = _cli_error(["merge", str(shards[0]), str(shards[1]), "--out", str(shards[0])], capsys)
    assert "input" in line, line


def test_a_partial_merge_resumes_to_the_sequential_result(model_and_data, shards, sequential, tmp_path):
    out = tmp_path / "partial.json"
    part = merge_campaigns(shards[:2], out, allow_partial=True)
    assert part["status"] == "partial" and part["timing"]["patterns_done"] == 8
    assert load_campaign(out)["status"] == "partial"
    calls = []
    done = _run(model_and_data, out, progress=calls.append)
    assert len(calls) == 4  # only the cells of the missing shard are computed
    assert _no_timing(done) == _no_timing(sequential[0])


def test_a_shard_resumes_and_refuses_another_shard(model_and_data, shards, tmp_path):
    res = load_campaign(shards[0])
    part = tmp_path / "s1.json"
    cut = json.loads(json.dumps(res))
    cut["status"] = "partial"
    entry = cut["results"][2]
    for key in ("accuracies", "patterns"):
        entry[key] = entry[key][:1]
    entry.update(
        {
            "mean": entry["accuracies"][0],
            "std": 0.0,
            "min": entry["accuracies"][0],
            "max": entry["accuracies"][0],
        }
    )
    part.write_text(json.dumps(cut))
    calls = []
    again = _run(model_and_data, part, shard=(1, 3), progress=calls.append)
    assert len(calls) == len(res["results"][2]["patterns"]) - 1
    assert _no_timing(again) == _no_timing(res)
    with pytest.raises(ConfigError, match="holds shard 1/3, this run is shard 2/3"):
        _run(model_and_data, part, shard=(2, 3))
    with pytest.raises(ConfigError, match="holds shard 1/3, this run is the whole campaign"):
        _run(model_and_data, part)
    with pytest.raises(ConfigError, match="only 12 cells"):
        _run(model_and_data, shard=(1, 13))
    with pytest.raises(ConfigError, match="1 <= I <= N"):
        _run(model_and_data, shard=(0, 3))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d["results"][0]["patterns"].__setitem__(0, 1), "outside shard 1/3"),
        (lambda d: d["results"][0].pop("patterns"), "has no patterns"),
        (lambda d: d["shard"].__setitem__("index", 4), "shard.index"),
        (lambda d: d["shard"].__setitem__("count", 13), "shard.count"),
        (lambda d: d["results"][0]["patterns"].reverse(), "ascending"),
        (lambda d: d["results"][1]["patterns"].append(3), "patterns"),
    ],
)
def test_a_damaged_shard_is_refused(shards, tmp_path, edit, match):
    data = json.loads(shards[0].read_text())
    edit(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=match):
        load_campaign(bad)


@pytest.mark.parametrize("value", ["0/4", "5/4", "1/0", "x", "1/2/3", "1.5/2"])
def test_the_shard_flag_refuses_bad_values(value, tmp_path, capsys):
    line = _cli_error(["evaluate", str(tmp_path), "--shard", value], capsys)
    assert "--shard" in line
