"""Result files for the HTML report tests, and the check that a page's numbers equal them.

``write_inputs(tmp)`` writes, in the formats qmargin writes them: a run directory (``ber.json`` and
``config.json``) and a campaign JSON of two top-1 models (10 patterns per BER, one BER not started in
the second), a cross-entropy campaign (lower is better), a certificate of ``qmargin certify``; the
committed reproduction summaries in ``docs/results`` are real inputs too.

``check_values(spans, expected)`` compares every machine-checkable element of a page (the dicts of
``collect_spans`` or of the browser: attributes and text) with the result files: every model, every
BER, every statistic, and the confidence interval recomputed with scipy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from qmargin.engine.store import summarize_accuracies, validate_campaign

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
HOSTILE = "<script>alert('x')</script> & \"quoted\""

TOP1 = {"name": "top1", "higher_is_better": True, "fraction": True}
CE = {"name": "cross_entropy", "higher_is_better": False, "fraction": False}


def campaign(
    clean: float,
    per_ber: dict[float, list[float]],
    *,
    metric: Mapping[str, Any] = TOP1,
    repeats: int | None = None,
    loss: str = "ce",
) -> dict[str, Any]:
    """A complete (or, with entries shorter than ``repeats``, partial) campaign result, validated."""
    top1 = metric["name"] == "top1"
    clean_key, key = ("clean_accuracy", "accuracies") if top1 else ("clean_value", "values")
    repeats = repeats or max(len(v) for v in per_ber.values())
    results = []
    for ber, values in per_ber.items():
        e: dict[str, Any] = {"ber": ber}
        if values:
            e.update(summarize_accuracies(values))
        e[key] = values
        results.append(e)
    data = {
        clean_key: clean,
        "results": results,
        "bers": list(per_ber),
        "repeats": repeats,
        "base_seed": 100,
        "seeds": [100 + r for r in range(repeats)],
        "error_model": {"kind": "bit_errors", "protected_bits": []},
        "config": {"dataset": "digits", "model": "mlp", "bits": 4, "loss": loss, "quant": "sym"},
        "fingerprint": {"model_sha256": "ab" * 32, "data_sha256": "cd" * 32},
        "evaluation": {"n_test": 359, "count_failures": False, "patterns_per_pass": 1},
        "metric": dict(metric),
        "qmargin_version": "0.1.0",
        "schema_version": 2,
        "status": "complete" if all(len(v) == repeats for v in per_ber.values()) else "partial",
        "timing": {"seconds": 1.5, "patterns_done": sum(len(v) for v in per_ber.values())},
    }
    return validate_campaign("test", data)


def certificate() -> dict[str, Any]:
    rows = []
    for bits, dw in ((3, 0.6751), (4, 0.2893), (8, 0.0155)):
        rows.append(
            {
                "bits": bits,
                "per_channel": True,
                "delta_w_norm": dw,
                "margin": 0.4632,
                "margin_quantized": 0.4632 - dw * 0.6,
                "certified": dw < 0.4632,
                "monotone": True,
                "pr_rate": 0.9 + bits / 1000,
                "fb_rate": None if bits == 3 else 0.97,
                "max_certified_bit_flips": 0,
                "max_certified_bit_flips_msb2_protected": bits,
                "ber": 0.01,
                "ber_seed": 0,
                "ber_certified_share": 0.25 * (bits - 2) / 2,
                "ber_monotone_share": 1.0,
            }
        )
    return {"source": "runs/mon", "format": "qmargin run", "per_channel": True, "results": rows}


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def write_inputs(tmp: Path) -> dict[str, Any]:
    """The report's inputs (paths) and the results they hold, labelled as the report labels them."""
    rng = np.random.default_rng(1)
    bers = [0.0, 1e-3, 1e-2, 5e-2]

    def values(level: float, slope: float, n: int = 10) -> list[float]:
        return [float(np.clip(level - slope + 0.03 * rng.standard_normal(), 0, 1)) for _ in range(n)]

    ce = campaign(0.9749, {b: values(0.9749, 6 * b) for b in bers})
    mcel = campaign(
        0.9694, {**{b: values(0.9694, 2 * b) for b in bers[:3]}, 5e-2: []}, repeats=10, loss="mcel"
    )
    xent = campaign(
        0.21, {b: [float(0.21 + 9 * b + 0.05 * rng.random()) for _ in range(6)] for b in bers[1:]}, metric=CE
    )
    run = tmp / "ce4"
    write_json(run / "ber.json", ce)
    write_json(
        run / "config.json",
        {
            "config": {"dataset": "digits", "model": "mlp", "bits": 4, "loss": "ce"},
            "input_shape": [1, 8, 8],
            "num_classes": 10,
        },
    )
    mcel_path = write_json(tmp / "mcel4" / "ber.json", mcel)
    xent_path = write_json(tmp / "xent.json", xent)
    cert_path = write_json(tmp / "cert.json", certificate())
    return {
        "paths": [run, mcel_path, xent_path, cert_path],
        "campaigns": {"ce4": ce, "mcel4": mcel, "xent": xent},
        "groups": [["ce4", "mcel4"], ["xent"]],
        "certificate": certificate(),
    }


# -- reading a page -----------------------------------------------------------------------------


class _Spans(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[dict[str, Any]] = []
        self._open: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "span" and "v" in (a.get("class") or "").split():
            span = {"attrs": {k[5:]: v for k, v in a.items() if k.startswith("data-")}, "text": ""}
            self.spans.append(span)
            self._open.append(span)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1]["text"] += data


