"""qmargin.training: RandBET, weight clipping, the trainer, checkpoints, resume, load_run."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qmargin.errors import CheckpointError, ConfigError
from qmargin.models import build_model
from qmargin.models import registry as model_registry
from qmargin.quant import (
    IntegerState,
    QuantLinear,
    QuantSpec,
    fake_quantize,
    load_integer_state,
    quantized_modules,
)
from qmargin.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    INTEGER_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    RandBET,
    TrainConfig,
    clip_weights_,
    corrupted_weights,
    fault_injector,
    load_run,
    objective,
    straight_through,
    substituted_weights,
    train,
)
from qmargin.training.checkpoint import (
    optimizer_state_from_flat,
    optimizer_state_to_flat,
    rng_state,
    set_rng_state,
)

TIME_KEYS = ("train_time_s", "epoch_time_s")


# -- fixtures ------------------------------------------------------------------------------------


def make_dataset(n_train: int = 96, n_test: int = 48, seed: int = 0) -> SimpleNamespace:
    """A learnable 3-class problem on 1x4x4 inputs: y = argmax(x W)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 3, generator=g)
    x = torch.randn(n_train + n_test, 1, 4, 4, generator=g)
    y = (x.flatten(1) @ w).argmax(dim=1)
    info = SimpleNamespace(name="synthetic", input_shape=(1, 4, 4), num_classes=3)
    return SimpleNamespace(
        x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:], info=info
    )


def injector_for(ber: float):
    """The trainer's default injector: qmargin.faults.inject with BitErrorModel(ber=ber)."""
    return fault_injector(ber)


def tiny_model(batchnorm: bool = True, bits: int = 4, w_max: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "mlp",
        input_shape=(1, 4, 4),
        num_classes=3,
        spec=QuantSpec(bits, w_max=w_max),
        hidden=[12],
        batchnorm=batchnorm,
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


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in history]


# -- RandBET ------------------------------------------------------------------------------------


def test_straight_through_value_and_gradient():
    w = torch.randn(5, 3, requires_grad=True)
    target = torch.randn(5, 3)
    out = straight_through(w * 2, target)
    assert torch.equal(out, target)
    (out * torch.arange(15.0).reshape(5, 3)).sum().backward()
    assert torch.equal(w.grad, 2 * torch.arange(15.0).reshape(5, 3))
    with pytest.raises(ValueError):
        straight_through(w, torch.zeros(3, 5))


def test_corrupted_weights_flip_codes_and_restore_the_model():
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    inj = injector_for(0.05)
    w_tilde = corrupted_weights(model, inj, seed=11)
    assert set(w_tilde) == {f"{n}.weight" for n, _ in quantized_modules(model)}
    changed = 0
    for name, m in quantized_modules(model):
        w_hat = fake_quantize(m.weight, m.quant_specs["weight"]).detach()
        diff = w_tilde[f"{name}.weight"] != w_hat
        changed += int(diff.sum())
        assert not m.frozen
    assert changed > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # pure function of the seed
    again = corrupted_weights(model, inj, seed=11)
    other = corrupted_weights(model, inj, seed=12)
    assert all(torch.equal(w_tilde[k], again[k]) for k in w_tilde)
    assert any(not torch.equal(w_tilde[k], other[k]) for k in w_tilde)


def test_substituted_forward_equals_the_frozen_corrupted_model():
    model = tiny_model(batchnorm=False).eval()
    x = torch.randn(10, 1, 4, 4)
    inj = injector_for(0.1)
    w_tilde = corrupted_weights(model, inj, seed=5)
    clean = model(x)
    with substituted_weights(model, w_tilde) as reads:
        perturbed = model(x)
    assert all(n == 1 for n in reads.values())
    reference = copy.deepcopy(model)
    with inj(reference, 5):  # freezes and corrupts the stored codes in place
        frozen_corrupted = reference(x)
    assert torch.equal(perturbed, frozen_corrupted)
    assert not torch.equal(perturbed, clean)
    assert torch.equal(model(x), clean)  # substitution removed on exit
    assert "quantized_tensor" not in model.fc1.__dict__


