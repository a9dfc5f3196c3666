"""Storage formats of symmetric codes (twos, offset binary, sign-magnitude) and saturating decode.

The references below are written with Python strings of bits, independently of the tensor codec in
``qmargin.quant.codes``; every code and every single-bit flip is checked at 2 and 4 bits.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from qmargin.errors import ConfigError
from qmargin.faults import (
    BitErrorModel,
    derive_seed,
    inject,
    make_generator,
    popcount,
    sample_flips,
    sample_stuck_bits,
)
from qmargin.quant import QuantConfigError, QuantSpec, freeze_model, quantize_model, quantized_modules
from qmargin.quant.codes import STORAGE_FORMATS, bit_weights, check_storage, from_words, to_words

FORMATS = ("twos", "offset", "sign_magnitude")


def ref_word(code: int, bits: int, storage: str) -> str:
    """The b-character bit string (MSB first) of ``code``."""
    h = 2 ** (bits - 1)
    if storage == "twos":
        return format(code if code >= 0 else 2**bits + code, f"0{bits}b")
    if storage == "offset":
        return format(code + h, f"0{bits}b")
    assert abs(code) < h
    return ("1" if code < 0 else "0") + format(abs(code), f"0{bits - 1}b")


def ref_code(word: str, storage: str, saturate: bool = False) -> int:
    """The code a bit string (MSB first) decodes to."""
    bits = len(word)
    h = 2 ** (bits - 1)
    if storage == "twos":
        code = int(word[1:], 2) - (h if word[0] == "1" else 0)
    elif storage == "offset":
        code = int(word, 2) - h
    else:
        code = (-1 if word[0] == "1" else 1) * int(word[1:], 2)
    if saturate:
        code = max(-(h - 1), min(h - 1, code))
    return code


def flip(word: str, j: int) -> str:
    """Flip bit j (0 = LSB) of a MSB-first bit string."""
    i = len(word) - 1 - j
    return word[:i] + ("0" if word[i] == "1" else "1") + word[i + 1 :]


def codes_of(bits: int, storage: str) -> list[int]:
    h = 2 ** (bits - 1)
    lo = -(h - 1) if storage == "sign_magnitude" else -h
    return list(range(lo, h))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("storage", FORMATS)
def test_every_code_and_single_flip_matches_direct_bit_manipulation(bits, storage):
    codes = codes_of(bits, storage)
    t = torch.tensor(codes, dtype=torch.int8)
    words = to_words(t, bits, storage)
    assert [format(int(w), f"0{bits}b") for w in words] == [ref_word(c, bits, storage) for c in codes]
    assert torch.equal(from_words(words, bits, True, storage), t)
    for j in range(bits):
        flipped = from_words(words ^ (1 << j), bits, True, storage)
        assert flipped.tolist() == [ref_code(flip(ref_word(c, bits, storage), j), storage) for c in codes]
        sat = from_words(words ^ (1 << j), bits, True, storage, saturate=True)
        assert sat.tolist() == [
            ref_code(flip(ref_word(c, bits, storage), j), storage, saturate=True) for c in codes
        ]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("storage", FORMATS)
def test_saturating_decode_clamps_only_outside_the_range(bits, storage):
    words = torch.arange(2**bits, dtype=torch.int16).to(torch.uint8)
    raw = from_words(words, bits, True, storage)
    sat = from_words(words, bits, True, storage, saturate=True)
    qmax = 2 ** (bits - 1) - 1
    assert torch.equal(sat, raw.clamp(-qmax, qmax))
    assert int((sat != raw).sum()) == (0 if storage == "sign_magnitude" else 1)


def test_the_issue_example_at_2_bits():
    """Sign-bit flip of code 0: -2 in two's complement, -1 (= -qmax) in offset binary after a clamp."""
    zero = torch.zeros(1, dtype=torch.int8)
    assert from_words(to_words(zero, 2, "twos") ^ 2, 2, True, "twos").item() == -2
    assert from_words(to_words(zero, 2, "offset") ^ 2, 2, True, "offset").item() == -2
    assert from_words(to_words(zero, 2, "offset") ^ 2, 2, True, "offset", saturate=True).item() == -1
    assert from_words(to_words(zero, 2, "sign_magnitude") ^ 2, 2, True, "sign_magnitude").item() == 0


