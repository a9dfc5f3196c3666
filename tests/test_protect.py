"""``qmargin protect``: the knapsack, the plan spec, verification on a trained model, MonDEQ variant, CLI."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from qmargin.cli import main
from qmargin.engine.planner import Option, greedy_knapsack, plan_spec_text, solve_knapsack
from qmargin.errors import ConfigError
from qmargin.faults import ProtectedErrorModel, ProtectionSpec
from qmargin.models.mlp import MLP
from qmargin.quant import QuantSpec


def cli(capsys, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _brute(table, budget):
    best = None
    for picks in itertools.product(*[range(len(r)) for r in table]):
        drop = sum(max(0.0, table[i][j].drop) for i, j in enumerate(picks))
        if drop > budget + 1e-12:
            continue
        cost = sum(table[i][j].cost for i, j in enumerate(picks))
        if best is None or cost < best:
            best = cost
    return best


def test_knapsack_picks_the_cheapest_feasible_plan():
    table = [
        [Option("none", 0, 0.5), Option("msb1", 4, 0.1), Option("secded64", 1, 0.3)],
        [Option("none", 0, 0.4), Option("msb1", 8, 0.0), Option("secded64", 2, 0.35)],
    ]
    sol = solve_knapsack(table, 0.7)
    # none+none = 0.9 too much; secded64 + none = 0.7 at cost 1 is the cheapest feasible
    assert sol is not None and sol.picks == (2, 0) and sol.cost == 1 and sol.method == "exhaustive"
    sol = solve_knapsack(table, 0.1)
    assert sol is not None and sol.picks == (1, 1) and sol.cost == 12
    assert solve_knapsack(table, 0.05) is None  # even the strongest sums to 0.1
    # negative measured drops (noise) count as 0, they buy no budget for another layer
    neg = [[Option("a", 0, -0.5)], [Option("none", 0, 0.4), Option("b", 3, 0.0)]]
    assert solve_knapsack(neg, 0.1).picks == (0, 1)


def test_dp_equals_exhaustive_on_random_tables():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 5)
        table = [
            [Option(f"s{j}", rng.randint(0, 20), rng.randint(0, 30) / 100) for j in range(rng.randint(1, 4))]
            for _ in range(n)
        ]
        budget = rng.randint(0, 60) / 100
        want = _brute(table, budget)
        ex = solve_knapsack(table, budget)
        grid = max(1, round(budget * 100))  # unit 0.01: the drops lie on the grid, the DP is exact
        dp = solve_knapsack(table, budget, exhaustive_limit=0, grid=grid)
        if want is None:
            assert ex is None and dp is None
            continue
        assert ex is not None and dp is not None and dp.method.startswith("dp")
        assert ex.cost == want and dp.cost == want and dp.drop <= budget + 1e-9


def test_greedy_is_suboptimal_where_the_exact_search_is_not():
    table = [
        [Option("none", 0, 0.5), Option("a1", 1.0, 0.0)],
        [Option("none", 0, 0.5), Option("b1", 1.5, 0.0), Option("bc", 0.15, 0.4)],
    ]
    greedy = greedy_knapsack(table, 0.5)
    exact = solve_knapsack(table, 0.5)
    dp = solve_knapsack(table, 0.5, exhaustive_limit=0)
    assert greedy is not None and greedy.picks == (1, 2) and greedy.cost == pytest.approx(1.15)
    assert exact is not None and exact.picks == (1, 0) and exact.cost == 1.0
    assert dp is not None and dp.picks == (1, 0)


def test_plan_spec_round_trips_through_the_parser():
    torch.manual_seed(0)
    model = MLP(64, 10, (48, 32), spec=QuantSpec(4)).eval()
    assign = {"fc1": "msb1", "fc2": "none", "fc3": "secded(72,64)"}
    text = plan_spec_text(assign)
    assert text == "fc1=msb1,fc3=secded64"
    assert ProtectionSpec.parse(text).text == text
    plan = ProtectedErrorModel(text).plan(model)
    got = {e.layer: e.scheme for e in plan.entries}
    assert got == {"fc1": "msb1", "fc2": "none", "fc3": "secded64"}
    assert plan_spec_text({"fc1": "msb2", "fc2": "msb2"}) == "msb2"
    assert plan_spec_text({"fc1": "none", "fc2": "none"}) == "none"
    assert plan_spec_text({"a[1]": "msb1", "b": "none"}) == "a[[]1]=msb1"
    with pytest.raises(ConfigError):
        plan_spec_text({"a,b": "msb1", "c": "none"})


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("protect") / "run"
    code = main(
        ["train", "--dataset", "digits", "--model", "mlp", "--bits", "4", "--epochs", "5", "--seed", "0",
         "--out", str(run), "--quiet", "--device", "cpu"]
    )  # fmt: skip
    assert code in (0, None)
    return run


def test_verified_plan_meets_the_target_and_is_cheaper_than_full_protection(mlp_run, capsys):
    from qmargin.experiments.protect import protect_run

    res = protect_run(mlp_run, ber=0.05, max_drop=2.0, patterns=5, device="cpu")
    assert res["schema"] == "qmargin.protection-plan" and res["feasible"]
    plan, refs = res["plan"], res["references"]
    assert plan["drop"]["mean"] <= 0.02 + 1e-12
    assert refs["unprotected"]["drop"]["mean"] > 0.02  # the target needs protection at all
    full = refs["full_protection"]
    assert full is not None and plan["cost"] < full["cost"]
    # the overhead of the library's ProtectionPlan is the planner's
    assert plan["protection_plan_overhead"] == pytest.approx(plan["overhead"])
    # verification = a campaign of `qmargin evaluate --protect SPEC` with the same seeds
    out = mlp_run / "check.json"
    code, _, err = cli(
        capsys, "evaluate", mlp_run, "--protect", plan["spec"], "--ber", "0.05", "--repeats", "5",
        "--seed", str(res["base_seed"]), "--out", out, "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    campaign = json.loads(out.read_text())
    point = next(r for r in campaign["results"] if r["ber"] == 0.05)
    assert point["accuracies"] == pytest.approx(plan["values"])
    assert res["trace"][-1]["meets_target"] and res["trace"][-1]["spec"] == plan["spec"]


def test_infeasible_target_is_reported_exit_1(mlp_run, capsys):
    out = mlp_run / "infeasible.json"
    code, stdout, err = cli(
        capsys, "protect", mlp_run, "--ber", "0.1", "--max-drop", "0", "--choices", "none,secded64",
        "--patterns", "3", "--out", out, "-q", "--device", "cpu",
    )  # fmt: skip
    assert code == 1, err
    res = json.loads(out.read_text())
    assert res["feasible"] is False and res["plan"] is None and res["best_attempt"] is not None
    assert not res["trace"][-1]["meets_target"]
    assert "no plan meets" in stdout


def test_cli_writes_the_plan_json(mlp_run, capsys):
    code, stdout, err = cli(
        capsys, "protect", mlp_run, "--ber", "0.05", "--max-drop", "2", "--patterns", "3", "-q",
        "--device", "cpu", "--hardened-cost", "0.5", "--choices", "none,msb1,msb2,secded(72,64)",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((mlp_run / "protect.json").read_text())
    assert res["hardened_cost"] == 0.5 and res["max_drop"] == pytest.approx(0.02)
    assert res["choices"] == ["none", "msb1", "msb2", "secded64"]
    assert [la["layer"] for la in res["layers"]] == ["fc1", "fc2", "fc3"]
    for la in res["layers"]:
        for e in la["schemes"]:
            assert len(e["drops"]) == 3 and e["ci_low"] <= e["mean_drop"] <= e["ci_high"]
    assert f"plan: --protect {res['plan']['spec']}" in stdout
    ProtectionSpec.parse(res["plan"]["spec"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ber", "0.05", "--choices", "msb1,bogus"], "unknown protection scheme"),
        (["--ber", "0.05", "--choices", "fc1=msb1"], "not rules"),
        (["--ber", "0.05", "--choices", " , "], "at least one scheme"),
        (["--ber", "0.05", "--max-drop", "-1"], "--max-drop"),
        ([], "--ber"),
        (["--certify-flips", "3"], "MonDEQ"),
    ],
)
def test_cli_bad_input_exit_2(mlp_run, capsys, args, needle):
    out = mlp_run / "bad.json"
    code, _, err = cli(capsys, "protect", mlp_run, "--out", out, "-q", "--device", "cpu", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_mondeq_certified_variant_picks_the_smallest_k(tmp_path, capsys):
    from qmargin.experiments.protect import certify_flips_plan

    run = tmp_path / "mon"
    code, _, err = cli(
        capsys, "train", "--dataset", "digits", "--model", "mondeq", "--bits", "8", "--hidden", "16",
        "--epochs", "1", "--out", run, "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    base = certify_flips_plan(run, flips=0)
    flips = [r["max_flips"] for r in base["rows"][:-1]]
    assert base["plan"]["k"] == 0  # zero flips: nothing to protect
    target = max(f for f in flips if f is not None) if any(f is not None for f in flips) else 1
    res = certify_flips_plan(run, flips=target, out_path=tmp_path / "c.json")
    k = res["plan"]["k"]
    for row in res["rows"]:
        ok = row["all_bits_hardened"] or (row["max_flips"] is not None and row["max_flips"] >= target)
        assert row["certified"] == ok
    assert all(not r["certified"] for r in res["rows"][:k]) and res["rows"][k]["certified"]
    assert res["plan"]["spec"] == f"mon.core=msb{k}" if k else res["plan"]["spec"] == "none"
    assert json.loads((tmp_path / "c.json").read_text())["plan"]["k"] == k
    code, stdout, err = cli(
        capsys, "protect", run, "--certify-flips", str(target), "--out", tmp_path / "d.json"
    )
    assert code == 0, err
    assert (f"cheapest: msb{k} " in stdout) and "certified flips" in stdout


_DROPS = {"none": 0.3, "msb1": 0.1, "msb2": 0.05}


def _fake_run_cells(model, evaluation, make_cells, *, seeds, template, full=None, **_):
    """Per-layer drops from ``_DROPS``; a whole-model run loses 1.6x their sum (not additive), or
    ``full(schemes by layer)``."""
    from qmargin.engine.cells import prepared
    from qmargin.engine.sensitivity import CellsRun, stored_layers

    with prepared(model, torch.device("cpu"), template):
        layers = stored_layers(model, template)
    out = []
    for cell in make_cells(layers):
        (em,) = cell.error_models
        if cell.kind == "layer":
            d = _DROPS[em.spec.rules[0].scheme.text]
        elif full is not None:
            d = full({la.name: em.spec.scheme_for(la.name)[1].text for la in layers})
        else:
            d = 1.6 * sum(_DROPS[em.spec.scheme_for(la.name)[1].text] for la in layers)
        drops = [d - 0.001, d, d + 0.001][: len(seeds)]
        out.append(
            {"values": [0.9 - x for x in drops], "drops": drops, "mean_drop": d, "std_drop": 0.0008,
             "ci_low": d - 0.002, "ci_high": d + 0.002, "observed_ber": 0.01, "seconds": 0.0}
        )  # fmt: skip
    return CellsRun(0.9, 10, layers, out, {"used": False}, {"model_sha256": "x"})


def _two_layers():
    torch.manual_seed(0)
    return MLP(8, 4, (6,), spec=QuantSpec(4)).eval()  # fc1, fc2


def test_verification_tightens_the_budget_until_the_plan_holds(monkeypatch):
    from qmargin.engine import Evaluation, planner

    monkeypatch.setattr(planner, "run_cells", _fake_run_cells)
    data = (torch.randn(10, 8), torch.randint(0, 4, (10,)))
    res = planner.plan_protection(
        _two_layers(), Evaluation(data), ber=0.01, max_drop=0.4, choices=("none", "msb1", "msb2"), patterns=3
    )
    trace = res["trace"]
    # round 1: none + msb1 sums to 0.4 but loses 0.64; the budget shrinks to 0.4 * 0.4 / 0.64 = 0.25
    assert [t["meets_target"] for t in trace] == [False, True]
    assert trace[0]["estimated_drop"] == pytest.approx(0.4) and trace[0]["verified_drop"] == pytest.approx(
        0.64
    )
    assert trace[1]["budget"] == pytest.approx(0.25) and trace[1]["spec"] == "msb1"
    assert (
        res["feasible"]
        and res["plan"]["spec"] == "msb1"
        and res["plan"]["drop"]["mean"] == pytest.approx(0.32)
    )
    assert res["references"]["full_protection"]["spec"] == "msb2"


def test_no_plan_when_even_the_strongest_misses(monkeypatch):
    from qmargin.engine import Evaluation, planner

    monkeypatch.setattr(planner, "run_cells", _fake_run_cells)
    data = (torch.randn(10, 8), torch.randint(0, 4, (10,)))
    res = planner.plan_protection(
        _two_layers(), Evaluation(data), ber=0.01, max_drop=0.12, choices=("none", "msb1", "msb2"), patterns=3
    )
    # the knapsack finds msb2 + msb2 (0.1 <= 0.12); it loses 0.16; no cheaper-or-stronger plan is left
    assert not res["feasible"] and res["plan"] is None
    assert len(res["trace"]) == 1 and res["best_attempt"]["spec"] == "msb2"  # not verified twice
    assert res["strongest_tried"]
    # one round, a plan the knapsack finds and that misses: the strongest was not tried
    one = planner.plan_protection(
        _two_layers(), Evaluation(data), ber=0.01, max_drop=0.4, choices=("none", "msb1", "msb2"), patterns=3,
        rounds=1,
    )  # fmt: skip
    assert not one["feasible"] and not one["strongest_tried"]


def test_strict_targets_the_upper_end_of_the_ci(monkeypatch):
    from qmargin.engine import Evaluation, planner

    monkeypatch.setattr(planner, "run_cells", _fake_run_cells)
    data = (torch.randn(10, 8), torch.randint(0, 4, (10,)))
    kw = {"ber": 0.01, "choices": ("none", "msb1", "msb2"), "patterns": 3}
    # msb1 everywhere loses 0.32 (CI up to 0.322): the mean meets 0.321, the CI does not
    loose = planner.plan_protection(_two_layers(), Evaluation(data), max_drop=0.321, **kw)
    strict = planner.plan_protection(_two_layers(), Evaluation(data), max_drop=0.321, strict=True, **kw)
    assert loose["plan"]["spec"] == "msb1" and strict["plan"]["spec"] != "msb1"
    assert strict["plan"]["drop"]["ci_high"] <= 0.321 and strict["strict"]


def test_a_repeated_refused_plan_takes_the_best_verified_one_layer_step(monkeypatch):
    import functools

    from qmargin.engine import Evaluation, planner

    # every layer measures 0 alone, yet the whole model loses 0.3 unless fc1 (48 of 72 weights) is protected
    monkeypatch.setitem(_DROPS, "none", 0.0)
    monkeypatch.setitem(_DROPS, "msb1", 0.0)
    fake = functools.partial(_fake_run_cells, full=lambda s: 0.3 if s["fc1"] == "none" else 0.0)
    monkeypatch.setattr(planner, "run_cells", fake)
    data = (torch.randn(10, 8), torch.randint(0, 4, (10,)))
    res = planner.plan_protection(
        _two_layers(), Evaluation(data), ber=0.01, max_drop=0.1, choices=("none", "msb1", "msb2"), patterns=3
    )
    trace = res["trace"]
    assert [t["spec"] for t in trace] == ["none", "fc1=msb1"]
    assert trace[1]["method"] == "upgrade" and "fc1 up to msb1" in trace[1]["note"]
    # both one-layer steps were verified; fc2's alone leaves the drop at 0.3
    assert sorted(t["spec"] for t in trace[1]["tried"]) == ["fc1=msb1", "fc2=msb1"]
    assert res["feasible"] and res["plan"]["spec"] == "fc1=msb1"


def test_cli_on_your_own_model(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    from external_helpers import import_file, write_cnn, write_test_set

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    model = import_file(write_cnn(tmp_path)).make_cnn()
    write_test_set(tmp_path / "test.npz", model)
    save_file(model.state_dict(), tmp_path / "cnn.safetensors")
    code, stdout, err = cli(
        capsys, "protect", "--model", "mycnn.py:make_cnn", "--weights", "cnn.safetensors", "--data",
        "npz:test.npz", "--bits", "4", "--ber", "0.02", "--max-drop", "5", "--patterns", "3",
        "--out", "p.json", "-q", "--device", "cpu",
    )  # fmt: skip
    assert code in (0, 1), err
    res = json.loads((tmp_path / "p.json").read_text())
    assert [la["layer"] for la in res["layers"]] == ["0", "4", "8"]
    assert res["config"]["model"] == "mycnn.py:make_cnn" and res["weights"]["sha256"]
    assert res["feasible"] == (code == 0)
    code, _, err = cli(capsys, "protect", "mycnn.py:make_cnn", "--ber", "0.1", "--out", "q.json")
    assert code == 2 and "--data" in err
