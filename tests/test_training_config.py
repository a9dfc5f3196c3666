"""TrainConfig: validation, JSON round trip, loss defaults from qmargin.losses."""

from __future__ import annotations

import json

import pytest

from qmargin import losses
from qmargin.errors import ConfigError
from qmargin.quant import QuantSpec
from qmargin.training import TrainConfig, lr_factor, quant_spec, resolve_defaults


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = TrainConfig()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["bits"] == 8


def test_round_trip_of_a_full_config():
    cfg = TrainConfig(
        dataset="mnist5k",
        model="vgg3",
        bits=4,
        quant="asym",
        per_channel=True,
        loss="mcel",
        loss_kwargs={"margin": 5.0, "bound": 20.0, "logit_scale": 2.0, "label_smoothing": 0.1},
        train_ber=0.01,
        w_max=0.1,
        epochs=3,
        batch_size=32,
        lr=0.01,
        optimizer="sgd",
        momentum=0.8,
        weight_decay=5e-4,
        schedule="cosine",
        seed=7,
        device="cpu",
        data_dir="/tmp/x",
        model_kwargs={"channels": [8, 8], "hidden": 16},
    )
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert back.model_kwargs == {"channels": [8, 8], "hidden": 16}


def test_numbers_are_normalised_so_round_trip_is_exact():
    cfg = TrainConfig(lr=1, w_max=1, weight_decay=0)
    assert isinstance(cfg.lr, float) and isinstance(cfg.w_max, float)
    assert TrainConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()


@pytest.mark.parametrize(
    ("changes", "word"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 1, "quant": "asym"}, "bits=1"),
        ({"quant": "signed"}, "quant"),
        ({"loss": "focal"}, "loss"),
        ({"loss": "mcel", "loss_kwargs": {"margin": -1.0}}, "margin"),
        ({"loss": "mcel", "loss_kwargs": {"bound": 0.0}}, "bound"),
        ({"loss": "mcel", "loss_kwargs": {"margin": 10.0, "bound": 4.0}}, "margin"),
        ({"loss": "mhl", "loss_kwargs": {"b": 0.0}}, "b must"),
        ({"loss": "ce", "loss_kwargs": {"margin": 3.0}}, "margin"),
        ({"loss": "ce", "loss_kwargs": {"hinge_b": 3.0}}, "hinge_b"),
        ({"loss": "mhl", "loss_kwargs": {"label_smoothing": 0.1}}, "label_smoothing"),
        ({"train_ber": -0.1}, "train_ber"),
        ({"train_ber": 0.7}, "train_ber"),
        ({"train_ber": 0.01, "bits": 32}, "train_ber"),
        ({"w_max": 0.0}, "w_max"),
        ({"w_max": float("nan")}, "w_max"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"optimizer": "lamb"}, "optimizer"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"schedule": "linear"}, "schedule"),
        ({"seed": -1}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"loss_kwargs": {"label_smoothing": 1.0}}, "label_smoothing"),
        ({"dataset": ""}, "dataset"),
        ({"model": None}, "model"),
        ({"model_kwargs": {"f": object()}}, "model_kwargs"),
        ({"model_kwargs": [1, 2]}, "model_kwargs"),
    ],
)
def test_invalid_values_raise_one_line_config_errors(changes, word):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**changes)
    msg = str(info.value)
    assert word in msg and "\n" not in msg


def test_from_dict_rejects_unknown_keys_and_bad_json():
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"bits": 4, "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="JSON"):
        TrainConfig.from_json("{bits: 4")
    with pytest.raises(ConfigError, match="object"):
        TrainConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_config_is_frozen_and_replace_validates():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.bits = 4  # type: ignore[misc]
    assert cfg.replace(bits=2).bits == 2
    with pytest.raises(ConfigError):
        cfg.replace(bits=11)


def test_model_kwargs_are_copied():
    kw = {"hidden": [8]}
    cfg = TrainConfig(model_kwargs=kw)
    kw["hidden"].append(9)
    assert cfg.model_kwargs == {"hidden": [8]}


def test_resolve_defaults_reads_the_losses_constants(monkeypatch):
    cfg = resolve_defaults(TrainConfig(loss="mcel"))
    kw = cfg.loss_kwargs
    assert (kw["margin"], kw["bound"]) == (
        float(losses.DEFAULT_MCEL_MARGIN),
        float(losses.DEFAULT_MCEL_BOUND),
    )
    assert kw.get("logit_scale") is None
    monkeypatch.setattr(losses.defaults, "DEFAULT_MCEL_MARGIN", 3.5)
    monkeypatch.setattr(losses.defaults, "DEFAULT_MCEL_BOUND", 12.0)
    cfg = resolve_defaults(TrainConfig(loss="mcel"))
    assert (cfg.loss_kwargs["margin"], cfg.loss_kwargs["bound"]) == (3.5, 12.0)
    # explicit values win, and resolving is idempotent
    cfg = resolve_defaults(TrainConfig(loss="mcel", loss_kwargs={"margin": 1.0}))
    assert (cfg.loss_kwargs["margin"], cfg.loss_kwargs["bound"]) == (1.0, 12.0)
    assert resolve_defaults(cfg) == cfg


def test_resolve_defaults_mhl_and_ce():
    mhl = resolve_defaults(TrainConfig(loss="mhl"))
    assert mhl.loss_kwargs["b"] == float(losses.DEFAULT_MHL_B)
    assert mhl.loss_kwargs.get("margin") is None and mhl.loss_kwargs.get("bound") is None
    ce = resolve_defaults(TrainConfig(loss="ce"))
    assert ce == TrainConfig(loss="ce")


def test_quant_spec_from_config():
    assert quant_spec(TrainConfig(bits=32)) is None
    spec = quant_spec(TrainConfig(bits=4, quant="asym", per_channel=True, w_max=0.25))
    assert spec == QuantSpec(4, symmetric=False, per_channel=True, w_max=0.25)
    assert spec is not None and spec.w_max == 0.25


def test_lr_factor_schedules():
    assert [lr_factor("none", e, 4) for e in range(5)] == [1.0] * 5
    cos = [lr_factor("cosine", e, 4) for e in range(5)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5) and cos[4] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(cos, cos[1:], strict=False))
    step = [lr_factor("step", e, 8) for e in range(8)]
    assert step[:4] == [1.0] * 4
    assert step[4:6] == [pytest.approx(0.1)] * 2
    assert step[6:] == [pytest.approx(0.01)] * 2


def test_unbounded_mcel_round_trips():
    cfg = TrainConfig(loss="mcel", loss_kwargs={"bound": float("inf"), "margin": 2.0})
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="bound"):
        TrainConfig(loss="mcel", loss_kwargs={"bound": float("-inf")})