def test_randbet_gradient_is_the_average_of_clean_and_bit_flipped_gradients():
    model = tiny_model()
    x = torch.randn(24, 1, 4, 4)
    y = torch.randint(0, 3, (24,))
    ber = 0.05
    rb = RandBET(ber, seed=9, injector=injector_for(ber))

    def obj(m):
        return objective(m, x, y, nn.CrossEntropyLoss())

    clean_model = copy.deepcopy(model)
    loss_clean, _ = obj(clean_model)
    loss_clean.backward()
    g_clean = grads(clean_model)

    rb_model = copy.deepcopy(model)
    out = rb.backward(rb_model, obj, step=4)
    g_rb = grads(rb_model)

    # Clean weights and BatchNorm statistics are exactly those of a clean-only step.
    params0 = dict(model.named_parameters())
    assert all(torch.equal(p, params0[n]) for n, p in rb_model.named_parameters())
    b_clean, b_rb = dict(clean_model.named_buffers()), dict(rb_model.named_buffers())
    assert all(torch.equal(b_clean[k], b_rb[k]) for k in b_clean)
    assert torch.equal(out.loss, loss_clean.detach())
    assert out.loss_err != out.loss  # the perturbed pass really computes something else

    # Independent reference for the bit-flipped gradient: a float network holding w_tilde.
    w_tilde = corrupted_weights(model, rb.injector, rb.pattern_seed(4))
    ref = build_model("mlp", input_shape=(1, 4, 4), num_classes=3, spec=None, hidden=[12], batchnorm=True)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for key, value in w_tilde.items():
            ref.get_parameter(key).copy_(value)
    loss_err_ref = nn.CrossEntropyLoss()(ref(x), y)
    loss_err_ref.backward()
    assert torch.allclose(out.loss_err, loss_err_ref.detach(), atol=1e-6)
    g_ref = grads(ref)
    for n in g_rb:
        assert torch.allclose(g_rb[n], 0.5 * (g_clean[n] + g_ref[n]), atol=1e-6), n
    assert any(not torch.allclose(g_rb[n], g_clean[n]) for n in g_rb)


def test_randbet_patterns_are_fresh_per_step_and_reproducible():
    rb = RandBET(0.01, seed=1, injector=injector_for(0.01))
    seeds = [rb.pattern_seed(k) for k in range(5)]
    assert len(set(seeds)) == 5
    assert seeds == [RandBET(0.01, seed=1, injector=injector_for(0.01)).pattern_seed(k) for k in range(5)]
    assert RandBET(0.01, seed=2, injector=injector_for(0.01)).pattern_seed(0) != seeds[0]
    with pytest.raises(ValueError):
        RandBET(0.0, seed=1)


class _BypassLinear(QuantLinear):
    """Computes with fake_quantize directly instead of quantized_tensor(): invisible to RandBET."""

    def forward(self, x):
        return F.linear(x, fake_quantize(self.weight, self.quant_specs["weight"]), self.bias)


def test_randbet_refuses_a_module_that_bypasses_quantized_tensor():
    model = nn.Sequential(nn.Flatten(), _BypassLinear(16, 3, spec=QuantSpec(4)))
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    rb = RandBET(0.1, seed=0, injector=injector_for(0.1))
    with pytest.raises(RuntimeError, match="never read"):
        rb.backward(model, lambda m: objective(m, x, y, nn.CrossEntropyLoss()), step=0)
    assert "quantized_tensor" not in model[1].__dict__
    with pytest.raises(ValueError, match="quantized"):
        float_model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        rb.backward(float_model, lambda m: objective(m, x, y, F.cross_entropy), 0)


# -- weight clipping ----------------------------------------------------------------------------


def test_clip_weights_projects_quantized_and_float_weights():
    model = tiny_model(w_max=0.1)
    float_head = nn.Linear(3, 3)
    model.add_module("extra", float_head)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50.0)
    n = clip_weights_(model, 0.1)
    assert n == 3  # fc1.weight, fc2.weight (quantized) and extra.weight (float)
    for name, m in quantized_modules(model):
        assert bool((m.weight.abs() <= 0.1).all()), name
    assert bool((float_head.weight.abs() <= 0.1).all())
    assert float_head.bias.abs().max() > 0.1  # biases are not clipped


def test_training_with_w_max_keeps_weights_clipped(tmp_path):
    cfg = base_config(epochs=2, w_max=0.05, lr=0.05)
    result = train(cfg, dataset=make_dataset(), out_dir=tmp_path / "run")
    qmods = list(quantized_modules(result.model))
    assert qmods
    for _, m in qmods:
        assert m.quant_specs["weight"].w_max == 0.05
        assert bool((m.weight.abs() <= 0.05).all())  # compared in float32, as the quantizer does
    # the scale of the stored form is w_max / qmax
    state = IntegerState.load(tmp_path / "run" / INTEGER_FILE)
    assert float(state.tensors["fc1.weight.scale"]) == pytest.approx(0.05 / 7)