def test_one_bit_and_unsigned_codes_are_the_same_in_every_format():
    sign = torch.tensor([-1, 1], dtype=torch.int8)
    unsigned = torch.arange(16, dtype=torch.uint8)
    for storage in FORMATS:
        assert to_words(sign, 1, storage).tolist() == [0, 1]
        assert torch.equal(from_words(torch.tensor([0, 1]), 1, True, storage, saturate=True), sign)
        assert torch.equal(to_words(unsigned, 4, storage), unsigned)
        assert torch.equal(from_words(unsigned, 4, False, storage, saturate=True), unsigned)


def test_bit_weights_per_format():
    assert bit_weights(4, True, "twos").tolist() == [1, 2, 4, -8]
    assert bit_weights(4, True, "offset").tolist() == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="sign-magnitude"):
        bit_weights(4, True, "sign_magnitude")
    # offset binary: a flip of bit j changes the code by w_j (1 - 2 bit_j), as for two's complement
    codes = torch.arange(-8, 8, dtype=torch.int8)
    for storage in ("twos", "offset"):
        words = to_words(codes, 4, storage)
        w = bit_weights(4, True, storage)
        for j in range(4):
            delta = from_words(words ^ (1 << j), 4, True, storage).double() - codes.double()
            assert torch.equal(delta, w[j] * (1 - 2 * ((words >> j) & 1).double()))


def test_storage_names():
    assert STORAGE_FORMATS == FORMATS
    assert check_storage("sign-magnitude") == "sign_magnitude"
    for bad in ("ones", "", None, 2):
        with pytest.raises(ValueError, match="storage format"):
            check_storage(bad)


def test_quantspec_fields_validated_and_serialised():
    spec = QuantSpec(4, storage="sign-magnitude", saturate=True)
    assert spec.storage == "sign_magnitude"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    # default fields are left out, so older files (without them) and new default specs read alike
    assert QuantSpec(4).to_dict() == {"bits": 4, "symmetric": True, "per_channel": False, "w_max": None}
    assert QuantSpec.from_dict({"bits": 4}).storage == "twos"
    assert not QuantSpec.from_dict({"bits": 4}).saturate
    with pytest.raises(QuantConfigError, match="storage format"):
        QuantSpec(4, storage="ones")  # type: ignore[arg-type]
    with pytest.raises(QuantConfigError, match="saturate"):
        QuantSpec(4, saturate="yes")  # type: ignore[arg-type]
    with pytest.raises(QuantConfigError, match="symmetric"):
        QuantSpec(4, symmetric=False, storage="offset")


def _net(spec: QuantSpec) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 3))
    quantize_model(net, spec)
    freeze_model(net)
    return net


