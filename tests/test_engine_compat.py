"""Result files written before the engine (schema 1, tests/data/campaign_v0, made on main f4ed90d)
load, are reproduced exactly by the engine and resume."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qmargin.engine import load_campaign, stress
from qmargin.engine.store import SCHEMA_VERSION, upgrade
from qmargin.errors import ConfigError
from qmargin.experiments import run_ber_campaign

DATA = Path(__file__).parent / "data" / "campaign_v0"


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixture", DATA / "make_fixture.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fx():
    mod = _fixture_module()
    model = mod.mlp()
    model.load_state_dict(load_file(str(DATA / "mlp.safetensors")))
    _, _, xte, yte = mod.digits()
    return mod, model, xte, yte


def _values(res):
    return res["clean_accuracy"], [e["accuracies"] for e in res["results"]]


def test_old_files_load_as_schema_1():
    for name in ("plain", "flagged", "plain_partial"):
        old = load_campaign(DATA / f"{name}.json")
        assert "schema_version" not in old and "metric" not in old
        up = upgrade(old)
        assert up["schema_version"] == SCHEMA_VERSION and up["metric"]["name"] == "top1"


def test_engine_reproduces_old_accuracies(fx):
    mod, model, xte, yte = fx
    for name, wrap, kwargs in (
        ("plain", lambda m: m, {"bers": [0.0, 0.02, 0.1], "repeats": 4, "base_seed": 11, "batch_size": 128}),
        (
            "flagged",
            lambda m: mod.Flagged(m, mod.THRESHOLD),
            {"bers": [0.0, 0.05], "repeats": 3, "base_seed": 3, "batch_size": 50},
        ),
    ):
        old = json.loads((DATA / f"{name}.json").read_text())
        new = run_ber_campaign(wrap(model), xte, yte, config={"fixture": name}, **kwargs)
        assert _values(new) == _values(old)
        assert new["fingerprint"] == old["fingerprint"]  # same model and data hashes as before
        if name == "flagged":
            assert new["clean_failures"] == old["clean_failures"]
            assert [e["failures"] for e in new["results"]] == [e["failures"] for e in old["results"]]
            assert any(f > 0 for e in new["results"] for f in e["failures"])
        # the streaming path (batches from a list) gives the same accuracies
        batches = [(xte[i : i + 64], yte[i : i + 64]) for i in range(0, len(yte), 64)]
        kw = {k: v for k, v in kwargs.items() if k != "batch_size"}
        streamed = stress(wrap(model), batches, **kw)
        assert _values(streamed) == _values(old)


def test_old_files_resume(fx, tmp_path: Path):
    _, model, xte, yte = fx
    out = tmp_path / "ber.json"
    shutil.copy(DATA / "plain_partial.json", out)
    done = []
    res = run_ber_campaign(
        model,
        xte,
        yte,
        bers=[0.0, 0.02, 0.1],
        repeats=4,
        base_seed=11,
        batch_size=128,
        out_path=out,
        config={"fixture": "plain"},
        progress=lambda p: done.append(p.done),
    )
    assert done == list(range(7, 13))  # 6 patterns were stored, the other 6 ran
    old = json.loads((DATA / "plain.json").read_text())
    assert _values(res) == _values(old)
    assert json.loads(out.read_text())["schema_version"] == SCHEMA_VERSION
    # another setting: named with old and new value, in one line
    shutil.copy(DATA / "plain_partial.json", out)
    with pytest.raises(ConfigError) as err:
        run_ber_campaign(
            model,
            xte,
            yte,
            bers=[0.0, 0.02, 0.1],
            repeats=5,
            base_seed=11,
            batch_size=64,
            out_path=out,
            config={"fixture": "plain"},
        )
    msg = str(err.value)
    assert "\n" not in msg and "repeats 4 -> 5" in msg and "evaluation.batch_size 128 -> 64" in msg
