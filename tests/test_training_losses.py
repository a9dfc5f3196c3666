"""Losses as a named extension point of training: the loss registry behind ``TrainConfig(loss, loss_kwargs)``,
configs written before ``loss_kwargs`` existed, and weights pinned to the code before the change."""

from __future__ import annotations

import hashlib
import json
import platform
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qmargin import losses
from qmargin.errors import ConfigError
from qmargin.losses import registry as loss_registry
from qmargin.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    TrainConfig,
    load_run,
    make_loss,
    read_run_config,
    resolve_defaults,
    train,
)


class _StopError(Exception):
    pass


def make_dataset(n_train: int = 96, n_test: int = 48, seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 3, generator=g)
    x = torch.randn(n_train + n_test, 1, 4, 4, generator=g)
    y = (x.flatten(1) @ w).argmax(dim=1)
    info = SimpleNamespace(name="synthetic", input_shape=(1, 4, 4), num_classes=3)
    return SimpleNamespace(
        x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:], info=info
    )


def base_config(**kw) -> TrainConfig:
    d = dict(
        dataset="synthetic",
        model="mlp",
        bits=4,
        epochs=3,
        batch_size=32,
        lr=0.01,
        device="cpu",
        model_kwargs={"hidden": [12], "batchnorm": True},
        seed=3,
    )
    d.update(kw)
    return TrainConfig(**d)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test disappear after it."""
    monkeypatch.setattr(loss_registry, "_LOSSES", dict(loss_registry._LOSSES))


# -- a user-registered loss --------------------------------------------------------------------


class FocalLoss(nn.Module):
    def __init__(self, gamma: float) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return (-((1 - logp.exp()) ** self.gamma) * logp).mean()


def build_focal(*, gamma: float = 2.0) -> nn.Module:
    if not isinstance(gamma, int | float) or isinstance(gamma, bool) or gamma < 0:
        raise ConfigError(f"gamma must be a number >= 0, got {gamma!r}")
    return FocalLoss(float(gamma))


def test_a_registered_loss_trains_through_train_config(tmp_path, scratch_registry):
    losses.register_loss("focal", build_focal)
    assert "focal" in losses.available_losses()
    assert losses.loss_options("focal") == ("gamma",)
    assert losses.loss_defaults("focal") == {"gamma": 2.0}
    cfg = base_config(loss="focal", loss_kwargs={"gamma": 1.5}, epochs=2)
    res = train(cfg, dataset=make_dataset(), out_dir=tmp_path / "r")
    assert res.config.loss_kwargs == {"gamma": 1.5}
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    stored, _ = read_run_config(tmp_path / "r")
    assert stored == res.config
    # left-out options resolve to the builder's defaults, and config.json records them
    resolved = resolve_defaults(base_config(loss="focal"))
    assert resolved.loss_kwargs == {"gamma": 2.0}
    loss = make_loss(base_config(loss="focal"))
    assert isinstance(loss, FocalLoss) and loss.gamma == 2.0
    # the builder's own checks reach the config
    with pytest.raises(ConfigError, match="gamma"):
        base_config(loss="focal", loss_kwargs={"gamma": -1})


def test_registered_loss_equals_the_builtin_it_wraps(tmp_path, scratch_registry):
    """The registry path adds nothing numerically: a loss registered as MCELoss(30, 30) trains to the
    same weights as the built-in ``mcel`` with its defaults."""
    losses.register_loss("mcel30", lambda: losses.MCELoss(30.0, 30.0), defaults={})
    ds = make_dataset()
    a = train(base_config(loss="mcel", epochs=2), dataset=ds, out_dir=tmp_path / "a")
    b = train(base_config(loss="mcel30", epochs=2), dataset=ds, out_dir=tmp_path / "b")
    assert same_state(a.model, b.model)


def test_register_loss_errors_and_options(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        losses.register_loss("ce", build_focal)
    losses.register_loss("CE", build_focal, overwrite=True)
    assert isinstance(losses.build_loss("ce", gamma=1.0), FocalLoss)
    with pytest.raises(ValueError):
        losses.register_loss("", build_focal)

    def loose(**kwargs):  # takes anything: it checks the names itself
        if set(kwargs) - {"a"}:
            raise ValueError(f"unexpected {sorted(kwargs)}")
        return nn.CrossEntropyLoss()

    losses.register_loss("loose", loose, defaults=lambda: {"a": 1})
    assert losses.loss_options("loose") is None
    assert losses.loss_defaults("loose") == {"a": 1}
    with pytest.raises(ConfigError, match="loss 'loose': unexpected"):  # ValueError -> ConfigError
        losses.build_loss("loose", b=2)

    losses.register_loss("notamodule", lambda: 3)
    with pytest.raises(TypeError, match="nn.Module"):
        losses.build_loss("notamodule")


def test_unknown_loss_kwarg_is_one_config_error_naming_the_loss_and_its_options():
    with pytest.raises(ConfigError) as info:
        TrainConfig(loss="mcel", loss_kwargs={"margn": 3.0})
    msg = str(info.value)
    assert "\n" not in msg
    assert "'mcel'" in msg and "margn" in msg
    for accepted in ("margin", "bound", "logit_scale", "label_smoothing"):
        assert accepted in msg
    expected = r"loss 'mhl' takes no option margin \(options: b, reduction, units, weight\)"
    with pytest.raises(ConfigError, match=expected):
        TrainConfig(loss="mhl", loss_kwargs={"margin": 1.0})


@pytest.mark.parametrize(
    ("loss", "kwargs", "word"),
    [
        ("mcel", {"margin": "big"}, "margin"),
        ("mcel", {"bound": None, "margin": float("nan")}, "margin"),
        ("mcel", {"logit_scale": -1.0}, "logit_scale"),
        ("mcel", {"label_smoothing": True}, "label_smoothing"),
        ("ce", {"weight": [[1.0]]}, "weight"),
        ("ce", {"reduction": "avg"}, "reduction"),
        ("mhl", {"b": float("inf")}, "b"),
        ("mhl", {"b": [1.0]}, "b"),
    ],
)
def test_bad_loss_values_are_config_errors(loss, kwargs, word):
    with pytest.raises(ConfigError, match=word):
        TrainConfig(loss=loss, loss_kwargs=kwargs)


def test_loss_kwargs_are_json_and_copied():
    kw = {"margin": 2.0, "weight": [1.0, 2.0, 3.0]}
    cfg = TrainConfig(loss="mcel", loss_kwargs=kw)
    kw["weight"].append(4.0)
    assert cfg.loss_kwargs == {"margin": 2.0, "weight": [1.0, 2.0, 3.0]}
    with pytest.raises(ConfigError, match="loss_kwargs"):
        TrainConfig(loss="mcel", loss_kwargs={"margin": object()})
    with pytest.raises(ConfigError, match="loss_kwargs"):
        TrainConfig(loss="mcel", loss_kwargs=[("margin", 2.0)])  # type: ignore[arg-type]
    assert TrainConfig(loss="MCEL").loss == "mcel"


def test_unbounded_mcel_is_written_infinity():
    cfg = resolve_defaults(TrainConfig(loss="mcel", loss_kwargs={"bound": float("inf")}))
    text = cfg.to_json()
    assert '"bound": Infinity' in text
    assert TrainConfig.from_json(text) == cfg
    assert make_loss(cfg).bound == float("inf")


# -- configs written before loss_kwargs ----------------------------------------------------------

# config.json "config" entries exactly as qmargin wrote them before loss_kwargs (commit 83cca8d).
OLD_MCEL = {
    "batch_size": 64,
    "bits": 4,
    "bound": 30.0,
    "data_dir": None,
    "dataset": "digits",
    "device": "cpu",
    "epochs": 1,
    "hinge_b": None,
    "label_smoothing": 0.0,
    "logit_scale": None,
    "loss": "mcel",
    "lr": 0.001,
    "margin": 30.0,
    "model": "mlp",
    "model_kwargs": {"hidden": [32]},
    "momentum": 0.9,
    "optimizer": "adam",
    "per_channel": False,
    "quant": "sym",
    "schedule": "none",
    "seed": 1,
    "train_ber": 0.0,
    "w_max": None,
    "weight_decay": 0.0,
}


def _old(**changes):
    return {**OLD_MCEL, **changes}


@pytest.mark.parametrize(
    ("old", "loss", "loss_kwargs"),
    [
        (OLD_MCEL, "mcel", {"margin": 30.0, "bound": 30.0}),
        (
            _old(bound=float("inf"), margin=2.0, logit_scale=2.0, label_smoothing=0.1),
            "mcel",
            {"margin": 2.0, "bound": float("inf"), "logit_scale": 2.0, "label_smoothing": 0.1},
        ),
        (_old(loss="ce", margin=None, bound=None), "ce", {}),
        (_old(loss="ce", margin=None, bound=None, label_smoothing=0.05), "ce", {"label_smoothing": 0.05}),
        (_old(loss="mhl", margin=None, bound=None, hinge_b=1.0), "mhl", {"b": 1.0}),
        # a key the loss does not take is dropped (old configs could not set one, but be lenient)
        (_old(loss="ce", margin=None, bound=30.0), "ce", {}),
    ],
)
def test_old_flat_config_loads_into_loss_kwargs(old, loss, loss_kwargs):
    cfg = TrainConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg.loss == loss and cfg.loss_kwargs == loss_kwargs
    # what the new code writes for the same run, resolved
    assert cfg == resolve_defaults(cfg)
    assert "margin" not in cfg.to_dict() and "loss_kwargs" in cfg.to_dict()


def test_old_config_with_default_settings_equals_the_new_resolved_config():
    new = resolve_defaults(
        TrainConfig(
            dataset="digits",
            model="mlp",
            bits=4,
            epochs=1,
            batch_size=64,
            seed=1,
            device="cpu",
            loss="mcel",
            model_kwargs={"hidden": [32]},
        )
    )
    assert TrainConfig.from_dict(OLD_MCEL) == new


def test_old_and_new_loss_keys_do_not_mix():
    with pytest.raises(ConfigError, match="mixes"):
        TrainConfig.from_dict({"loss": "mcel", "margin": 3.0, "loss_kwargs": {"bound": 10.0}})


def _to_old_format(run_dir) -> None:
    """Rewrite a run's config.json the way qmargin wrote it before loss_kwargs (flat loss keys)."""
    data = json.loads((run_dir / CONFIG_FILE).read_text())
    cfg = data["config"]
    kw = cfg.pop("loss_kwargs")
    cfg.update({"margin": None, "bound": None, "logit_scale": None, "hinge_b": None, "label_smoothing": 0.0})
    cfg.update({("hinge_b" if k == "b" else k): v for k, v in kw.items()})
    (run_dir / CONFIG_FILE).write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True))


