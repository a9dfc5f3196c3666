"""Fast versions of every experiment (the full ones are `qmargin reproduce ...`, minutes to hours)."""

from __future__ import annotations

import json

import pytest

from qmargin.experiments.ablation import AblationPoint, run_mcel_ablation, select_default
from qmargin.experiments.demo import run_demo
from qmargin.experiments.mcel import METHODS, MHL_BINARY, Preset, run_mcel_reproduction
from qmargin.experiments.mondeq import MonDEQPreset, run_mondeq_reproduction


def _recorder() -> tuple[list[tuple[int, int, str]], object]:
    calls: list[tuple[int, int, str]] = []
    return calls, lambda done, total, label: calls.append((done, total, label))


def _assert_steps(calls: list[tuple[int, int, str]], labels: list[str]) -> None:
    """A reproduction's progress: (0, T, "") at the start, then each step once, in order, up to T of T."""
    total = len(labels)
    assert calls == [(0, total, ""), *[(i + 1, total, lab) for i, lab in enumerate(labels)]]


def test_demo_fast(tmp_path):
    out = run_demo(epochs=2, bers=(0.0, 0.01, 0.2), repeats=2, out_dir=tmp_path, mondeq_epochs=1)
    labels = [label for label, _ in out["campaigns"]]
    assert labels == ["CE 4-bit", "MCEL 4-bit"]
    for _, camp in out["campaigns"]:
        assert [r["ber"] for r in camp["results"]] == [0.0, 0.01, 0.2]
        assert camp["results"][0]["mean"] == camp["clean_accuracy"]
        # a BER of 0.2 flips about one bit in five: accuracy must collapse towards chance
        assert camp["results"][-1]["mean"] < camp["clean_accuracy"] - 0.2
    assert [c["bits"] for c in out["certificates"]] == [3, 4, 5, 6, 8]
    for c in out["certificates"]:
        assert c["certified"] == (c["delta_w_norm"] < c["margin"])
        if c["certified"]:
            assert c["margin_quantized"] > 0
    norms = [c["delta_w_norm"] for c in out["certificates"]]
    assert norms == sorted(norms, reverse=True)  # more bits, smaller perturbation


def test_mcel_reproduction_fast(tmp_path):
    preset = Preset("digits", "mlp", epochs=1, bits=(4,), repeats=2, bers=(0.0, 0.01), methods=METHODS)
    calls, progress = _recorder()
    res = run_mcel_reproduction(
        preset="test", preset_override=preset, out_dir=tmp_path / "out", results_dir=tmp_path / "results",
        progress=progress,
    )
    _assert_steps(calls, [f"{m.name} 4-bit" for m in METHODS])
    rows = res["summary"]["rows"]
    assert [r["method"] for r in rows] == [m.name for m in METHODS]
    by = {r["method"]: r for r in rows}
    assert by["CE"]["time_vs_ce"] == pytest.approx(1.0)
    assert by["RandBET"]["config"]["train_ber"] > 0 and by["RandBET"]["config"]["w_max"] is not None
    assert by["MCEL asym"]["config"]["quant"] == "asym"
    for r in rows:
        assert 0.0 <= r["clean_accuracy"] <= 1.0
        assert len(r["results"]) == 2
    assert "| 4 | MCEL |" in res["markdown"]
    assert (tmp_path / "results" / "mcel_test_4bit.png").is_file()
    assert json.loads((tmp_path / "results" / "mcel_test.json").read_text())["rows"][0]["method"] == "CE"
    # resuming does not retrain: the stored runs are reused and the numbers are identical
    again = run_mcel_reproduction(preset="test", preset_override=preset, out_dir=tmp_path / "out")
    assert [r["results"] for r in again["summary"]["rows"]] == [r["results"] for r in rows]


def test_mcel_ablation_fast_and_selection_rule(tmp_path):
    grid = [AblationPoint("ce"), AblationPoint("mcel", 10.0, 3.0), AblationPoint("mcel", None, 3.0, 4.0)]
    calls, progress = _recorder()
    res = run_mcel_ablation(
        out_dir=tmp_path,
        grid=grid,
        bits=(2,),
        seeds=(0,),
        epochs=1,
        bers=(0.01,),
        repeats=2,
        dataset="digits",
        results_dir=tmp_path / "results",
        progress=progress,
    )
    _assert_steps(
        calls, ["CE 2-bit seed 0", "MCEL T=10, M=3 2-bit seed 0", "MCEL T=inf, M=3, s=4 2-bit seed 0"]
    )
    assert {r["label"] for r in res["rows"]} == {"CE", "MCEL T=10, M=3", "MCEL T=inf, M=3, s=4"}
    assert (tmp_path / "results" / "mcel_ablation.md").read_text().startswith("MCEL ablation")
    # the rule: the most robust point among those within tolerance of CE's clean accuracy
    rows = [
        {"label": "CE", "point": {}, "bits": 2, "clean": [0.90], "ber_0.01": [0.50]},
        {"label": "a", "point": {"m": 1}, "bits": 2, "clean": [0.895], "ber_0.01": [0.60]},
        {"label": "b", "point": {"m": 2}, "bits": 2, "clean": [0.85], "ber_0.01": [0.90]},
    ]
    sel = select_default(rows, bits=(2,), bers=(0.01,), clean_tolerance=0.01)
    assert sel is not None and sel["label"] == "a"
    assert select_default(rows, bits=(2,), bers=(0.01,), clean_tolerance=0.10)["label"] == "b"


