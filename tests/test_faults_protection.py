"""Parity memory, the flag DUE policy, per-layer protection specs and their overhead (issue 12, part 2)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qmargin.engine import run_campaign
from qmargin.engine.evaluation import Evaluation
from qmargin.engine.store import csv_text, load_campaign
from qmargin.errors import ConfigError
from qmargin.faults import (
    SECDED,
    BitErrorModel,
    ComposedErrorModel,
    FaultModel,
    Parity,
    ProtectedErrorModel,
    ProtectionSpec,
    RandomFlips,
    Selection,
    inject,
    route,
)
from qmargin.faults.functional import make_generator
from qmargin.interop import stored_code_groups
from qmargin.quant import QuantSpec, quantize_model, quantized_modules
from qmargin.stats import summarize_accuracies

# -- parity: the law ---------------------------------------------------------------------------------


def _parity_outcomes_sparse(p: float, n_words: int, seed: int) -> np.ndarray:
    """(no raw error, undetected data error, DUE) counts from the real kind on 8-bit words, one parity
    bit per word, DUE policy zero: a DUE word reads 0x00, an undetected one differs from 0xFF."""
    codes = torch.full((n_words,), 0xFF, dtype=torch.uint8)
    res = Parity(p, k=8, due="zero").apply_(codes, 8, make_generator(seed), frozenset())
    due = int((codes == 0).sum())
    assert res.n_due == due  # the count the campaign stores equals the DUE words
    undetected = int(((codes != 0) & (codes != 0xFF)).sum())
    return np.array([n_words - due - undetected, undetected, due])


def _parity_outcomes_dense(p: float, n_words: int, seed: int) -> np.ndarray:
    """Independent reference: 9 Bernoulli(p) bits per codeword (8 data + parity), classified by the
    parity check (odd count: DUE; even and a data bit hit: undetected)."""
    rng = np.random.default_rng(seed)
    e = rng.random((n_words, 9)) < p
    odd = e.sum(axis=1) % 2 == 1
    data_hit = e[:, :8].any(axis=1)
    undetected = ~odd & data_hit
    return np.array([int((~odd & ~data_hit).sum()), int(undetected.sum()), int(odd.sum())])


def test_parity_law_matches_an_independent_dense_simulation():
    """Chi-square test of the three outcomes (p = 0.05, 9-bit codewords: every category populated);
    fixed seeds. Also the analytic DUE probability (1 - (1 - 2p)^n) / 2."""
    p, n = 0.05, 40000
    sparse = _parity_outcomes_sparse(p, n, seed=3)
    dense = _parity_outcomes_dense(p, n, seed=4)
    assert (sparse > 100).all() and (dense > 100).all(), (sparse, dense)
    _, pval, _, _ = stats.chi2_contingency(np.stack([sparse, dense]))
    assert pval > 1e-3, (sparse, dense, pval)
    q_due = (1 - (1 - 2 * p) ** 9) / 2
    assert abs(sparse[2] / n - q_due) < 4 * math.sqrt(q_due * (1 - q_due) / n)
    q_clean = (1 - p) ** 9
    assert abs(sparse[0] / n - q_clean) < 4 * math.sqrt(q_clean * (1 - q_clean) / n)


def test_parity_packs_codes_into_wider_words():
    """k = 32 over 4-bit codes: 8 codes per codeword; a zeroed DUE clears whole groups of 8 codes."""
    codes = torch.full((800,), 0x5, dtype=torch.uint8)
    res = Parity(0.05, k=32, due="zero").apply_(codes, 4, make_generator(0), frozenset())
    groups = codes.reshape(-1, 8)
    zeroed = (groups == 0).all(dim=1)
    assert res.n_due == int(zeroed.sum()) > 0
    with pytest.raises(ConfigError, match="whole 3-bit words"):
        Parity(0.1, k=32).apply_(torch.zeros(10, dtype=torch.uint8), 3, make_generator(0), frozenset())


# -- the flag policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [SECDED, Parity])
def test_flag_leaves_the_data_as_keep_and_counts_the_dues(kind):
    out = {}
    for due in ("keep", "flag", "zero"):
        codes = torch.randint(0, 16, (4000,), dtype=torch.uint8, generator=make_generator(9))
        res = kind(0.02, k=32, due=due).apply_(codes, 4, make_generator(1), frozenset())
        out[due] = (codes, res.n_due)
    assert torch.equal(out["keep"][0], out["flag"][0])
    assert out["keep"][1] == out["flag"][1] == out["zero"][1] > 0  # every policy counts the DUEs
    assert not torch.equal(out["zero"][0], out["flag"][0])


def _model(bits: int = 4) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    quantize_model(m, QuantSpec(bits))
    for _, q in quantized_modules(m):
        q.freeze()
    return m.eval()


def _codes(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: q.stored("weight").codes.clone() for n, q in quantized_modules(m)}


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_campaign_records_dues_per_pattern_and_the_flagged_fraction(tmp_path):
    m = _model()
    out = tmp_path / "r.json"
    em = ProtectedErrorModel("0=secded32:flag,2=parity", ber=0.0)
    res = run_campaign(
        m, Evaluation(_data()), bers=[0.0, 1e-3, 0.03], repeats=4, base_seed=0, error_model=em, out_path=out
    )
    assert res["evaluation"]["count_dues"] is True and res["schema_version"] == 4
    r0, r1, r2 = res["results"]
    assert r0["dues"] == [0] * 4 and r0["flagged"] == 0.0 and r0["unflagged_mean"] == r0["mean"]
    assert len(r2["dues"]) == 4 and all(d > 0 for d in r2["dues"]) and r2["flagged"] == 1.0
    assert r2["unflagged_mean"] is None
    assert r1["flagged"] == sum(d > 0 for d in r1["dues"]) / 4
    # the per-pattern count is the injection's n_due, pattern by pattern
    for r, seed in enumerate(res["seeds"]):
        with inject(m, em.with_ber(0.03), seed) as report:
            assert report.n_due == r2["dues"][r]
    stored = load_campaign(out)  # validated, including flagged / unflagged_mean against dues
    assert stored["results"][2]["dues"] == r2["dues"]
    assert csv_text(stored).splitlines()[0].endswith(",dues")
    tampered = json.loads(out.read_text())
    tampered["results"][1]["flagged"] = 0.5 if r1["flagged"] != 0.5 else 0.25
    out.write_text(json.dumps(tampered))
    with pytest.raises(Exception, match="flagged"):
        load_campaign(out)
    plain = run_campaign(m, Evaluation(_data()), bers=[0.01], repeats=2, base_seed=0)
    assert "dues" not in plain["results"][0] and "count_dues" not in plain["evaluation"]


# -- specs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("secded64", "secded64"),
        ("SECDED", "secded64"),
        ("secded(72,64)", "secded64"),
        ("secded( 39 , 32 ):zero", "secded32:zero"),
        ("*=none", "none"),
        ("conv*=msb2, fc3=secded64 ,*=none", "conv*=msb2,fc3=secded64,*=none"),
        ("fc*=parity8:flag", "fc*=parity8:flag"),
        ("parity", "parity"),
        ("features.0=secded(72,64):flag,*=msb1", "features.0=secded64:flag,*=msb1"),
    ],
)
def test_spec_parsing(text, canonical):
    spec = ProtectionSpec.parse(text)
    assert spec.text == canonical
    assert ProtectionSpec.parse(spec.text) == spec  # the canonical text reads back the same


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("tmr3", "unknown protection scheme"),
        ("msb0", "K in 1..8"),
        ("msb9", "K in 1..8"),
        ("msb", "K in 1..8"),
        ("secded0", "1..1024"),
        ("secded(73,64)", "(72,64)"),
        ("parity:maybe", "DUE policy"),
        ("parity:", "DUE policy"),
        ("none:flag", "detects nothing"),
        ("msb2:zero", "detects nothing"),
        ("*=none,fc=msb1", "never match"),
        ("fc=msb1,fc=none", "twice"),
        ("fc=msb1,,*=none", "empty rule"),
        ("=msb1", "pattern"),
        ("f c=msb1", "pattern"),
        ("none4", "no width"),
    ],
)
def test_bad_specs_are_config_errors(text, needle):
    with pytest.raises(ConfigError, match=None) as err:
        ProtectionSpec.parse(text)
    assert needle in str(err.value), str(err.value)


# -- the plan on a model ----------------------------------------------------------------------------------


def _group(m: nn.Module, layer: str):
    return next(g for _, g in stored_code_groups(m) if g[0][0] == layer)


def test_each_layer_gets_the_kind_of_its_first_matching_rule():
    m = _model()
    em = ProtectedErrorModel("2=msb3,*=secded64:zero", ber=0.01)
    kinds0, prot0 = route(em, _group(m, "0"))
    kinds2, prot2 = route(em, _group(m, "2"))
    assert [type(k) for k in kinds0] == [SECDED] and kinds0[0].due == "zero" and prot0 == ()
    assert [type(k) for k in kinds2] == [RandomFlips] and prot2 == (-3, -2, -1)
    # behaviour: at p = 0.5 the top 3 bits of layer 2 never change; layer 0 sees DUEs
    clean = _codes(m)
    with inject(m, em.with_ber(0.5), 7) as report:
        codes2 = m[2].stored("weight").codes
        assert torch.equal((codes2.to(torch.int16) & 0b1110), (clean["2"].to(torch.int16) & 0b1110))
        assert not torch.equal(codes2, clean["2"])
        by_layer = {t.layer: t for t in report.tensors}
        assert by_layer["0"].n_due > 0 and by_layer["2"].n_due == 0
    assert all(torch.equal(q.stored("weight").codes, clean[n]) for n, q in quantized_modules(m))


def test_unprotected_layers_see_the_plain_patterns():
    """A layer under ``none`` (or no rule) draws exactly what BitErrorModel draws: same stream."""
    m = _model()
    with inject(m, BitErrorModel(ber=0.02), 5):
        plain = _codes(m)
    with inject(m, ProtectedErrorModel("0=secded64", ber=0.02), 5):
        mixed = _codes(m)
    assert torch.equal(mixed["2"], plain["2"]) and not torch.equal(mixed["0"], plain["0"])


def test_composed_error_model_routes_first_match_and_spares_the_rest():
    m = _model()
    em = ComposedErrorModel((FaultModel((RandomFlips(0.3, 0.3),), Selection(layers="2")),))
    assert route(em, _group(m, "0")) is None
    clean = _codes(m)
    with inject(m, em, 0) as report:
        assert [t.layer for t in report.tensors] == ["2"]
        assert torch.equal(m[0].stored("weight").codes, clean["0"])


def test_overhead_on_a_known_model():
    m = _model()  # layer 0: 64 x 64 = 4096 codes, layer 2: 64 x 10 = 640 codes, 4 bits
    plan = ProtectedErrorModel("0=secded64,2=parity", ber=0.01).plan(m)
    e0, e2 = plan.entries
    assert (e0.data_bits, e0.extra_bits, e0.overhead) == (16384, 256 * 8, 0.125)
    assert (e2.data_bits, e2.extra_bits, e2.overhead) == (2560, 640, 0.25)  # one bit per 4-bit word
    assert plan.overhead == pytest.approx((2048 + 640) / (16384 + 2560))
    # secded32 on 2560 bits: 80 codewords of 39 bits; parity16: 160 of 17; msb2: no extra bits
    plan = ProtectedErrorModel("2=secded(39,32),0=msb2", ber=0.01).plan(m)
    by = {e.layer: e for e in plan.entries}
    assert by["2"].extra_bits == 80 * 7 and by["0"].extra_bits == 0 and by["0"].hardened_bits == 4096 * 2
    odd = nn.Sequential(nn.Linear(5, 3))  # 15 codes x 4 bits = 60 bits: one padded 64-bit codeword
    quantize_model(odd, QuantSpec(4))
    e = ProtectedErrorModel("secded64", ber=0.01).plan(odd).entries[0]
    assert e.extra_bits == 72 - 60
    d = plan.to_dict()
    assert d["spec"] == "2=secded32,0=msb2" and {t["layer"] for t in d["tensors"]} == {"0", "2"}


def test_plan_errors_name_the_rule():
    m = _model()
    with pytest.raises(ConfigError, match="'conv\\*=msb1' matches no layer"):
        ProtectedErrorModel("conv*=msb1", ber=0.01).plan(m)
    with pytest.raises(ConfigError, match="protects 5 bits"):
        ProtectedErrorModel("msb5", ber=0.01).plan(m)
    m3 = _model(bits=3)
    with pytest.raises(ConfigError, match="multiple of 3"):
        ProtectedErrorModel("secded64", ber=0.01).plan(m3)
    with pytest.raises(ConfigError, match="nested"):
        ProtectedErrorModel("secded64", ber=0.01, nested_max=0.1)


def test_campaign_result_holds_the_plan_and_overhead(tmp_path):
    m = _model()
    res = run_campaign(
        m,
        Evaluation(_data()),
        bers=[0.01],
        repeats=2,
        base_seed=0,
        error_model=ProtectedErrorModel("2=msb1", ber=0.0),
        out_path=tmp_path / "r.json",
    )
    plan = json.loads((tmp_path / "r.json").read_text())["protection"]
    assert plan == res["protection"] and plan["spec"] == "2=msb1" and plan["overhead"] == 0.0
    assert [t["scheme"] for t in plan["tensors"]] == ["none", "msb1"]
    assert res["error_model"]["protection"] == "2=msb1"
    assert "count_dues" not in res["evaluation"]  # msb detects nothing


# -- the command line ------------------------------------------------------------------------------------


def _cli(*args: str, capsys: pytest.CaptureFixture[str] | None = None) -> subprocess.CompletedProcess:
    """``qmargin ARGS``: in this process when ``capsys`` is given (fast), else as ``python -m qmargin``."""
    if capsys is None:
        return subprocess.run(
            [sys.executable, "-m", "qmargin", *args], capture_output=True, text=True, timeout=300
        )
    from qmargin.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)


def _one_line_exit_2(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: ") and needle in lines[0], proc.stderr


def test_cli_protect_end_to_end_and_user_errors(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _cli(
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--bits",
        "4",
        "--epochs",
        "1",
        "--hidden",
        "32",
        "--out",
        str(run),
        "--quiet",
        "--device",
        "cpu",
        capsys=capsys,
    )
    assert proc.returncode == 0, proc.stderr
    _one_line_exit_2(_cli("evaluate", str(run), "--protect", "secded(73,64)"), "(72,64)")  # python -m qmargin
    _one_line_exit_2(_cli("evaluate", str(run), "--protect", "tmr3", capsys=capsys), "--protect")
    _one_line_exit_2(
        _cli(
            "evaluate",
            str(run),
            "--ber",
            "0.01",
            "--repeats",
            "1",
            "--protect",
            "conv*=msb2",
            "--out",
            str(tmp_path / "x.json"),
            capsys=capsys,
        ),
        "matches no layer",
    )
    assert not (tmp_path / "x.json").exists()
    _one_line_exit_2(
        _cli(
            "evaluate", str(run), "--ber", "0.01", "--protect", "msb1", "--protected-bits", "3", capsys=capsys
        ),
        "not both",
    )
    out = tmp_path / "p.json"
    proc = _cli(
        "evaluate",
        str(run),
        "--ber",
        "0,0.02",
        "--repeats",
        "2",
        "--protect",
        "fc3=secded64:flag,*=msb1",
        "--no-plot",
        "--quiet",
        "--device",
        "cpu",
        "--out",
        str(out),
        capsys=capsys,
    )
    assert proc.returncode == 0, proc.stderr
    assert "memory overhead" in proc.stdout and "of patterns flagged" in proc.stdout
    result = json.loads(out.read_text())
    plan = result["protection"]
    assert plan["spec"] == "fc3=secded64:flag,*=msb1"
    assert {t["layer"]: t["scheme"] for t in plan["tensors"]}["fc3"] == "secded64:flag"
    assert 0 < plan["overhead"] < 0.125 and len(result["results"][1]["dues"]) == 2


def test_cli_protect_with_a_users_model(tmp_path, monkeypatch, capsys):
    """--model: the plan covers the model's quantized layers; a rule naming no layer is exit 2."""
    from safetensors.torch import save_file

    from external_helpers import import_file, write_cnn, write_test_set
    from qmargin.cli import main

    monkeypatch.chdir(tmp_path)
    cnn = write_cnn(tmp_path)
    torch.manual_seed(3)
    model = import_file(cnn).make_cnn()
    write_test_set(tmp_path / "test.npz", model)
    save_file(model.state_dict(), tmp_path / "cnn.safetensors")
    base = [
        "evaluate",
        "--model",
        "mycnn.py:make_cnn",
        "--weights",
        "cnn.safetensors",
        "--data",
        "npz:test.npz",
        "--bits",
        "4",
        "--ber",
        "0.02",
        "--repeats",
        "2",
        "--no-plot",
        "--quiet",
        "--device",
        "cpu",
    ]

    def run(*extra: str) -> tuple[int, str, str]:
        try:
            code = main([*base, *extra])
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, err = run("--protect", "0=secded32:zero,*=parity", "--out", "r.json")
    assert code == 0, err
    plan = json.loads((tmp_path / "r.json").read_text())["protection"]
    assert [(t["layer"], t["scheme"]) for t in plan["tensors"]] == [
        ("0", "secded32:zero"),
        ("4", "parity"),
        ("8", "parity"),
    ]
    code, _, err = run("--protect", "fc*=msb1", "--out", "bad.json")
    assert code == 2 and err.count("\n") == 1 and "matches no layer" in err
    assert not (tmp_path / "bad.json").exists()


