"""The MCEL paper's other models (issue 9): MobileNetV2 with quantized depthwise convolutions and
ResNet-18, in the registry, through training, bit errors and a campaign."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qmargin.engine import stress
from qmargin.faults import BitErrorModel, inject
from qmargin.models import available_models, build_model, mobilenet_v2, resnet18
from qmargin.quant import QuantConv2d, QuantSpec, quantized_modules
from qmargin.training import TrainConfig, train


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_are_the_published_architectures():
    # torchvision's mobilenet_v2() and resnet18() (1000 classes) have exactly these counts
    assert _params(mobilenet_v2((3, 224, 224), 1000)) == 3_504_872
    assert _params(resnet18((3, 224, 224), 1000)) == 11_689_512
    assert _params(mobilenet_v2((3, 224, 224), 1000, width=0.5)) < 2_000_000


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18"])
@pytest.mark.parametrize("size", [32, 96])
def test_forward_backward_quantized(name, size):
    assert name in available_models()
    kw = {"width": 0.35} if name == "mobilenetv2" else {}
    model = build_model(name, input_shape=(3, size, size), num_classes=7, spec=QuantSpec(4), **kw)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.square().sum().backward()
    convs = [m for _, m in quantized_modules(model) if isinstance(m, QuantConv2d)]
    assert convs and all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all() for m in convs)
    assert model.small_input == (size <= 64)


def test_depthwise_kernels_are_stored_codes_hit_by_bit_errors():
    model = mobilenet_v2((3, 32, 32), 10, QuantSpec(4, per_channel=True)).eval()
    depthwise = {
        name: m for name, m in quantized_modules(model)
        if isinstance(m, QuantConv2d) and m.groups == m.in_channels == m.out_channels > 1
    }  # fmt: skip
    assert len(depthwise) == 17  # one per inverted residual block
    for m in depthwise.values():
        m.freeze()
    name, dw = next(iter(depthwise.items()))
    assert dw.weight.shape[1] == 1 and dw.stored("weight").scale.shape == (dw.out_channels,)
    before = {n: m.stored("weight").codes.clone() for n, m in quantized_modules(model)}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        clean = model(x)
    em = BitErrorModel(ber=0.2, layers=(name,))
    with inject(model, em, 3):
        changed = {
            n for n, m in quantized_modules(model) if not torch.equal(m.stored("weight").codes, before[n])
        }
        assert changed == {name}  # only the selected depthwise kernel
        with torch.no_grad():
            assert not torch.equal(model(x), clean)
    for n, m in quantized_modules(model):
        assert torch.equal(m.stored("weight").codes, before[n])  # restored exactly
    with torch.no_grad():
        assert torch.equal(model(x), clean)


@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18"])
def test_train_and_stress_tiny(name, tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    data = SimpleNamespace(
        x_train=x[:32], y_train=y[:32], x_test=x[32:], y_test=y[32:],
        info=SimpleNamespace(name="synthetic", input_shape=(3, 32, 32), num_classes=4),
    )  # fmt: skip
    kw = {"width": 0.25} if name == "mobilenetv2" else {}
    cfg = TrainConfig(
        dataset="synthetic", model=name, bits=4, epochs=1, batch_size=16, device="cpu", model_kwargs=kw,
        loss="mcel",
    )  # fmt: skip
    res = train(cfg, dataset=data, out_dir=tmp_path / name)
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in res.history)
    result = stress(res.model.eval(), (data.x_test, data.y_test), bers=[0.0, 0.05], repeats=2)
    assert result["results"][0]["accuracies"] == [result["clean_accuracy"]] * 2
    assert len(result["results"][1]["accuracies"]) == 2


def test_cifar10_preset_without_the_data_is_one_line(tmp_path, capsys):
    from qmargin.cli import main
    from qmargin.experiments.mcel import PRESETS

    assert PRESETS["cifar10"].model == "mobilenetv2"
    try:
        code = main(["reproduce", "mcel", "--preset", "cifar10", "--data-dir", str(tmp_path / "none"),
                     "--out", str(tmp_path / "out"), "--quiet"])  # fmt: skip
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "cifar10" in lines[0] and "--download" in lines[0], err