def test_mondeq_reproduction_fast(tmp_path):
    preset = MonDEQPreset(
        epochs=1,
        qat_epochs=1,
        seeds=(0,),
        ptq_bits=(4, 12),
        displacement_bits=(8,),
        qat_bits=(3,),
        model_kwargs={"n": 32, "r": 8, "m": 0.2, "learn_m": True, "solver": "pr"},
    )
    calls, progress = _recorder()
    res = run_mondeq_reproduction(
        preset="test",
        preset_override=preset,
        out_dir=tmp_path / "out",
        results_dir=tmp_path / "results",
        dataset="digits",
        progress=progress,
    )
    _assert_steps(
        calls,
        ["float seed 0", "PTQ 4-bit", "PTQ 12-bit", "PTQ 4-bit", "PTQ 12-bit", "displacement 8-bit",
         "displacement W 8, U/b 4-bit", "QAT 3-bit seed 0", "QAT per-row 3-bit seed 0",
         "certified QAT 3-bit seed 0"],
    )
    s = res["summary"]
    assert [(r["bits"], r["per_channel"]) for r in s["ptq"]] == [
        (4, False),
        (12, False),
        (4, True),
        (12, True),
    ]
    for r in s["ptq"]:
        assert r["certified"] == (r["delta_w_norm"] < r["margin"])
        if r["certified"]:
            assert r["monotone"] and r["pr_converged"]
    assert [d["bits"] for d in s["displacement"]] == ["8", "W 8, U/b 4"]
    for d in s["displacement"]:
        assert d["share_full"] == 1.0 and d["share_norm_form"] == 1.0  # the full bound holds on every sample
        assert 0.0 <= d["share_paper"] <= 1.0
    assert [r["method"] for r in s["qat"]] == ["QAT", "QAT per-row", "certified QAT"]
    assert (tmp_path / "results" / "mondeq_test_margin_vs_bits.png").is_file()
    assert (tmp_path / "results" / "mondeq_test_displacement.png").is_file()


def test_mondeq_conv_preset_tiny(tmp_path):
    """The conv preset's path on a tiny configuration: certificates, displacement on every sample, resume."""
    from qmargin.experiments.mondeq import ConvPreset

    preset = ConvPreset(epochs=1, qat_epochs=1, channels=2, ptq_bits=(3, 8), qat_bits=(4,))
    kwargs = dict(
        preset="tiny", preset_override=preset, out_dir=tmp_path / "out", results_dir=tmp_path / "results",
        dataset="digits",
    )
    res = run_mondeq_reproduction(**kwargs)
    s = res["summary"]
    assert s["displacement_samples"] == s["test_samples"] == 359
    assert [(r["method"], r["bits"]) for r in s["ptq"] + s["qat"]] == [
        ("PTQ", 3), ("PTQ", 8), ("certified QAT", 4)
    ]
    for r in s["ptq"] + s["qat"]:
        assert r["certified"] == (r["delta_w_norm"] < r["margin"]) and r["frequencies"] == 40
        d = r["displacement"]
        assert d["samples"] == 359 and d["share_full"] == 1.0 and d["ratio_full_with_allowance"] <= 1.0
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nonconverged_samples"] >= 0
    assert s["ptq"][1]["delta_w_norm"] < s["ptq"][0]["delta_w_norm"]  # 8 bits move W less than 3
    assert s["qat"][0]["m"] > s["float"]["m"]  # certified QAT starts from m0 = 1
    md = (tmp_path / "results" / "mondeq_tiny.md").read_text()
    assert "certified QAT" in md and "max ‖z*−z~*‖ / bound" in md
    for name in ("mondeq_tiny_certificates.png", "mondeq_tiny_displacement.png", "mondeq_tiny.json"):
        assert (tmp_path / "results" / name).is_file()
    # resumable: a rerun trains nothing and reuses every analysis step (keyed by the weights' hash)
    cached = sorted(p.name for p in (tmp_path / "out" / "analysis").iterdir())
    assert cached == ["certified-qat-4bit.json", "float.json", "ptq-3bit.json", "ptq-8bit.json"]
    calls, progress = _recorder()
    again = run_mondeq_reproduction(**kwargs, progress=progress)["summary"]
    _assert_steps(calls, ["float", "PTQ 3-bit", "PTQ 8-bit", "certified QAT 4-bit"])
    assert again["ptq"] == s["ptq"] and again["qat"] == s["qat"] and again["float"] == s["float"]