def test_activation_buffers_take_the_protection_of_their_layer():
    """SECDED (72,64) on activation buffers at p = 1e-3: a word fails only with >= 2 raw errors in its
    72 bits (probability ~2.5e-3), so far fewer code bits change than unprotected (p per bit)."""
    from qmargin.faults.activations import inject_activations
    from qmargin.quant.activations import ActivationQuantizers

    m = _model()
    q = ActivationQuantizers(m, QuantSpec(8))
    x = torch.randn(4096, m[0].in_features, generator=torch.Generator().manual_seed(0))
    q.calibrate([x])
    hits = {}
    models = {"none": BitErrorModel(ber=1e-3), "secded64": ProtectedErrorModel("secded64", ber=1e-3)}
    for name, em in models.items():
        with inject_activations(q, em, 0) as report:
            m(x)
        hits[name] = sum(report.bits_hit.values())
    assert hits["none"] > 100 and hits["secded64"] < hits["none"] / 10
    q.remove()


def test_zero_policy_acts_on_the_stored_words_of_the_format():
    """DUE 'zero' returns an all-zero data word: code 0 in two's complement, the most negative code
    (-8 at 4 bits) in offset binary (docs/bit-conventions.md, "Packing codes into ECC words")."""
    m = _model()
    for storage, expected in (("twos", 0), ("offset", -8)):
        em = ProtectedErrorModel("0=secded32:zero", ber=0.05, storage=storage)
        with inject(m, em, 2) as report:
            groups = m[0].stored("weight").codes.reshape(-1, 8)  # 8 four-bit codes per 32-bit word
            cleared = (groups == expected).all(dim=1)
            assert report.n_due > 0 and int(cleared.sum()) >= report.n_due, (storage, report.n_due)