# -- trainer ------------------------------------------------------------------------------------


def test_full_tiny_train_writes_a_complete_run(tmp_path):
    ds = make_dataset()
    run = tmp_path / "run"
    events: list[tuple[int, int, dict]] = []
    result = train(base_config(), dataset=ds, out_dir=run, progress=lambda e, s, m: events.append((e, s, m)))
    assert not result.skipped and result.resumed_epoch == 0
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.test_acc == result.history[-1]["test_acc"] > 0.5  # chance is 1/3
    assert result.train_time_s == pytest.approx(sum(r["train_time_s"] for r in result.history))
    files = sorted(p.name for p in run.iterdir())
    assert files == sorted([CONFIG_FILE, MODEL_FILE, INTEGER_FILE, METRICS_FILE])
    meta = json.loads((run / CONFIG_FILE).read_text())
    assert meta["config"] == result.config.to_dict()
    assert {"qmargin_version", "torch_version", "input_shape", "num_classes"} <= set(meta)
    metrics = json.loads((run / METRICS_FILE).read_text())
    assert metrics["test_acc"] == result.test_acc and len(metrics["history"]) == 3
    assert metrics["train_time_s"] > 0
    # progress: start, then 3 steps + 1 epoch record per epoch, global steps 1..9
    kinds = [m["event"] for _, _, m in events]
    assert kinds == ["start"] + (["step"] * 3 + ["epoch"]) * 3
    assert [s for _, s, m in events if m["event"] == "step"] == list(range(1, 10))
    assert events[-1][2]["test_acc"] == result.test_acc
    assert not result.model.training


def test_train_on_digits(tmp_path):
    from qmargin.data import load_dataset

    ds = load_dataset("digits")
    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        bits=4,
        epochs=1,
        batch_size=128,
        lr=0.01,
        device="cpu",
        model_kwargs={"hidden": [32]},
    )
    result = train(cfg, dataset=ds, out_dir=tmp_path / "digits")
    assert result.test_acc > 0.5  # chance is 0.1


def test_load_run_gives_bit_identical_outputs_and_integer_state_matches(tmp_path):
    ds = make_dataset()
    result = train(base_config(epochs=2, per_channel=True), dataset=ds, out_dir=tmp_path / "r")
    model, cfg, metrics = load_run(tmp_path / "r")
    assert cfg == result.config and metrics["test_acc"] == result.test_acc
    assert not model.training
    x = ds.x_test
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
        fresh = build_model(
            "mlp",
            input_shape=(1, 4, 4),
            num_classes=3,
            spec=QuantSpec(4, per_channel=True),
            hidden=[12],
            batchnorm=True,
        ).eval()
        load_integer_state(fresh, IntegerState.load(tmp_path / "r" / INTEGER_FILE))
        assert torch.equal(fresh(x), result.model(x))


def test_float_model_run(tmp_path):
    result = train(base_config(bits=32, epochs=1), dataset=make_dataset(), out_dir=tmp_path / "f")
    assert not (tmp_path / "f" / INTEGER_FILE).exists()
    assert not list(quantized_modules(result.model))
    model, _, _ = load_run(tmp_path / "f")
    assert same_state(model, result.model)


def test_randbet_run_records_both_losses(tmp_path):
    result = train(base_config(epochs=1, train_ber=0.05), dataset=make_dataset(), out_dir=tmp_path / "rb")
    rec = result.history[0]
    assert "train_loss_err" in rec and rec["train_loss_err"] != rec["train_loss"]


def test_randbet_training_changes_the_result(tmp_path):
    ds = make_dataset()
    plain = train(base_config(epochs=1), dataset=ds, out_dir=tmp_path / "plain")
    rb = train(base_config(epochs=1, train_ber=0.05), dataset=ds, out_dir=tmp_path / "rb")
    assert not same_state(plain.model, rb.model)
    assert plain.history[0]["train_loss"] != rb.history[0]["train_loss"]
    assert plain.history[0]["steps"] == rb.history[0]["steps"]


class _StopError(Exception):
    pass


