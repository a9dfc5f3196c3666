"""``qmargin sensitivity``: per-layer / per-bit cells, prefix reuse (exact), CI from qmargin.stats, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from external_helpers import import_file, write_cnn, write_test_set
from qmargin.cli import main
from qmargin.engine import Evaluation
from qmargin.engine.cells import prepared
from qmargin.engine.prefix import trace_model
from qmargin.engine.sensitivity import sensitivity, sensitivity_cells, stored_layers
from qmargin.errors import ConfigError
from qmargin.faults import BitErrorModel, inject
from qmargin.models.mlp import MLP
from qmargin.quant import QuantConv2d, QuantLinear, QuantSpec
from qmargin.stats import mean_confidence_interval, summarize_accuracies


def _mlp(bits: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(64, 10, (48, 32), spec=QuantSpec(bits)).eval()


def _data(n: int = 200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


class _Residual(nn.Module):
    """A skip connection around two quantized layers: the cut keeps two live values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = QuantConv2d(1, 4, 3, padding=1, spec=QuantSpec(4))
        self.conv2 = QuantConv2d(4, 4, 3, padding=1, spec=QuantSpec(4))
        self.conv3 = QuantConv2d(4, 4, 3, padding=1, spec=QuantSpec(3))  # a second word width
        self.head = QuantLinear(4 * 8 * 8, 5, spec=QuantSpec(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = h + torch.relu(self.conv3(torch.relu(self.conv2(h))))
        return self.head(h.flatten(1))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = QuantLinear(64, 16, spec=QuantSpec(4))
        self.fc2 = QuantLinear(16, 10, spec=QuantSpec(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            h = torch.relu(h)
        return self.fc2(h)


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.stored("weight").codes.clone() for n, m in model.named_modules() if hasattr(m, "quant_specs")
    }


def test_a_layer_cell_changes_only_that_layers_codes():
    model = _mlp()
    template = BitErrorModel()
    with prepared(model, torch.device("cpu"), template):
        layers = stored_layers(model, template)
        assert [la.name for la in layers] == ["fc1", "fc2", "fc3"]
        cells = sensitivity_cells(template, layers, "layer", 0.05)
        assert [c.kind for c in cells] == ["full", "layer", "layer", "layer"]
        clean = _codes(model)
        for cell in cells[1:]:
            (em,) = cell.error_models
            with inject(model, em, 7):
                now = _codes(model)
            changed = {n for n in clean if not torch.equal(clean[n], now[n])}
            assert changed == {cell.layer}
            # the pattern in the layer is the full model's pattern of the same seed restricted to it
            with inject(model, cells[0].error_models[0], 7):
                full = _codes(model)
            assert torch.equal(full[cell.layer], now[cell.layer])
        assert all(torch.equal(clean[n], c) for n, c in _codes(model).items())  # restored


@pytest.mark.parametrize("bit", [0, 2, 3])
def test_a_bit_cell_flips_only_that_bit_at_rate_p(bit):
    torch.manual_seed(0)
    model = nn.Sequential(QuantLinear(256, 256, spec=QuantSpec(4)), QuantLinear(256, 64, spec=QuantSpec(4)))
    p = 0.05
    template = BitErrorModel()
    with prepared(model, torch.device("cpu"), template):
        layers = stored_layers(model, template)
        cells = {c.bit: c for c in sensitivity_cells(template, layers, "bit", p) if c.kind == "bit"}
        assert sorted(cells) == [0, 1, 2, 3]
        clean = _codes(model)
        flips = words = 0
        for seed in range(5):
            with inject(model, cells[bit].error_models[0], seed) as report:
                now = _codes(model)
                assert report.n_exposed == sum(c.numel() for c in clean.values())  # one bit per word
            for n in clean:
                xor = (clean[n].to(torch.int16) ^ now[n].to(torch.int16)) & 0xF
                assert bool(((xor & ~(1 << bit)) == 0).all())  # no other position changed
                flips += int((xor != 0).sum())
                words += clean[n].numel()
    rate = flips / words
    sigma = (p * (1 - p) / words) ** 0.5
    assert abs(rate - p) < 5 * sigma, (rate, p, sigma)


def test_mixed_widths_get_one_error_model_per_width():
    model = _Residual().eval()
    template = BitErrorModel()
    with prepared(model, torch.device("cpu"), template):
        layers = stored_layers(model, template)
        cells = [c for c in sensitivity_cells(template, layers, "bit", 0.1) if c.kind == "bit"]
    assert [c.bit for c in cells] == [0, 1, 2, 3]
    assert [len(c.error_models) for c in cells] == [2, 2, 2, 1]  # bit 3 does not exist in 3-bit words
    assert cells[3].error_models[0].protected_bits == (0, 1, 2)


@pytest.mark.parametrize("by", ["layer", "layer-bit", "bit"])
def test_prefix_reuse_equals_full_passes_exactly(by):
    model = _mlp()
    x, y = _data()
    for metric in ("top1", "cross_entropy"):
        ev = Evaluation((x, y), metric, batch_size=64)
        a = sensitivity(model, ev, ber=0.03, by=by, patterns=3, base_seed=5)
        b = sensitivity(model, ev, ber=0.03, by=by, patterns=3, base_seed=5, reuse=False)
        c = sensitivity(model, ev, ber=0.03, by=by, patterns=3, base_seed=5, cache_bytes=1)  # batch groups
        assert a["prefix_reuse"]["used"] and not b["prefix_reuse"]["used"]
        for other in (b, c):
            assert [x["values"] for x in a["cells"]] == [x["values"] for x in other["cells"]]
            assert a["full"]["values"] == other["full"]["values"]
            assert [x["flipped_bits"] for x in a["cells"]] == [x["flipped_bits"] for x in other["cells"]]
        assert any(x["mean_drop"] != 0 for x in a["cells"])  # the comparison is not between clean values


def test_prefix_reuse_with_a_skip_connection_and_a_fallback():
    torch.manual_seed(2)
    model = _Residual().eval()
    g = torch.Generator().manual_seed(0)
    ev = Evaluation(
        (torch.randn(80, 1, 8, 8, generator=g), torch.randint(0, 5, (80,), generator=g)), batch_size=32
    )
    a = sensitivity(model, ev, ber=0.05, by="layer", patterns=3)
    b = sensitivity(model, ev, ber=0.05, by="layer", patterns=3, reuse=False)
    assert [c["values"] for c in a["cells"]] == [c["values"] for c in b["cells"]]
    conv3 = next(c for c in a["cells"] if c["layer"] == "conv3")
    assert conv3["prefix"]["live_values"] == 2  # h (the skip) and relu(conv2(h))
    # a model torch.fx cannot trace: full passes, said so, same numbers as forced full passes
    torch.manual_seed(0)
    m = _Untraceable().eval()
    x, y = _data(64)
    ev = Evaluation((x, y), batch_size=32)
    r = sensitivity(m, ev, ber=0.05, patterns=2)
    assert not r["prefix_reuse"]["used"] and "torch.fx" in r["prefix_reuse"]["reason"]
    f = sensitivity(m, ev, ber=0.05, patterns=2, reuse=False)
    assert [c["values"] for c in r["cells"]] == [c["values"] for c in f["cells"]]


def test_traced_split_outputs_equal_the_model():
    torch.manual_seed(2)
    model = _Residual().eval()
    with prepared(model, torch.device("cpu")):
        traced, reason = trace_model(model, ["conv1", "conv2", "conv3", "head"])
        assert traced is not None and reason is None
        x = torch.randn(4, 1, 8, 8)
        for layer in ("conv1", "conv2", "conv3", "head"):
            split = traced.split([layer])
            assert split.first == layer
            with torch.inference_mode():
                assert torch.equal(split.run_suffix(split.run_prefix(x)), model(x))


def test_drop_statistics_come_from_qmargin_stats():
    model = _mlp()
    x, y = _data()
    res = sensitivity(
        model, Evaluation((x, y), batch_size=100), ber=0.05, by="layer", patterns=6, base_seed=3
    )
    assert res["seeds"] == [3, 4, 5, 6, 7, 8] and res["schema"] == "qmargin.sensitivity"
    for cell in [res["full"], *res["cells"]]:
        drops = [res["clean_value"] - v for v in cell["values"]]
        assert cell["drops"] == drops
        s = summarize_accuracies(drops)
        lo, hi = mean_confidence_interval(s["mean"], s["std"], 6)
        assert (cell["mean_drop"], cell["std_drop"], cell["ci_low"], cell["ci_high"]) == (
            s["mean"],
            s["std"],
            lo,
            hi,
        )
    # lower-is-better metrics: a positive drop is still "worse"
    ce = sensitivity(model, Evaluation((x, y), "cross_entropy"), ber=0.2, patterns=2)
    assert ce["full"]["mean_drop"] > 0 and ce["full"]["mean_value"] > ce["clean_value"]


def test_library_errors():
    model = _mlp()
    ev = Evaluation(_data(), batch_size=100)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="BER"):
            sensitivity(model, ev, ber=bad)
    with pytest.raises(ConfigError, match="--by"):
        sensitivity(model, ev, ber=0.1, by="channel")
    with pytest.raises(ConfigError, match="no quantized layers"):
        sensitivity(nn.Sequential(nn.Linear(64, 10)), ev, ber=0.1, by="bit")
    with pytest.raises(ConfigError, match="hits no stored tensor"):
        sensitivity(model, ev, ber=0.1, template=BitErrorModel(layers=("nothing*",)))


# -- CLI ----------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def newcomer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cnn = write_cnn(tmp_path)
    torch.manual_seed(3)
    model = import_file(cnn).make_cnn()
    write_test_set(tmp_path / "test.npz", model)
    save_file(model.state_dict(), tmp_path / "cnn.safetensors")
    return tmp_path


MODEL = [
    "--model",
    "mycnn.py:make_cnn",
    "--weights",
    "cnn.safetensors",
    "--data",
    "npz:test.npz",
    "--bits",
    "4",
]


@pytest.mark.parametrize("by", ["layer", "layer-bit"])
def test_cli_writes_json_csv_png(newcomer, capsys, by):
    tmp = newcomer
    code, out, err = cli(
        capsys, "sensitivity", *MODEL, "--ber", "0.02", "--by", by, "--patterns", "3", "--out", "s.json",
        "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp / "s.json").read_text())
    assert res["schema"] == "qmargin.sensitivity" and res["schema_version"] == 1 and res["by"] == by
    assert res["fingerprint"]["model_sha256"] and res["weights"]["sha256"]
    assert res["config"]["model"] == "mycnn.py:make_cnn" and res["prefix_reuse"]["used"]
    layers = [la["layer"] for la in res["layers"]]
    assert layers == ["0", "4", "8"]
    n_cells = 3 if by == "layer" else 12
    assert len(res["cells"]) == n_cells
    rows = (tmp / "s.csv").read_text().splitlines()
    assert rows[0].startswith("kind,layer,bit,n,mean_value,mean_drop") and len(rows) == 2 + n_cells
    assert (tmp / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full model" in out and "wrote s.json" in out


def test_cli_on_a_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, "train", "--dataset", "digits", "--model", "mlp", "--bits", "4", "--epochs", "1",
        "--out", run, "--quiet", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = cli(capsys, "sensitivity", run, "--ber", "0.01", "--by", "bit", "--patterns", "2", "-q")
    assert code == 0, err
    res = json.loads((run / "sensitivity.json").read_text())
    assert [c["bit"] for c in res["cells"]] == [0, 1, 2, 3] and res["config"]["run_dir"] == str(run)
    for c in res["cells"]:
        assert c["exposed_bits"] == sum(t["numel"] for la in res["layers"] for t in la["tensors"])
    assert (run / "sensitivity.csv").is_file() and (run / "sensitivity.png").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--ber", "0"], "must be in (0.0, 1.0]"),
        (["--ber", "1.5"], "must be in (0.0, 1.0]"),
        (["--ber", "0.1", "--by", "channel"], "layer"),
        ([], "--ber"),
    ],
)
def test_cli_bad_flags_exit_2(newcomer, capsys, args, needle):
    code, out, err = cli(capsys, "sensitivity", *MODEL, "--out", "s.json", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (newcomer / "s.json").exists()


def test_cli_models_without_codes_exit_2(newcomer, capsys):
    code, _, err = cli(
        capsys, "sensitivity", "mycnn.py:make_activations_only", "--data", "npz:test.npz", "--ber", "0.1",
        "--by", "bit", "--out", "s.json",
    )  # fmt: skip
    assert code == 2 and "no nn.Linear or nn.Conv2d" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "sensitivity", "nowhere", "--ber", "0.1")
    assert code == 2 and "neither a run directory nor a model spec" in err
    code, _, err = cli(capsys, "sensitivity", "mycnn.py:make_cnn", "--ber", "0.1", "--out", "s.json")
    assert code == 2 and "--data" in err
    assert not (newcomer / "s.json").exists()