def _codes(net: nn.Module) -> list[torch.Tensor]:
    return [m.stored("weight").codes.clone() for _, m in quantized_modules(net)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("storage", FORMATS)
@pytest.mark.parametrize("saturate", [False, True])
@pytest.mark.parametrize("where", ["spec", "error_model"])
def test_inject_flips_the_same_bits_and_decodes_per_format(bits, storage, saturate, where):
    """Random flips hit the same bit positions in every format (shape-only sampler); each word is
    decoded per its format. The format comes from the spec or, overriding it, from the error model."""
    if where == "spec":
        net = _net(QuantSpec(bits, storage=storage, saturate=saturate))  # type: ignore[arg-type]
        em = BitErrorModel(ber=0.15)
    else:
        net = _net(QuantSpec(bits))
        em = BitErrorModel(ber=0.15, storage=storage, saturate=saturate)  # type: ignore[arg-type]
    clean = _codes(net)
    twos_net = _net(QuantSpec(bits))
    with inject(twos_net, BitErrorModel(ber=0.15), seed=3):
        after = _codes(twos_net)
    masks = [to_words(c, bits) ^ to_words(c0, bits) for c, c0 in zip(after, clean, strict=True)]
    with inject(net, em, seed=3) as report:
        got = _codes(net)
    for c0, mask, c in zip(clean, masks, got, strict=True):
        expected = [
            ref_code(format(int(w) ^ int(m), f"0{bits}b"), storage, saturate)
            for w, m in zip(to_words(c0, bits, storage).flatten(), mask.flatten(), strict=True)
        ]
        assert c.flatten().tolist() == expected
    assert report.n_flipped == report.n_changed == sum(int(popcount(m).sum()) for m in masks) > 0
    assert all(torch.equal(a, b) for a, b in zip(_codes(net), clean, strict=True))  # exact restore


@pytest.mark.parametrize("storage", FORMATS)
def test_later_kinds_see_the_stored_word_not_the_decode(storage):
    """Flips then stuck-at with saturation: the stuck bits act on the flipped words as memory holds
    them (a -0 of sign-magnitude, a word the decode clamps), computed here from the kinds' own
    samplers on words. Re-encoding the decoded codes between the kinds would differ."""
    net = _net(QuantSpec(3))
    em = BitErrorModel(ber=0.3, stuck_at_0=0.1, stuck_at_1=0.1, storage=storage, saturate=True)  # type: ignore[arg-type]
    clean = _codes(net)
    names = [name for name, _ in quantized_modules(net)]
    with inject(net, em, seed=11):
        got = _codes(net)
    differs = False
    for name, c0, c in zip(names, clean, got, strict=True):
        words = to_words(c0.flatten(), 3, storage)
        g = make_generator(derive_seed(11, name, "weight"))
        sites = sample_flips(words, 3, p01=0.3, p10=0.3, seed=g)
        words[sites.index] ^= sites.mask
        g = make_generator(derive_seed(11, name, "weight", "stuck_at"))
        stuck = sample_stuck_bits(words.numel(), 3, rate_0=0.1, rate_1=0.1, seed=g)
        naive = to_words(from_words(words, 3, True, storage, saturate=True), 3, storage)
        words[stuck.index] = (words[stuck.index] & ~stuck.to_zero) | stuck.to_one
        naive[stuck.index] = (naive[stuck.index] & ~stuck.to_zero) | stuck.to_one
        expected = [ref_code(format(int(w), "03b"), storage, True) for w in words]
        assert c.flatten().tolist() == expected
        differs |= not torch.equal(from_words(naive, 3, True, storage, saturate=True), c.flatten())
    assert differs  # the case is exercised


def test_formats_of_unsigned_codes_and_bad_codes_are_refused():
    net = _net(QuantSpec(4, symmetric=False))
    offset = BitErrorModel(ber=0.1, storage="offset")
    with pytest.raises(ConfigError, match="symmetric"), inject(net, offset, seed=0):
        pass
    with inject(net, BitErrorModel(ber=0.1, saturate=True), seed=0):  # no-op for unsigned words
        pass
    net = _net(QuantSpec(4))
    m = next(iter(quantized_modules(net)))[1]
    m.stored("weight").codes.view(-1)[0] = -8  # a two's-complement word sign-magnitude cannot hold
    sm = BitErrorModel(ber=0.1, storage="sign_magnitude")
    with pytest.raises(ConfigError, match="no 4-bit sign_magnitude word"), inject(net, sm, seed=0):
        pass
    with pytest.raises(ConfigError, match="storage format"):
        BitErrorModel(storage="ones")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="saturate"):
        BitErrorModel(saturate="no")  # type: ignore[arg-type]