@pytest.mark.parametrize("loss", ["mcel", "mhl"])
def test_an_old_run_resumes_to_identical_weights(tmp_path, loss):
    ds = make_dataset()
    cfg = base_config(loss=loss, epochs=3)
    full = train(cfg, dataset=ds, out_dir=tmp_path / "full")

    def stop(epoch, step, m):
        if m["event"] == "epoch" and epoch == 1:
            raise _StopError

    part = tmp_path / "part"
    with pytest.raises(_StopError):
        train(cfg, dataset=ds, out_dir=part, progress=stop)
    assert (part / CHECKPOINT_FILE).is_file()
    _to_old_format(part)
    assert "margin" in json.loads((part / CONFIG_FILE).read_text())["config"]
    resumed = train(cfg, dataset=ds, out_dir=part)
    assert resumed.resumed_epoch == 1
    assert same_state(resumed.model, full.model)
    assert (part / MODEL_FILE).read_bytes() == (tmp_path / "full" / MODEL_FILE).read_bytes()

    # a finished old run loads and is not trained again
    _to_old_format(tmp_path / "full")
    model, stored, _ = load_run(tmp_path / "full")
    assert stored == full.config and same_state(model, full.model)
    again = train(cfg, dataset=ds, out_dir=tmp_path / "full")
    assert again.skipped


