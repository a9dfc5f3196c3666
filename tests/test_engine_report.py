"""Reports of results of other metrics than top-1: tables, compare and plots use the metric's name
and whether higher is better."""

from __future__ import annotations

import pytest

from qmargin.engine.store import summarize_accuracies
from qmargin.errors import ConfigError
from qmargin.report import compare_table, format_markdown_table, plot_accuracy_vs_ber, render_text

CE = {"name": "cross_entropy", "higher_is_better": False, "fraction": False}


def _ce_result(clean: float, per_ber: dict[float, list[float]]) -> dict:
    results = [{"ber": b, **summarize_accuracies(v), "values": v} for b, v in per_ber.items()]
    return {"clean_value": clean, "results": results, "metric": CE}


def test_lower_is_better_metric_tables_and_compare(tmp_path):
    a = _ce_result(0.30, {0.01: [0.5, 0.7], 0.1: [2.0, 3.0]})
    b = _ce_result(0.40, {0.01: [0.45, 0.55], 0.1: [2.5, 3.5]})
    md = format_markdown_table(a).splitlines()
    assert md[0] == "| BER | mean | std | min | max | patterns |"  # not a fraction: no percent
    assert md[2] == "| clean | 0.3000 | - | - | - | - |"
    assert md[3] == "| 0.01 | 0.6000 | 0.1000 | 0.5000 | 0.7000 | 2 |"
    assert md[-1] == "metric: cross_entropy (lower is better)"
    cmp = format_markdown_table([("a", a), ("b", b)], compare=True).splitlines()
    assert cmp[2] == "| clean | 0.3000 * | 0.4000 |"  # lower is better: a is best
    assert cmp[3] == "| 0.01 | 0.6000 ± 0.1000 | 0.5000 ± 0.0500 * |"
    assert cmp[4] == "| 0.1 | 2.5000 ± 0.5000 * | 3.0000 ± 0.5000 |"
    text = render_text(compare_table([("a", a), ("b", b)]))
    assert "lower is better" in text and "*: best" in text
    png = plot_accuracy_vs_ber([("a", a), ("b", b)], tmp_path / "ce.png", band="std")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_results_of_different_metrics_are_not_compared():
    top1 = {
        "clean_accuracy": 0.9,
        "results": [{"ber": 0.1, "accuracies": [0.5], **summarize_accuracies([0.5])}],
    }
    with pytest.raises(ConfigError, match="different metrics"):
        format_markdown_table([("acc", top1), ("ce", _ce_result(0.3, {0.1: [1.0]}))], compare=True)
