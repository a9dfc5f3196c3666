"""``qmargin evaluate --model FACTORY --data SPEC``: one command end to end; every bad input in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from external_helpers import PickleBomb, import_file, write_cnn, write_test_set
from qmargin.cli import main

FAST = ["--ber", "0,0.05", "--repeats", "2", "--no-plot", "--quiet", "--device", "cpu"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def newcomer(tmp_path, monkeypatch):
    """A CNN in its own file, trained weights (here: seeded), an .npz test set; cwd = that folder."""
    monkeypatch.chdir(tmp_path)
    cnn = write_cnn(tmp_path)
    torch.manual_seed(3)
    model = import_file(cnn).make_cnn()
    x, y = write_test_set(tmp_path / "test.npz", model)  # balances the head's bias first
    save_file(model.state_dict(), tmp_path / "cnn.safetensors")
    return tmp_path, model, x, y


def _direct_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, bits: int) -> float:
    """Symmetric per-tensor b-bit weights written out (design.md §1): s = max|w| / qmax,
    w_hat = clamp(round(w / s), -qmax, qmax) * s, on a float copy of the model."""
    qmax = 2 ** (bits - 1) - 1
    q = type(model)(*[m for m in model])  # same modules
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                s = m.weight.abs().max() / qmax
                m.weight.copy_(torch.clamp(torch.round(m.weight / s), -qmax, qmax) * s)
        pred = q.eval()(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def test_one_command_stresses_a_cnn_from_its_own_file(newcomer, capsys):
    tmp, model, x, y = newcomer
    code, out, err = cli(
        capsys,
        "evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.safetensors",
        "--data", "npz:test.npz", "--bits", "4", "--out", "r.json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert "QuantConv2d" in out and "QuantLinear" in out and "wrote r.json" in out
    result = json.loads((tmp / "r.json").read_text())
    assert result["status"] == "complete" and result["evaluation"]["n_test"] == len(y)
    direct = _direct_accuracy(model, x, y, bits=4)
    assert result["clean_accuracy"] == pytest.approx(direct, abs=1e-12)
    assert 0.3 < direct < 1.0  # labels are the float model's predictions: 4 bits lose a little
    assert result["results"][0]["accuracies"] == [result["clean_accuracy"]] * 2  # BER 0 changes nothing
    cfg = result["config"]
    assert cfg["model"] == "mycnn.py:make_cnn" and cfg["data"] == "npz:test.npz"
    assert [r["layer"] for r in cfg["quantized_layers"]] == ["0", "4", "8"]
    assert cfg["quantization"]["bits"] == 4 and cfg["data_source"]["memory_mapped"] is True
    assert result["weights"]["file"] == str((tmp / "cnn.safetensors").resolve())
    assert (tmp / "r.csv").is_file() and not (tmp / "r.png").exists()
    # the stored result resumes (same settings) instead of recomputing or refusing
    code, _, err = cli(
        capsys,
        "evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.safetensors",
        "--data", "npz:test.npz", "--bits", "4", "--out", "r.json", *FAST,
    )  # fmt: skip
    assert code == 0, err


def test_pt_weights_folder_data_and_a_data_function(newcomer, capsys):
    tmp, model, _, _ = newcomer
    torch.save(model.state_dict(), tmp / "cnn.pt")
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (tmp / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "imgs" / cls / f"{i}.png")
    code, _, err = cli(
        capsys,
        "evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.pt", "--data", "folder:imgs",
        "--resize", "8", "--crop", "8", "--grayscale", "--mean", "0.5", "--std", "0.25",
        "--per-channel", "--quant", "asym", "--exclude", "8", "--out", "f.json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp / "f.json").read_text())
    assert result["evaluation"]["n_test"] == 6
    assert result["config"]["data_source"]["image"] == {
        "resize": 8, "crop": 8, "mean": [0.5], "std": [0.25], "mode": "L"
    }  # fmt: skip
    layers = result["config"]["quantized_layers"]
    assert [(r["layer"], r["quant"], r["per_channel"]) for r in layers] == [
        ("0", "asym", True),
        ("4", "asym", True),
    ]

    (tmp / "mydata.py").write_text(
        "import numpy as np\nimport torch\n"
        "def test_set():\n"
        "    d = np.load('test.npz')\n"
        "    return torch.utils.data.TensorDataset(torch.from_numpy(d['x']), torch.from_numpy(d['y']))\n"
    )
    code, _, err = cli(
        capsys, "evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.pt",
        "--data", "mydata:test_set", "--out", "p.json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    by_npz = cli(
        capsys, "evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.pt",
        "--data", "npz:test.npz", "--out", "n.json", *FAST,
    )  # fmt: skip
    assert by_npz[0] == 0
    p, n = (json.loads((tmp / f).read_text()) for f in ("p.json", "n.json"))
    assert p["results"] == n["results"] and p["fingerprint"] == n["fingerprint"]  # same data, same numbers


def _bad_inputs(tmp):
    (tmp / "broken.py").write_text("import torch\nraise ImportError('missing dependency foo')\n")
    marker = tmp / "pwned"
    torch.save(PickleBomb(marker), tmp / "evil.pt")
    three = tmp / "three.npz"
    np.savez(three, x=np.zeros((4, 3, 8, 8), dtype=np.float32), y=np.zeros(4, dtype=int))
    for k in range(6):  # six classes for a model with five outputs
        (tmp / "six" / f"c{k}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40 * k, dtype=np.uint8)).save(tmp / "six" / f"c{k}" / "0.png")
    return marker


BASE = ["evaluate", "--data", "npz:test.npz", "--out", "r.json"]
BAD = {
    "import-fails": (["--model", "broken.py:make"], ["broken.py:make", "ImportError: missing dependency"]),
    "factory-raises": (["--model", "mycnn.py:make_raises"], ["make_raises", "ValueError", "refuses"]),
    "not-a-module": (["--model", "mycnn.py:make_list"], ["returned a list"]),
    "weights-mismatch": (
        ["--model", "mycnn.py:make_cnn", "--model-arg", "channels=6", "--weights", "cnn.safetensors"],
        ["cnn.safetensors", "0.weight (4, 1, 3, 3) vs model (6, 1, 3, 3)"],
    ),
    "pickle-payload": (["--model", "mycnn.py:make_cnn", "--weights", "evil.pt"], ["evil.pt", "refuses"]),
    "unknown-data": (["--model", "mycnn.py:make_cnn", "--data", "imagenet"], ["unknown data spec", "npz:"]),
    "no-layer": (["--model", "mycnn.py:make_activations_only"], ["no nn.Linear or nn.Conv2d layer"]),
    "foreign-layout": (["--model", "mycnn.py:make_torch_quantized"], ["unsupported quantized layout"]),
    "quantized-with-bits": (["--model", "mycnn.py:make_quantized", "--bits", "4"], ["already holds"]),
    "labels-out-of-range": (["--model", "mycnn.py:make_cnn", "--model-arg", "classes=3"], ["out of range"]),
    "model-fails-on-data": (["--model", "mycnn.py:make_cnn", "--data", "npz:three.npz"], ["first batch"]),
    "more-classes-than-outputs": (
        ["--model", "mycnn.py:make_cnn", "--data", "folder:six", "--grayscale"],
        ["folder:six has 6 classes, the model 5 outputs"],
    ),
    "image-flags-on-npz": (["--model", "mycnn.py:make_cnn", "--resize", "8"], ["folder:DIR"]),
    "bad-quant": (["--model", "mycnn.py:make_cnn", "--quant", "int"], ["--quant"]),
    "bad-bits": (["--model", "mycnn.py:make_cnn", "--bits", "9"], ["--bits"]),
    "bad-model-arg": (["--model", "mycnn.py:make_cnn", "--model-arg", "channels"], ["key=value"]),
    "missing-file": (["--model", "mycnn.py:make_cnn", "--weights", "nope.pt"], ["nope.pt", "does not exist"]),
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(newcomer, capsys, case):
    tmp = newcomer[0]
    marker = _bad_inputs(tmp)
    extra, needles = BAD[case]
    code, out, err = cli(capsys, *BASE, *extra)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not any((tmp / f"r.{ext}").exists() for ext in ("json", "csv", "png"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["evaluate", "--model", "mycnn.py:make_cnn", "--out", "r.json"], "needs --data"),
        (["evaluate", "--model", "mycnn.py:make_cnn", "--data", "npz:test.npz"], "needs --out"),
        (["evaluate", "somerun", "--model", "mycnn.py:make_cnn", "--data", "digits"], "not both"),
        (["evaluate", "somerun", "--data", "digits"], "--data is for --model"),
        (["evaluate", "--out", "r.json"], "give a run directory"),
    ],
)
def test_the_two_forms_do_not_mix(newcomer, capsys, args, needle):
    code, _, err = cli(capsys, *args)
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (newcomer[0] / "r.json").exists()


def test_metrics_identity_and_formats_on_a_streamed_user_model(newcomer, capsys):
    tmp, model, x, y = newcomer
    (tmp / "mymetrics.py").write_text(
        "import math\n"
        "from qmargin.engine.metrics import Metric\n"
        "def true_logit(outputs, targets):\n"
        "    return float(outputs.gather(1, targets[:, None]).sum()), int(targets.numel())\n"
        "def broken(outputs, targets):\n"
        "    return math.nan, int(targets.numel())\n"
        "def loss_sum(outputs, targets):\n"
        "    import torch.nn.functional as F\n"
        "    return float(F.cross_entropy(outputs, targets, reduction='sum')), int(targets.numel())\n"
        "LOSS = Metric.from_callable(loss_sum, name='my loss', higher_is_better=False)\n"
    )
    common = ["evaluate", "--model", "mycnn.py:make_cnn", "--weights", "cnn.safetensors",
              "--data", "npz:test.npz", "--bits", "4", *FAST]  # fmt: skip
    # a user callable (sum, count): its clean value is the direct computation on the 4-bit model
    code, out, err = cli(capsys, *common, "--metric", "mymetrics.py:true_logit", "--out", "m.json")
    assert code == 0, err
    r = json.loads((tmp / "m.json").read_text())
    assert r["metric"]["name"] == "mymetrics.py:true_logit" and r["metric"]["higher_is_better"] is True
    assert "clean_value" in r and "values" in r["results"][0]
    assert r["results"][0]["values"] == [r["clean_value"]] * 2  # BER 0: nothing flips
    # top5 of a 5-class model is 1.0 at every BER; cross_entropy is lower-is-better
    code, out, err = cli(capsys, *common, "--metric", "top5", "--out", "t5.json")
    assert code == 0, err
    r5 = json.loads((tmp / "t5.json").read_text())
    assert r5["clean_value"] == 1.0 and all(v == 1.0 for e in r5["results"] for v in e["values"])
    code, out, err = cli(capsys, *common, "--metric", "mymetrics.py:LOSS", "--out", "l.json")
    assert code == 0, err
    rl = json.loads((tmp / "l.json").read_text())
    assert rl["metric"]["higher_is_better"] is False and "my loss" in out
    # --data-identity replaces the hash, and the file says which was used
    code, _, err = cli(capsys, *common, "--data-identity", "test-v1", "--out", "i.json")
    assert code == 0, err
    ri = json.loads((tmp / "i.json").read_text())
    assert ri["evaluation"]["data_fingerprint"] == "identity"
    assert ri["fingerprint"].get("data_identity") == "test-v1" and "data_sha256" not in ri["fingerprint"]
    r0 = json.loads((tmp / "t5.json").read_text())
    assert r0["evaluation"]["data_fingerprint"] == "sha256" and len(r0["fingerprint"]["data_sha256"]) == 64
    # another identity on resume: one line naming the setting, exit 2
    code, _, err = cli(capsys, *common, "--data-identity", "test-v2", "--out", "i.json")
    assert code == 2 and "data_identity" in err and "test-v1" in err and "test-v2" in err
    assert len(err.strip().splitlines()) == 1
    # a metric that returns NaN: one line, exit 2, nothing complete written
    code, _, err = cli(capsys, *common, "--metric", "mymetrics.py:broken", "--out", "n.json")
    assert code == 2 and "non-finite" in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "n.json").exists() or json.loads((tmp / "n.json").read_text())["status"] != "complete"
    # storage formats reach the --model path (recorded in the error model)
    code, _, err = cli(capsys, *common, "--storage", "sign-magnitude", "--saturate", "--out", "s.json")
    assert code == 0, err
    rs = json.loads((tmp / "s.json").read_text())
    assert rs["error_model"]["storage"] == "sign_magnitude" and rs["error_model"]["saturate"] is True
    # an unknown metric name: one line
    code, _, err = cli(capsys, *common, "--metric", "top-one", "--out", "u.json")
    assert code == 2 and "unknown metric" in err
    # --data-identity is for --model only
    code, _, err = cli(capsys, "evaluate", str(tmp), "--data-identity", "x", *FAST)
    assert code == 2 and "--data-identity" in err