@pytest.mark.parametrize("stop_at", ["mid_epoch_2", "end_of_epoch_2"])
def test_resume_ends_with_exactly_the_same_weights(tmp_path, stop_at):
    ds = make_dataset()
    cfg = base_config(
        epochs=3,
        train_ber=0.02,
        optimizer="sgd",
        momentum=0.9,
        schedule="cosine",
        w_max=0.5,
        lr=0.05,
        weight_decay=1e-4,
    )
    full = train(cfg, dataset=ds, out_dir=tmp_path / "full")

    def interrupt(epoch, step, metrics):
        if stop_at == "mid_epoch_2" and metrics["event"] == "step" and epoch == 2 and metrics["batch"] == 2:
            raise _StopError
        if stop_at == "end_of_epoch_2" and metrics["event"] == "epoch" and epoch == 2:
            raise _StopError

    part = tmp_path / "part"
    with pytest.raises(_StopError):
        train(cfg, dataset=ds, out_dir=part, progress=interrupt)
    assert (part / CHECKPOINT_FILE).is_file() and (part / STATE_FILE).is_file()
    assert not (part / METRICS_FILE).exists()
    # disturb every global RNG: resume must restore them
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    resumed = train(cfg, dataset=ds, out_dir=part)
    assert resumed.resumed_epoch == (1 if stop_at == "mid_epoch_2" else 2)
    assert same_state(resumed.model, full.model)
    assert (part / MODEL_FILE).read_bytes() == (tmp_path / "full" / MODEL_FILE).read_bytes()
    assert (part / INTEGER_FILE).read_bytes() == (tmp_path / "full" / INTEGER_FILE).read_bytes()
    assert strip_times(resumed.history) == strip_times(full.history)
    assert not (part / CHECKPOINT_FILE).exists()  # removed once finished


def _dropout_builder(*, input_shape, num_classes, spec, bias_spec=None, p=0.3):
    return nn.Sequential(
        nn.Flatten(),
        QuantLinear(16, 12, spec=spec),
        nn.ReLU(),
        nn.Dropout(p),
        QuantLinear(12, num_classes, spec=spec),
    )


def test_resume_restores_the_global_rng_that_dropout_consumes(tmp_path, monkeypatch):
    monkeypatch.setitem(model_registry._BUILDERS, "test_dropout", _dropout_builder)
    ds = make_dataset()
    cfg = base_config(model="test_dropout", model_kwargs={}, epochs=3)
    full = train(cfg, dataset=ds, out_dir=tmp_path / "full")

    def stop(epoch, step, m):
        if m["event"] == "epoch" and epoch == 1:
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, dataset=ds, out_dir=tmp_path / "part", progress=stop)
    torch.manual_seed(4321)
    resumed = train(cfg, dataset=ds, out_dir=tmp_path / "part")
    assert resumed.resumed_epoch == 1
    assert same_state(resumed.model, full.model)


def test_resume_false_starts_over(tmp_path):
    ds = make_dataset()
    cfg = base_config(epochs=2)

    def stop(epoch, step, m):
        if m["event"] == "epoch":
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, dataset=ds, out_dir=tmp_path / "r", progress=stop)
    again = train(cfg, dataset=ds, out_dir=tmp_path / "r", resume=False)
    assert again.resumed_epoch == 0 and len(again.history) == 2


def test_rerunning_a_finished_run_does_nothing_unless_forced(tmp_path):
    ds = make_dataset()
    cfg = base_config(epochs=1)
    first = train(cfg, dataset=ds, out_dir=tmp_path / "r")
    mtime = (tmp_path / "r" / MODEL_FILE).stat().st_mtime_ns
    calls = []
    second = train(cfg, dataset=ds, out_dir=tmp_path / "r", progress=lambda *a: calls.append(a))
    assert second.skipped and not calls
    assert (tmp_path / "r" / MODEL_FILE).stat().st_mtime_ns == mtime
    assert second.history == first.history and second.test_acc == first.test_acc
    assert same_state(second.model, first.model)
    # a different config in the same directory is refused, force retrains
    with pytest.raises(ConfigError, match="different config"):
        train(cfg.replace(lr=0.5), dataset=ds, out_dir=tmp_path / "r")
    forced = train(cfg.replace(lr=0.5), dataset=ds, out_dir=tmp_path / "r", force=True)
    assert not forced.skipped and forced.config.lr == 0.5