# -- the weights of the code before the loss registry --------------------------------------------

# sha256 of the state dict (sorted names + raw bytes) after 1 epoch on digits: 4-bit MLP 64-32-10, batch 64,
# seed 1, Adam 1e-3, one thread; recorded with the code before loss_kwargs (commit 83cca8d) on
# torch 2.13.0+cpu / x86_64. Other builds of torch may round differently: there the test is skipped.
PINNED_ENV = ("2.13.0+cpu", "x86_64")
PINNED = {
    "ce": ({}, "61b74f3699c51105cfb764a746d017f2ec411e9daed8b452aa8cb6598b2851fb"),
    "ce_ls": ({"label_smoothing": 0.1}, "f140a5a0b9e4b6b54a06ea752d671798bf445a94ff9a00c795e34f796a4137eb"),
    "mcel": ({}, "2c5eceea3f1804ec442756c35429efb975520f129be13b3c450611afc5e7359b"),
    "mcel_inf": (
        {"bound": float("inf"), "margin": 2.0},
        "3b88c3e1e45b991bca8b1e377cae49393a38ced50faca20fac67723086967074",
    ),
    "mcel_scale": (
        {"logit_scale": 2.0, "margin": 5.0, "bound": 10.0},
        "1e30f1bbd28cfabe6ebdd2f2e6cf84a9c2a69fb9a99daa2297b7733d9371153a",
    ),
    "mhl": ({}, "99cfa4a632c82912b27b3bfd77b02d81f29530db08a09f9fcadf0f56e7eefadd"),
    "mhl_b": ({"b": 2.0}, "f5fcbd947eef2725094c9fee7e8321bb38ae2a7245b7b20c46f2b5f9c1467730"),
}


def _state_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def digits():
    from qmargin.data import load_dataset

    return load_dataset("digits")


@pytest.mark.skipif(
    (torch.__version__, platform.machine()) != PINNED_ENV, reason=f"weights pinned on {PINNED_ENV}"
)
@pytest.mark.parametrize("case", sorted(PINNED))
def test_weights_are_those_of_the_code_before_the_loss_registry(tmp_path, digits, case):
    kwargs, sha = PINNED[case]
    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        bits=4,
        epochs=1,
        batch_size=64,
        seed=1,
        device="cpu",
        model_kwargs={"hidden": [32]},
        loss=case.split("_")[0],
        loss_kwargs=kwargs,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(cfg, dataset=digits, out_dir=tmp_path / case)
    finally:
        torch.set_num_threads(threads)
    assert _state_sha256(res.model) == sha