def collect_spans(page: str) -> list[dict[str, Any]]:
    """Every ``<span class="v">``: ``{"attrs": {data-* without the prefix}, "text": ...}``."""
    p = _Spans()
    p.feed(page)
    return p.spans


# The same, in the browser (JavaScript returning the same dicts).
SPANS_JS = """
Array.from(document.querySelectorAll('span.v')).map(e => ({
  attrs: Object.fromEntries(Object.entries(e.dataset)), text: e.textContent }))
"""


def expected_text(value: Any, fmt: str) -> str:
    if fmt == "bool":
        return "yes" if value else "no"
    if fmt.startswith("100*"):
        return format(100.0 * value, fmt[4:])
    return format(value, fmt)


def _ci(mean: float, std: float, n: int) -> tuple[float, float]:
    """The interval the report promises, by scipy: Student t with the sample std (ddof 1)."""
    sample_std = std * math.sqrt(n / (n - 1))
    lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=sample_std / math.sqrt(n))
    return float(lo), float(hi)


def _seed_map(res: Mapping[str, Any], e: Mapping[str, Any]) -> dict[int, float]:
    values = e.get("accuracies", e.get("values")) or []
    pats = e.get("patterns", list(range(len(values))))
    return {res["seeds"][r]: v for r, v in zip(pats, values, strict=True)}


def _check_paired(mine: list[Mapping[str, Any]], labels: list[str], campaigns: Mapping[str, Any]) -> int:
    """The paired-difference spans: every later model against the first, per BER with shared seeds,
    recomputed here with numpy and scipy (paired t)."""
    diffs = [a for a in mine if a["stat"].startswith("diff_")]
    want: dict[tuple[str, str, str], float] = {}
    ref = campaigns[labels[0]]
    ref_entries = {e["ber"]: e for e in ref["results"]}
    for label in labels[1:]:
        res = campaigns[label]
        for e in res["results"]:
            if e["ber"] not in ref_entries:
                continue
            a, b = _seed_map(ref, ref_entries[e["ber"]]), _seed_map(res, e)
            shared = sorted(set(a) & set(b))
            if not shared:
                continue
            d = np.array([b[s] - a[s] for s in shared])
            key = (label, json.dumps(e["ber"]))
            want[(*key, "diff_mean")] = float(d.mean())
            want[(*key, "diff_n")] = len(d)
            if len(d) > 1:
                scale = d.std(ddof=1) / math.sqrt(len(d))
                lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scale)
                want[(*key, "diff_ci_low")], want[(*key, "diff_ci_high")] = float(lo), float(hi)
    got = {(a["model"], a["ber"], a["stat"]): json.loads(a["value"]) for a in diffs}
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    for k, v in want.items():
        assert math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12), (k, got[k], v)
    return len(want)


def check_values(spans: Iterable[Mapping[str, Any]], inputs: Mapping[str, Any]) -> int:
    """Every number of the page equals the result files; every model x BER x statistic is there.
    Returns the number of values checked."""
    spans = list(spans)
    checked = 0
    for s in spans:  # the text is the formatted value
        a = s["attrs"]
        assert s["text"] == expected_text(json.loads(a["value"]), a["format"]), s
    campaign_spans = [s["attrs"] for s in spans if "group" in s["attrs"]]
    for g, labels in enumerate(inputs["groups"], 1):
        mine = [a for a in campaign_spans if a["group"] == str(g)]
        assert {a["model"] for a in mine} == set(labels), (g, labels)
        for label in labels:
            res = inputs["campaigns"][label]
            clean = res.get("clean_accuracy", res.get("clean_value"))
            got = [json.loads(a["value"]) for a in mine if a["model"] == label and a["stat"] == "clean"]
            assert got == [clean], (label, got)
            checked += 1
            for e in res["results"]:
                at = [
                    a
                    for a in mine
                    if a["model"] == label
                    and a.get("ber") == json.dumps(e["ber"])
                    and not a["stat"].startswith("diff_")
                ]
                values = e.get("accuracies", e.get("values"))
                if not values:
                    assert not at, (label, e["ber"])
                    continue
                n = len(values)
                want = {**summarize_accuracies(values), "patterns": n}
                want["ci_low"], want["ci_high"] = _ci(want["mean"], want["std"], n)
                seen = {a["stat"] for a in at}
                assert seen == set(want), (label, e["ber"], seen)
                for a in at:
                    got = json.loads(a["value"])
                    key = a["stat"]
                    if key in ("ci_low", "ci_high"):
                        assert math.isclose(got, want[key], rel_tol=1e-12, abs_tol=1e-14), (
                            label,
                            a,
                            want[key],
                        )
                    else:
                        assert got == want[key] and got == e.get(key, n), (label, a)  # exact: the JSON value
                    checked += 1
        checked += _check_paired(mine, labels, inputs["campaigns"])
    cert = inputs.get("certificate")
    if cert is not None:
        cells = [s["attrs"] for s in spans if s["attrs"].get("table") == "certificate"]
        assert cells, "no certificate table"
        for a in cells:
            row = cert["results"][int(a["row"])]
            assert json.loads(a["value"]) == row[a["stat"]], a
            checked += 1
        keys = {(int(a["row"]), a["stat"]) for a in cells}
        for i in range(len(cert["results"])):
            for k in (
                "bits",
                "delta_w_norm",
                "margin",
                "margin_quantized",
                "certified",
                "ber_certified_share",
            ):
                assert (i, k) in keys, (i, k)
    return checked