def test_auxiliary_loss_is_added_to_the_objective(tmp_path, monkeypatch):
    class AuxMLP(nn.Sequential):
        def __init__(self, spec, aux):
            super().__init__(nn.Flatten(), QuantLinear(16, 3, spec=spec))
            self.aux = aux

        def auxiliary_loss(self):
            return self.aux + 0.0 * self[1].weight.sum()

    def builder(*, input_shape, num_classes, spec, bias_spec=None, aux=0.0):
        return AuxMLP(spec, aux)

    monkeypatch.setitem(model_registry._BUILDERS, "test_aux", builder)
    ds = make_dataset()
    without = train(base_config(model="test_aux", model_kwargs={}), dataset=ds, out_dir=tmp_path / "a")
    cfg_aux = base_config(model="test_aux", model_kwargs={"aux": 5.0})
    with_aux = train(cfg_aux, dataset=ds, out_dir=tmp_path / "b")
    for r0, r1 in zip(without.history, with_aux.history, strict=True):
        assert r1["train_loss"] == pytest.approx(r0["train_loss"] + 5.0, abs=1e-6)
    assert same_state(without.model, with_aux.model)  # a constant term has no gradient
    x, y = ds.x_test, ds.y_test
    with torch.no_grad():
        loss, logits = objective(with_aux.model, x, y, nn.CrossEntropyLoss())
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, y)) + 5.0)


# -- checkpoint files and errors ----------------------------------------------------------------


def test_corrupt_or_missing_files_raise_checkpoint_errors(tmp_path):
    run = tmp_path / "r"
    train(base_config(epochs=1), dataset=make_dataset(), out_dir=run)
    (run / MODEL_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError) as info:
        load_run(run)
    assert MODEL_FILE in str(info.value) and "\n" not in str(info.value)
    (run / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_run(run)
    (run / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_run(run)
    (run / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_run(run)
    with pytest.raises(CheckpointError, match="no such run"):
        load_run(tmp_path / "nowhere")


def test_model_file_of_another_architecture_is_a_checkpoint_error(tmp_path):
    ds = make_dataset()
    train(base_config(epochs=1), dataset=ds, out_dir=tmp_path / "a")
    other = base_config(epochs=1, model_kwargs={"hidden": [7], "batchnorm": True})
    train(other, dataset=ds, out_dir=tmp_path / "b")
    (tmp_path / "a" / MODEL_FILE).write_bytes((tmp_path / "b" / MODEL_FILE).read_bytes())
    with pytest.raises(CheckpointError, match="shape"):
        load_run(tmp_path / "a")


def test_corrupt_training_checkpoint_on_resume(tmp_path):
    ds = make_dataset()
    cfg = base_config(epochs=2)

    def stop(epoch, step, m):
        if m["event"] == "epoch":
            raise _StopError

    with pytest.raises(_StopError):
        train(cfg, dataset=ds, out_dir=tmp_path / "r", progress=stop)
    state_path = tmp_path / "r" / STATE_FILE
    state = json.loads(state_path.read_text())
    state["epoch"] = 5
    state_path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="disagree"):
        train(cfg, dataset=ds, out_dir=tmp_path / "r")
    (tmp_path / "r" / CHECKPOINT_FILE).write_bytes(b"truncated")
    with pytest.raises(CheckpointError):
        train(cfg, dataset=ds, out_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="different config"):
        train(cfg.replace(epochs=4), dataset=ds, out_dir=tmp_path / "r")


def test_optimizer_state_flat_round_trip():
    torch.manual_seed(0)
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95)),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ):
        model = nn.Linear(4, 3)
        opt = make(model.parameters())
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(5, 4)).pow(2).sum().backward()
            opt.step()
        tensors, plain = optimizer_state_to_flat(opt)
        plain = json.loads(json.dumps(plain))
        opt2 = make(model.parameters())
        optimizer_state_from_flat(opt2, {k: v.clone() for k, v in tensors.items()}, plain)
        s1, s2 = opt.state_dict(), opt2.state_dict()
        assert s1["param_groups"] == s2["param_groups"]
        for pid in s1["state"]:
            for k, v in s1["state"][pid].items():
                w = s2["state"][pid][k]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_rng_state_round_trip():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    tensors, plain = rng_state()
    assert all(t.dtype == torch.uint8 for t in tensors.values())
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(tensors, json.loads(json.dumps(plain)))
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2:] == got[2:]


def test_missing_cuda_is_a_config_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="cuda"):
        train(base_config(device="cuda"), dataset=make_dataset(), out_dir=tmp_path / "c")


def test_train_rejects_a_file_as_run_dir(tmp_path):
    f: Path = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        train(base_config(), dataset=make_dataset(), out_dir=f)