def test_mcel_reproduction_plan_storages_and_stopping(tmp_path):
    """The fashion preset's machinery on digits: an explicit plan (a second seed), offset-binary
    evaluations of the same weights, sequential stopping, and partial summaries as runs finish."""
    preset = Preset(
        "digits", "mlp", epochs=1, bits=(4,), repeats=8, bers=(0.0, 0.05), methods=(*METHODS, MHL_BINARY),
        plan=((4, "CE", 0), (4, "MCEL", 0), (4, "CE", 1), (1, "MHL b=128", 0)),
        storages=((4, "offset"), (2, "offset")),
        ci_halfwidth=0.02, min_patterns=3,
    )  # fmt: skip
    calls, progress = _recorder()
    res = run_mcel_reproduction(
        preset="plan", preset_override=preset, out_dir=tmp_path / "out", progress=progress
    )
    labels = ["CE", "MCEL", "CE seed 1", "MHL b=128", "CE (offset)", "MCEL (offset)", "CE seed 1 (offset)"]
    bits = [4, 4, 4, 1, 4, 4, 4]
    # (2, "offset"): no 2-bit run, skipped
    _assert_steps(calls, [f"{label} {b}-bit" for label, b in zip(labels, bits, strict=True)])
    rows = res["summary"]["rows"]
    assert [r["method"] for r in rows] == labels and [r["bits"] for r in rows] == bits
    assert [(r["seed"], r["storage"]) for r in rows] == [
        (0, "twos"), (0, "twos"), (1, "twos"), (0, "twos"), (0, "offset"), (0, "offset"), (1, "offset")
    ]  # fmt: skip
    binary = rows[3]["config"]
    assert binary["bits"] == 1 and binary["loss"] == "mhl" and binary["loss_kwargs"]["b"] == 128.0
    assert res["summary"]["ci_halfwidth"] == 0.02 and res["summary"]["min_patterns"] == 3
    for r in rows:
        assert all(3 <= e["patterns"] <= 8 for e in r["results"])
        assert r["results"][0]["patterns"] == 3  # BER 0: no spread, stops at the minimum
    # same weights, another word format: the offset campaign sits beside the two's complement one
    offset = json.loads((tmp_path / "out" / "ce-4bit-s1" / "ber-offset.json").read_text())
    assert offset["error_model"]["storage"] == "offset" and offset["stopping"]["min_patterns"] == 3
    twos = json.loads((tmp_path / "out" / "ce-4bit-s1" / "ber.json").read_text())
    assert twos["clean_accuracy"] == offset["clean_accuracy"] and rows[2]["config"]["seed"] == 1
    # random flips act on offset-binary words exactly as on two's complement (MSB inverted, XOR
    # commutes): the same patterns give the same accuracies (docs/bit-conventions.md)
    assert [r["accuracies"] for r in offset["results"]] == [r["accuracies"] for r in twos["results"]]
    assert "3 to 8 paired patterns per BER" in res["markdown"]


@pytest.mark.parametrize(
    ("model", "kwargs", "train", "methods", "above"),
    [
        ("vgg3", {"channels": [8, 8], "hidden": 32}, {}, 2, 0.5),
        # ResNet-20 learns slowly from scratch: CE only, a larger step, twice chance after one epoch
        ("resnet20", {"widths": [4, 8, 8]}, {"lr": 1e-2, "batch_size": 32}, 1, 0.2),
    ],
)
def test_cnn_presets_on_real_data(tmp_path, model, kwargs, train, methods, above):
    """The convolutional path of the fast CNN presets on the real mnist5k data (narrow nets, 1 epoch)."""
    from qmargin.experiments.mcel import PRESETS

    real = PRESETS[f"fast-{model}"]
    assert (real.dataset, real.model, real.bits, [m.name for m in real.methods]) == (
        "mnist5k", model, (2, 4), ["CE", "MCEL"]
    )
    preset = Preset(
        "mnist5k", model, epochs=1, bits=(4,), repeats=2, bers=(0.0, 0.05), methods=real.methods[:methods],
        model_kwargs=kwargs, **train,
    )  # fmt: skip
    rows = run_mcel_reproduction(preset="cnn", preset_override=preset, out_dir=tmp_path)["summary"]["rows"]
    assert [r["method"] for r in rows] == ["CE", "MCEL"][:methods]
    for r in rows:
        assert r["clean_accuracy"] > above  # learns the real data well above chance (0.1)
        assert r["results"][1]["mean"] < r["clean_accuracy"]  # BER 5e-2 hurts
