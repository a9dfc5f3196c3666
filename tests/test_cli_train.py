"""`qmargin train` options that feed the loss and model registries (in-process, 1 epoch on digits)."""

from __future__ import annotations

import json

import pytest

from qmargin.cli import main
from qmargin.training import CONFIG_FILE


def _train(tmp_path, *args: str) -> dict:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--out",
            str(out),
            "--dataset",
            "digits",
            "--bits",
            "4",
            "--epochs",
            "1",
            "--quiet",
            "--device",
            "cpu",
            *args,
        ]
    )
    assert code == 0
    return json.loads((out / CONFIG_FILE).read_text())["config"]


@pytest.mark.parametrize(
    ("args", "loss", "loss_kwargs"),
    [
        (["--loss", "mcel"], "mcel", {"margin": 30.0, "bound": 30.0}),
        (
            [
                "--loss",
                "mcel",
                "--margin",
                "5",
                "--bound",
                "inf",
                "--logit-scale",
                "2",
                "--label-smoothing",
                "0.1",
            ],
            "mcel",
            {"margin": 5.0, "bound": float("inf"), "logit_scale": 2.0, "label_smoothing": 0.1},
        ),
        (["--loss", "mhl", "--hinge-b", "2"], "mhl", {"b": 2.0}),
        (
            ["--loss", "mcel", "--loss-arg", "margin=4", "--loss-arg", "bound=Infinity"],
            "mcel",
            {"margin": 4, "bound": float("inf")},
        ),
        (
            ["--loss", "ce", "--loss-arg", "weight=[1,1,1,1,1,1,1,1,1,2]"],
            "ce",
            {"weight": [1, 1, 1, 1, 1, 1, 1, 1, 1, 2]},
        ),
    ],
)
def test_loss_flags_map_into_loss_kwargs(tmp_path, args, loss, loss_kwargs):
    cfg = _train(tmp_path, "--hidden", "16", *args)
    assert cfg["loss"] == loss and cfg["loss_kwargs"] == loss_kwargs
    assert "margin" not in cfg  # no flat loss keys any more


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("mlp", {"hidden": [16, 16]}),
        ("mondeq", {"n": 16}),
        ("mondeq-conv", {"channels": 16}),
        ("mondeq-multitier", {"channels": 16}),
    ],
)
def test_hidden_is_mapped_by_the_model_registry(tmp_path, model, expected):
    assert _train(tmp_path, "--model", model, "--hidden", "16")["model_kwargs"] == expected


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--loss", "ce", "--margin", "3"], "takes no option margin"),
        (["--loss", "mcel", "--loss-arg", "margn=3"], "margn"),
        (["--loss-arg", "novalue"], "--loss-arg"),
        (["--model", "resnet20", "--hidden", "8"], "resnet20"),
        (["--model", "mlp", "--certify"], "certify"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "x"), "--quiet", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert not (tmp_path / "x" / CONFIG_FILE).exists()
