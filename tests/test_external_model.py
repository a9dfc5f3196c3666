"""A user's own model (qmargin.experiments.external): factory, weights, post-training quantization."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from external_helpers import PickleBomb, import_file, write_cnn
from qmargin.errors import CheckpointError, ConfigError
from qmargin.experiments.external import (
    QuantOptions,
    build_model,
    load_external_model,
    load_weights,
    quantize_external,
)
from qmargin.quant import QuantConv2d, QuantLinear
from qmargin.weights import read_state_dict


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.fixture
def cnn_file(tmp_path):
    return write_cnn(tmp_path)


def _reference(cnn_file, **kwargs):
    torch.manual_seed(1)
    return import_file(cnn_file).make_cnn(**kwargs)


# -- factory --------------------------------------------------------------------------------------


def test_factory_from_a_file_with_arguments(cnn_file):
    m = build_model(f"{cnn_file}:make_cnn", {"channels": 3, "classes": 7})
    assert m[0].out_channels == 3 and m[-1].out_features == 7


@pytest.mark.parametrize(
    "factory, kwargs, needles",
    [
        ("make_raises", {"depth": 3}, ["make_raises", "ValueError", "the factory refuses: ['depth']"]),
        ("make_cnn", {"nonsense": 1}, ["make_cnn", "TypeError", "nonsense"]),
        ("make_list", {}, ["make_list", "returned a list"]),
        ("Marker.nope", {}, ["no attribute"]),
    ],
)
def test_factory_errors_are_one_line(cnn_file, factory, kwargs, needles):
    with pytest.raises(ConfigError) as err:
        build_model(f"{cnn_file}:{factory}", kwargs)
    _one_line(err, *needles)


def test_factory_import_failures(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('cannot build today')\n")
    with pytest.raises(ConfigError) as err:
        build_model(f"{broken}:make")
    _one_line(err, "broken.py:make", "import failed", "RuntimeError: cannot build today")
    with pytest.raises(ConfigError) as err:
        build_model(f"{tmp_path / 'nope.py'}:make")
    _one_line(err, "does not exist")


# -- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_weights_load_from_safetensors_and_pt(cnn_file, tmp_path, fmt):
    ref = _reference(cnn_file, batchnorm=True)
    ref[1].running_mean.uniform_()  # buffers travel too
    sd = ref.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "pt-wrapped" else sd, path)
    m = build_model(f"{cnn_file}:make_cnn", {"batchnorm": True})
    record = load_weights(m, path)
    assert record["file"] == str(path.resolve()) and len(record["sha256"]) == 64
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("where", ["top-level", "inside-state-dict"])
def test_a_pickle_payload_is_refused_and_never_runs(cnn_file, tmp_path, where):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    sd = dict(_reference(cnn_file).state_dict())
    torch.save(PickleBomb(marker) if where == "top-level" else {**sd, "x": PickleBomb(marker)}, path)
    m = build_model(f"{cnn_file}:make_cnn")
    with pytest.raises(CheckpointError) as err:
        load_weights(m, path)
    _one_line(err, "evil.pt")
    assert not marker.exists()
    plain = tmp_path / "plain.pt"  # a plain pickle.dump (not torch.save) of the payload
    with open(plain, "wb") as f:
        pickle.dump({"w": PickleBomb(marker)}, f)
    with pytest.raises(CheckpointError):
        read_state_dict(plain)
    assert not marker.exists()
    pickle.loads(plain.read_bytes())  # the payload is live: plain unpickling does create the marker
    assert marker.exists()


def test_mismatched_weights_name_keys_and_shapes(cnn_file, tmp_path):
    other = _reference(cnn_file, channels=6)  # conv widths differ
    path = tmp_path / "w6.safetensors"
    save_file(other.state_dict(), path)
    m = build_model(f"{cnn_file}:make_cnn")
    with pytest.raises(CheckpointError) as err:
        load_weights(m, path)
    _one_line(err, "w6.safetensors", "0.weight (6, 1, 3, 3) vs model (4, 1, 3, 3)", "mis-shaped")

    sd = dict(_reference(cnn_file).state_dict())
    sd["head.weight"] = sd.pop("8.weight")
    renamed = tmp_path / "renamed.pt"
    torch.save(sd, renamed)
    with pytest.raises(CheckpointError) as err:
        load_weights(m, renamed)
    _one_line(err, "missing 8.weight (5, 8)", "unexpected head.weight (5, 8)")


def test_non_finite_and_cast_weights_are_refused(cnn_file, tmp_path):
    sd = dict(_reference(cnn_file).state_dict())
    bad = {**sd, "4.weight": sd["4.weight"].clone()}
    bad["4.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(bad, path)
    m = build_model(f"{cnn_file}:make_cnn")
    with pytest.raises(CheckpointError) as err:
        load_weights(m, path)
    _one_line(err, "4.weight", "non-finite")
    double = tmp_path / "f64.pt"
    torch.save({k: v.double() for k, v in sd.items()}, double)
    with pytest.raises(CheckpointError) as err:
        load_weights(m, double)
    _one_line(err, "float64", "refusing to cast")


# -- quantization -----------------------------------------------------------------------------------


def test_post_training_quantization_lists_the_converted_layers(cnn_file):
    m = build_model(f"{cnn_file}:make_cnn")
    w0 = m[0].weight.detach().clone()
    rows, mode = quantize_external(m, QuantOptions(bits=4, symmetric=False, per_channel=True))
    assert mode == "ptq"
    assert [(r["layer"], r["kind"], r["shape"], r["bits"], r["quant"], r["per_channel"]) for r in rows] == [
        ("0", "QuantConv2d", [4, 1, 3, 3], 4, "asym", True),
        ("4", "QuantConv2d", [8, 4, 3, 3], 4, "asym", True),
        ("8", "QuantLinear", [5, 8], 4, "asym", True),
    ]
    assert isinstance(m[0], QuantConv2d) and torch.equal(m[0].weight.detach(), w0)  # same float weights


def test_layers_and_exclude_select_what_is_quantized(cnn_file):
    m = build_model(f"{cnn_file}:make_cnn")
    rows, _ = quantize_external(m, QuantOptions(bits=6, exclude=("8",)))
    assert [r["layer"] for r in rows] == ["0", "4"] and type(m[8]) is torch.nn.Linear
    m = build_model(f"{cnn_file}:make_cnn")
    rows, _ = quantize_external(m, QuantOptions(layers=("8",)))
    assert [(r["layer"], r["bits"]) for r in rows] == [("8", 8)]  # default 8 bits
    with pytest.raises(ConfigError) as err:
        quantize_external(build_model(f"{cnn_file}:make_cnn"), QuantOptions(layers=("fc*",)))
    _one_line(err, "no nn.Linear or nn.Conv2d layer", "--layers fc*")


def test_no_layer_to_quantize(cnn_file):
    with pytest.raises(ConfigError) as err:
        load_external_model(f"{cnn_file}:make_activations_only")
    _one_line(err, "no nn.Linear or nn.Conv2d layer")


def test_an_already_quantized_model_is_used_as_stored(cnn_file):
    ext = load_external_model(f"{cnn_file}:make_quantized", model_args={"bits": 3})
    assert ext.mode == "given" and isinstance(ext.model[1], QuantLinear)
    assert [(r["layer"], r["bits"]) for r in ext.layers] == [("1", 3)]
    assert ext.config["quantization"] == {"mode": "given"}
    with pytest.raises(ConfigError) as err:
        load_external_model(f"{cnn_file}:make_quantized", quant=QuantOptions(bits=4))
    _one_line(err, "already holds qmargin quantized layers")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_an_unsupported_quantized_layout_is_refused(cnn_file):
    with pytest.raises(ConfigError) as err:
        load_external_model(f"{cnn_file}:make_torch_quantized")
    _one_line(err, "unsupported quantized layout", "layer '1'", "torch.ao.nn.quantized")


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("w.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", "as safetensors"),
        ("w.pt", b"\x00\x01garbage", "cannot read"),
        ("w.pth", None, "holds a list"),
    ],
)
def test_unreadable_weight_files_are_one_line(cnn_file, tmp_path, name, content, needle):
    path = tmp_path / name
    if content is None:
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model(f"{cnn_file}:make_cnn"), path)
    _one_line(err, name, needle)
