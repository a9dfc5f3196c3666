"""Convolutional MonDEQs through the command line (in-process, tiny sizes on digits):
``train --model mondeq-conv / mondeq-multitier`` (float, QAT, certified QAT), ``certify`` (exact per
frequency, kernel bit-flip budgets, displacement on test samples) and ``evaluate`` (bit errors on the
kernel codes, non-convergence counted as an error)."""

from __future__ import annotations

import json

import pytest

from qmargin.cli import main
from qmargin.errors import ConfigError
from qmargin.models import build_model
from qmargin.training import CONFIG_FILE


def _train(run, *args: str) -> dict:
    code = main(
        [
            "train",
            "--out",
            str(run),
            "--dataset",
            "digits",
            "--epochs",
            "1",
            "--quiet",
            "--device",
            "cpu",
            "--hidden",
            "2",
            *args,
        ]
    )
    assert code == 0
    return json.loads((run / CONFIG_FILE).read_text())["config"]


def _check_campaign(path, *, certified: bool) -> dict:
    """Failures are errors; a certified (hence monotone) network converges on every clean sample."""
    result = json.loads(path.read_text())
    n = 359  # digits test split
    for r in result["results"]:
        assert len(r["failures"]) == len(r["accuracies"])
        for acc, fail in zip(r["accuracies"], r["failures"], strict=True):
            assert acc <= 1 - fail / n + 1e-12  # a sample whose solve did not converge is an error
        if r["ber"] == 0.0 and certified:
            assert r["failures"] == [0] * len(r["failures"])
    return result


def test_conv_certified_qat_train_certify_evaluate(tmp_path, capsys):
    run = tmp_path / "conv"
    cfg = _train(run, "--model", "mondeq-conv", "--bits", "4", "--per-channel", "--certify")
    assert cfg["model"] == "mondeq-conv" and cfg["model_kwargs"] == {"channels": 2, "certify": True}
    out = tmp_path / "cert.json"
    code = main(
        [
            "certify",
            str(run),
            "--bits",
            "3,4",
            "--per-channel",
            "--ber",
            "0.01",
            "--patterns",
            "3",
            "--samples",
            "30",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "exact per frequency: 40 blocks of 2x2" in text  # 8 x (8 // 2 + 1) rfft frequencies
    cert = json.loads(out.read_text())
    assert cert["form"] == "conv" and [r["bits"] for r in cert["results"]] == [3, 4]
    for r in cert["results"]:
        assert r["certified"] == (r["delta_w_norm"] < r["margin"])
        assert r["monotone"] == (r["margin_quantized"] > 0)
        assert 0.0 <= r["ber_certified_share"] <= r["ber_monotone_share"] <= 1.0
        assert r["max_certified_bit_flips"] is None or r["max_certified_bit_flips"] >= 0
        d = r["displacement"]
        assert d["samples"] == 30 and d["share_full"] == 1.0 and d["ratio_full_with_allowance"] <= 1.0
    # bit errors on the stored kernel codes; a BER that breaks monotonicity shows up as failures
    code = main(["evaluate", str(run), "--ber", "0,0.2", "--repeats", "2", "--quiet", "--device", "cpu"])
    assert code == 0
    result = _check_campaign(run / "ber.json", certified=cert["results"][1]["certified"])
    assert sum(result["results"][-1]["failures"]) > 0
    assert "did not converge" in capsys.readouterr().out


def test_multitier_float_train_certify_and_ptq_evaluate(tmp_path, capsys):
    run = tmp_path / "mt"
    cfg = _train(run, "--model", "mondeq-multitier", "--bits", "32")
    assert cfg["model_kwargs"] == {"channels": 2}
    out = tmp_path / "cert.json"
    assert main(["certify", str(run), "--bits", "4,8", "--out", str(out)]) == 0
    cert = json.loads(out.read_text())
    r8 = cert["results"][1]
    # tiers of 2 channels on 8 x 8 and 4 x 4: polyphase 2 * 4 + 2 = 10 channels on the 4 x 4 grid
    assert r8["block_size"] == 10 and r8["frequencies"] == 4 * 3 and r8["grid"] == [4, 4]
    assert r8["certified"] and r8["delta_w_norm"] < cert["results"][0]["delta_w_norm"]
    code = main(
        [
            "evaluate",
            str(run),
            "--ber",
            "0,0.01",
            "--repeats",
            "2",
            "--bits",
            "8",
            "--quiet",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    result = _check_campaign(run / "ber.json", certified=r8["certified"])
    assert result["config"]["ptq_bits"] == 8
    capsys.readouterr()


def test_conv_cli_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "conv"
    _train(run, "--model", "mondeq-conv", "--bits", "32")
    with pytest.raises(SystemExit) as exc:
        main(["certify", str(run), "--samples", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "train",
                "--out",
                str(tmp_path / "x"),
                "--model",
                "mondeq-conv",
                "--certify",
                "--bits",
                "32",
                "--quiet",
            ]
        )
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith("qmargin: error: ") and "certify" in err[-1]


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "needle"),
    [
        ("mondeq-conv", (64,), {}, "input_shape"),
        ("mondeq-multitier", (1, 6, 6), {"tiers": 3}, "divide by 4"),
        ("mondeq-multitier", (1, 8, 8), {"channels": [2, 3], "tiers": 3}, "disagrees"),
        ("mondeq-conv", (1, 8, 8), {"kernel_size": 2}, "odd"),
        ("mondeq-conv", (1, 8, 8), {"accelerator": "broyden"}, "accelerator"),
        ("mondeq-conv", (1, 8, 8), {"pool": 9}, "pool"),
    ],
)
def test_conv_builders_refuse_bad_options(name, shape, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        build_model(name, input_shape=shape, num_classes=3, spec=None, **kwargs)
