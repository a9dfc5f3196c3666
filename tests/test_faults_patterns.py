"""Pinned patterns: `inject` must corrupt the same bits as before the fault-kind refactor.

The hashes below were computed with the pre-refactor ``inject`` (flips then stuck-at hard-coded in
``qmargin.faults.inject``) on a seeded model mixing widths 8/6/4/1 (symmetric) and 8/6/4/2
(asymmetric) codes, with biases. A change of stream names, sampler calls or fault order changes
them; so does a change of the report counts.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from qmargin.faults import BitErrorModel, inject
from qmargin.quant import QuantSpec, quantize_model, quantized_modules

CASES: dict[str, dict] = {
    "ber": {"ber": 0.1},
    "ber_stuck0": {"ber": 0.1, "stuck_at_0": 0.05},
    "asym_both_stuck": {"p01": 0.2, "p10": 0.03, "stuck_at_0": 0.04, "stuck_at_1": 0.07, "tensors": None},
    "prot_stuck1": {"ber": 0.3, "stuck_at_1": 0.1, "protected_bits": (0, -1)},
    "stuck_only": {"stuck_at_0": 0.1, "stuck_at_1": 0.2},
}

# "{sym|asym}/{case}/{seed}": (sha256 of every code tensor inside the injection,
#                              (n_flipped, n_stuck, n_changed) of the report)
PINNED: dict[str, tuple[str, tuple[int, int, int]]] = {
    "sym/ber/0": ("9ee21dacab4da49a9b0f5906a6070be5f83fe021f8db53ab8c155b83aecd5077", (144, 0, 144)),
    "sym/ber/11": ("85cd5c875bd5b62f6115c8d8b0c5153d779de8a7515ce32b3b2bffd49c4f893b", (122, 0, 122)),
    "sym/ber_stuck0/0": ("f1caff9b9ddfb1b9569637a06c392cec142351401382486d9e2fe8797a554c55", (144, 62, 174)),
    "sym/ber_stuck0/11": ("05c21f140967fa3ca94e1e8809eb48e1e24f1231d3f918a56613b7d71a6a4ee2", (122, 74, 153)),
    "sym/asym_both_stuck/0": (
        "f1f27d26deff8147a3d3e0847cae2212438bd1bde4e51bcb96174f643288df0e",
        (162, 138, 205),
    ),
    "sym/asym_both_stuck/11": (
        "59cb5aeb60d546a49fda40b5a81747a8bae0f42240b9abe23dbc0375cf7c03d9",
        (136, 145, 194),
    ),
    "sym/prot_stuck1/0": ("2ce74e3e61ac6226864d744b3ee2d7354cc49be256283868a379f5401218adc9", (243, 76, 254)),
    "sym/prot_stuck1/11": (
        "d7327698126f1b842f6001e9693215efbee56f0a012500c513492303d1daa590",
        (215, 85, 232),
    ),
    "sym/stuck_only/0": ("b5f81e8c27d2144cd8d051751beb34a64c5ca0ac784b9b7e0c8a88d62206b1a5", (0, 381, 196)),
    "sym/stuck_only/11": ("cdc5af2d3970f9bc4e2e7221ef2d797dece062a4c2e87443cf3df001520e154a", (0, 385, 185)),
    "asym/ber/0": ("7f21a221c2b2990ca2a31162d941c25a73666d5ef25ccb0f5e6937580508cdd0", (145, 0, 145)),
    "asym/ber/11": ("e82e99600d8b47594ca6bcdc28bb70e1602fc9025985b74261ad01fb13e24821", (122, 0, 122)),
    "asym/ber_stuck0/0": ("baa7881136180eeeea2f3b58f5308d60b1b859fb830e30357493e11c4e1b72c3", (145, 62, 170)),
    "asym/ber_stuck0/11": (
        "beee212d0343c4b4d7b30d639f188005e10dbbd738776825ada8f8a8c1d2509b",
        (122, 76, 150),
    ),
    "asym/asym_both_stuck/0": (
        "2056298310707db6d5d7d15c1d7048adea6382f9666ab3d410574ad87c67bab5",
        (171, 139, 220),
    ),
    "asym/asym_both_stuck/11": (
        "1077587acca6e09039a5c9b5914d0ac6d9d5cbffa117d3230d1a95c46c72c9dd",
        (142, 147, 195),
    ),
    "asym/prot_stuck1/0": (
        "b516226b786afc2b314a56a0b31a2bac31600e35e31cda99fbab1917d240c30a",
        (243, 76, 261),
    ),
    "asym/prot_stuck1/11": (
        "5bfac7c90576e49790087fabda406812649175b0fd45fc289b9e1d61d89585b8",
        (215, 85, 234),
    ),
    "asym/stuck_only/0": ("2d02e6a972d318ce5aa3490d78a2748ef0e4c0ce683dd1137719ed4f96663692", (0, 389, 196)),
    "asym/stuck_only/11": ("9eb882975b5bdbe20bd0096b26440fc9062f8d97b9a3be21b7091edbf62d6567", (0, 388, 198)),
}


def _net(symmetric: bool) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.Linear(5, 3))
    spec8, bias6 = QuantSpec(8, symmetric=symmetric), QuantSpec(6, symmetric=symmetric)
    quantize_model(m, spec8, include=["0"], bias_spec=bias6)
    quantize_model(m, QuantSpec(4, symmetric=symmetric), include=["3"])
    quantize_model(m, QuantSpec(1) if symmetric else QuantSpec(2, symmetric=False), include=["4"])
    for _, q in quantized_modules(m):
        q.freeze()
    return m


def _codes_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for n, q in quantized_modules(model):
        for t in q.quant_specs:
            c = q.stored(t).codes
            h.update(f"{n}.{t}:{c.dtype}:{tuple(c.shape)}:".encode())
            h.update(c.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_patterns_and_counts_are_pinned(symmetric):
    net = _net(symmetric)
    clean = _codes_hash(net)
    for case, kw in CASES.items():
        for seed in (0, 11):
            key = f"{'sym' if symmetric else 'asym'}/{case}/{seed}"
            with inject(net, BitErrorModel(**kw), seed=seed) as report:
                got = (_codes_hash(net), (report.n_flipped, report.n_stuck, report.n_changed))
            assert got == PINNED[key], key
            assert _codes_hash(net) == clean, key


def test_to_dict_is_pinned():
    """Result files and campaign fingerprints store ``to_dict()``: its keys, order and values are fixed."""
    m = BitErrorModel(
        ber=1e-3,
        p10=0.0,
        stuck_at_1=0.25,
        protected_bits=(7, -1),
        layers="fc*",
        layer_types=(nn.Linear,),
        tensors=("weight", "bias"),
    )
    expected = {
        "ber": 1e-3,
        "p01": None,
        "p10": 0.0,
        "stuck_at_0": 0.0,
        "stuck_at_1": 0.25,
        "protected_bits": [-1, 7],
        "layers": ["fc*"],
        "exclude": [],
        "layer_types": ["Linear"],
        "tensors": ["weight", "bias"],
    }
    assert json.dumps(m.to_dict()) == json.dumps(expected)
    assert json.dumps(BitErrorModel().to_dict()) == json.dumps(
        {
            "ber": 0.0,
            "p01": None,
            "p10": None,
            "stuck_at_0": 0.0,
            "stuck_at_1": 0.0,
            "protected_bits": [],
            "layers": ["*"],
            "exclude": [],
            "layer_types": None,
            "tensors": ["weight", "W", "U"],
        }
    )
    assert BitErrorModel.from_dict(expected) == m