def test_error_model_records_the_format_only_when_set():
    assert set(BitErrorModel().to_dict()).isdisjoint({"storage", "saturate", "nested_max"})
    em = BitErrorModel(storage="sign-magnitude", saturate=False)
    assert em.to_dict()["storage"] == "sign_magnitude" and em.to_dict()["saturate"] is False
    assert BitErrorModel.from_dict(em.to_dict()) == em
    assert em.with_ber(0.01).storage == "sign_magnitude"


def test_offset_binary_flips_change_codes_as_twos_complement_does():
    """Offset binary is two's complement with the MSB inverted: XOR flips act alike on the codes."""
    for bits in (2, 4, 8):
        codes = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int16).to(torch.int8)
        masks = torch.arange(2**bits, dtype=torch.int16).to(torch.uint8)
        for storage in ("twos", "offset"):
            words = to_words(codes, bits, storage).unsqueeze(1) ^ masks
            out = from_words(words, bits, True, storage)
            if storage == "twos":
                reference = out
        assert torch.equal(out, reference)


def _bit_tables():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bit_tables.py"
    spec = importlib.util.spec_from_file_location("bit_tables", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_tables_are_the_generated_ones():
    bit_tables = _bit_tables()
    doc = (Path(__file__).resolve().parent.parent / "docs" / "bit-conventions.md").read_text()
    assert bit_tables.doc_section(doc) == bit_tables.tables()
    # the 2-bit example of the issue, as the doc shows it
    assert "| 0 | `00` | 1 | -2 → -1 |" in bit_tables.full_table(2, "twos")
    assert "| 0 | `10` | 1 | -2 → -1 |" in bit_tables.full_table(2, "offset")
    assert "| 0 | `00` | 1 | -0 |" in bit_tables.full_table(2, "sign_magnitude")


def test_evaluate_records_storage_saturation_and_nesting(tmp_path, capsys):
    """``evaluate --storage/--saturate/--nested``: the campaign runs on the run's codes, the choices
    are in the result's settings, and a resume with another format is refused."""
    import json

    from qmargin.cli import main
    from qmargin.experiments.evaluate import evaluate_run
    from qmargin.training import TrainConfig, train

    run = tmp_path / "run"
    config = TrainConfig(dataset="digits", model="mlp", bits=4, epochs=1, batch_size=512, device="cpu")
    train(config, out_dir=run)
    out = tmp_path / "ber.json"
    args = {"bers": [0.0, 0.01, 0.05], "repeats": 2, "base_seed": 100, "out_path": out, "device": "cpu"}
    result = evaluate_run(run, storage="sign-magnitude", saturate=True, nested=True, **args)
    em = result["error_model"]
    assert (em["storage"], em["saturate"], em["nested_max"]) == ("sign_magnitude", True, 0.05)
    with pytest.raises(ConfigError, match="error_model"):
        evaluate_run(run, storage="offset", saturate=True, nested=True, **args)
    again = evaluate_run(run, storage="sign_magnitude", saturate=True, nested=True, **args)  # resumes
    assert again["results"] == result["results"]
    plain = evaluate_run(run, **{**args, "out_path": tmp_path / "plain.json"})
    assert set(plain["error_model"]).isdisjoint({"storage", "saturate", "nested_max"})
    # the CLI options reach it (in process: the CLI's own tests cover the subprocess entry point)
    cli = tmp_path / "cli.json"
    common = ["evaluate", str(run), "--ber", "0,0.01", "--repeats", "1", "--no-plot", "-q", "--device", "cpu"]
    assert main([*common, "--out", str(cli), "--storage", "offset", "--saturate", "--nested"]) == 0
    em = json.loads(cli.read_text())["error_model"]
    assert (em["storage"], em["saturate"], em["nested_max"]) == ("offset", True, 0.01)
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--out", str(tmp_path / "bad.json"), "--storage", "ones"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--storage" in err and "sign-magnitude" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