def test_shards_merge_with_their_dues(tmp_path):
    from qmargin.engine.store import merge_results

    m = _model()
    em = ProtectedErrorModel("parity:flag", ber=0.0)
    kw = {"bers": [0.001, 0.01], "repeats": 3, "base_seed": 0, "error_model": em}
    whole = run_campaign(m, Evaluation(_data()), **kw)
    shards = [run_campaign(m, Evaluation(_data()), shard=(i, 2), **kw) for i in (1, 2)]
    merged = merge_results([("a", shards[0]), ("b", shards[1])])
    for a, b in zip(merged["results"], whole["results"], strict=True):
        assert a["dues"] == b["dues"] and a["flagged"] == b["flagged"]
    assert merged["protection"] == whole["protection"]


def test_a_protected_campaign_resumes_with_its_dues(tmp_path):
    m = _model()
    out = tmp_path / "r.json"
    kw = {"bers": [0.01], "repeats": 3, "base_seed": 0, "error_model": ProtectedErrorModel("secded32:flag")}
    first = run_campaign(m, Evaluation(_data()), out_path=out, **kw)
    partial = json.loads(out.read_text())  # cut the file back to two patterns, as an interrupted run
    row = partial["results"][0]
    for key in ("accuracies", "dues"):
        row[key] = row[key][:2]
    row.update(summarize_accuracies(row["accuracies"]))
    clean = [a for a, d in zip(row["accuracies"], row["dues"], strict=True) if d == 0]
    row["flagged"] = sum(d > 0 for d in row["dues"]) / 2
    row["unflagged_mean"] = sum(clean) / len(clean) if clean else None
    partial["status"] = "partial"
    out.write_text(json.dumps(partial))
    again = run_campaign(m, Evaluation(_data()), out_path=out, **kw)
    assert again["results"] == first["results"] and again["timing"]["patterns_done"] == 3
