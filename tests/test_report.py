"""Report layer: rich / markdown tables and the accuracy-vs-BER plot of campaign results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.table import Table

from qmargin.errors import ConfigError
from qmargin.experiments import summarize_accuracies
from qmargin.report import (
    ber_table,
    compare_table,
    format_ber,
    format_markdown_table,
    plot_accuracy_vs_ber,
    render_text,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result(clean: float, per_ber: dict[float, list[float]], failures: bool = False) -> dict:
    results = []
    for ber, accs in per_ber.items():
        e = {"ber": ber, **summarize_accuracies(accs), "accuracies": accs}
        if failures:
            e["failures"] = [2 * i for i in range(len(accs))]
        results.append(e)
    out = {"clean_accuracy": clean, "results": results}
    if failures:
        out["clean_failures"] = 1
    return out


@pytest.fixture()
def two_results():
    rng = np.random.default_rng(0)
    bers = [0.0, 1e-4, 1e-3, 1e-2, 5e-2]
    a = _result(0.981, {p: [float(0.98 - 8 * p - 0.02 * rng.random()) for _ in range(5)] for p in bers})
    b = _result(0.975, {p: [float(0.975 - 3 * p - 0.01 * rng.random()) for _ in range(5)] for p in bers[1:]})
    return [("CE", a), ("MCEL | M=30", b)]


def test_format_ber():
    assert [format_ber(p) for p in (0.0, 0.001, 1e-5, 0.0015, 0.1)] == [
        "0",
        "0.001",
        "1e-05",
        "0.0015",
        "0.1",
    ]


def test_ber_table_single_result():
    res = _result(0.9, {0.01: [0.8, 0.85, 0.9], 0.1: [0.1, 0.3]})
    table = ber_table(res, title="t")
    assert isinstance(table, Table)
    assert [c.header for c in table.columns][:2] == ["BER", "mean (%)"]
    assert table.row_count == 3
    text = render_text(table)
    assert "85.00" in text and "4.08" in text and "20.00" in text and "clean" in text
    md = format_markdown_table(res)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 3
    assert lines[0] == "| BER | mean (%) | std (%) | min (%) | max (%) | patterns |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|"
    assert lines[2] == "| clean | 90.00 | - | - | - | - |"
    assert lines[3] == "| 0.01 | 85.00 | 4.08 | 80.00 | 90.00 | 3 |"
    assert lines[4] == "| 0.1 | 20.00 | 10.00 | 10.00 | 30.00 | 2 |"
    frac = format_markdown_table(res, percent=False).splitlines()
    assert frac[3] == "| 0.01 | 0.8500 | 0.0408 | 0.8000 | 0.9000 | 3 |"


def test_ber_table_labelled_and_failures(two_results):
    res = _result(0.5, {0.01: [0.4, 0.6]}, failures=True)
    md = format_markdown_table([("deq", res)] + two_results).splitlines()
    assert md[0].startswith("| model | BER |") and md[0].endswith("| failures/pattern |")
    assert md[2] == "| deq | clean | 50.00 | - | - | - | - | 1 |"
    assert md[3] == "| deq | 0.01 | 50.00 | 10.00 | 40.00 | 60.00 | 2 | 1.0 |"
    assert any(line.startswith("| MCEL \\| M=30 | clean |") for line in md)  # pipes escaped
    assert len(md) == 2 + (1 + 1) + (1 + 5) + (1 + 4)


def test_compare_table(two_results):
    table = compare_table(two_results)
    assert [c.header for c in table.columns] == ["BER", "CE", "MCEL | M=30"]
    assert table.row_count == 1 + 5
    md = format_markdown_table(two_results, compare=True).splitlines()
    a = two_results[0][1]["results"][3]
    assert md[3].startswith("| 0 | ") and md[3].endswith(" | - |")  # model b has no BER-0 row
    b = two_results[1][1]["results"][2]
    cells = [f"{100 * e['mean']:.2f} ± {100 * e['std']:.2f}" for e in (a, b)]
    best = 0 if a["mean"] > b["mean"] else 1  # the higher mean accuracy is marked
    cells[best] += " *"
    assert md[6] == f"| 0.01 | {cells[0]} | {cells[1]} |"
    assert md[2] == "| clean | 98.10 * | 97.50 |" and md[-1] == "*: best of the row"


def test_partial_results_render():
    res = {
        "clean_accuracy": 0.7,
        "results": [{"ber": 0.01, "accuracies": [0.5]}, {"ber": 0.1, "accuracies": []}],
    }
    res["results"][0].update(summarize_accuracies([0.5]))
    md = format_markdown_table(res).splitlines()
    assert md[4] == "| 0.1 | - | - | - | - | 0 |"
    assert "- |" in format_markdown_table([("x", res)], compare=True).splitlines()[-1]


def test_bad_inputs():
    with pytest.raises(ConfigError):
        ber_table([])
    with pytest.raises(ConfigError, match="results"):
        ber_table({"clean_accuracy": 0.5})
    with pytest.raises(ConfigError):
        compare_table([("a", 3)])
    with pytest.raises(ConfigError, match="band"):
        plot_accuracy_vs_ber({"clean_accuracy": 0.5, "results": []}, "x.png", band="iqr")


@pytest.mark.parametrize("band", ["minmax", "std"])
def test_plot_writes_png(two_results, tmp_path: Path, band):
    import matplotlib.image as mpimg

    out = plot_accuracy_vs_ber(two_results, tmp_path / "plots" / "acc.png", title="digits, 4 bit", band=band)
    assert out == tmp_path / "plots" / "acc.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["acc.png"]  # no temporary file left


def test_plot_single_result_and_clean_only(tmp_path: Path):
    res = _result(0.9, {0.01: [0.8, 0.85, 0.9]})
    assert plot_accuracy_vs_ber(res, tmp_path / "one.png").read_bytes()[:8] == PNG_SIGNATURE
    same = [0.975] * 10  # mean of equal values can differ from them in the last bit
    only_clean = {
        "clean_accuracy": 0.975,
        "results": [{"ber": 0.0, **summarize_accuracies(same), "accuracies": same}],
    }
    assert plot_accuracy_vs_ber(only_clean, tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE


# -- the reproductions' markdown: the committed docs/results/*.md regenerate from their JSON ----------

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _ablation_md(stored: dict) -> str:
    from qmargin.report import ablation_markdown

    rows = stored["rows"]
    # bits, BERs and seeds are in the rows; epochs, patterns and tolerance are run_mcel_ablation's defaults
    return ablation_markdown(
        rows,
        stored["selected"],
        bits=list(dict.fromkeys(r["bits"] for r in rows)),
        bers=[float(k.removeprefix("ber_")) for k in rows[0] if k.startswith("ber_")],
        seeds=rows[0]["seeds"],
        epochs=30,
        repeats=20,
        clean_tolerance=0.01,
    )


def _render(name: str, stored: dict) -> str:
    from qmargin.report import mcel_markdown, mondeq_markdown

    if name.startswith("mcel_ablation"):
        return _ablation_md(stored)
    return (mcel_markdown if name.startswith("mcel_") else mondeq_markdown)(stored)


@pytest.mark.parametrize("name", ["mcel_fast", "mcel_ablation", "mondeq_fast", "mondeq_full"])
def test_committed_results_render_identically(name):
    import json

    stored = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    assert _render(name, stored) == (RESULTS / f"{name}.md").read_text(encoding="utf-8")
    # the comparison can fail: a changed number changes the table
    first = stored["rows"][0] if "rows" in stored else stored["float"][0]
    key = "clean" if name == "mcel_ablation" else "accuracy" if "accuracy" in first else "results"
    if key == "results":
        first["results"][0]["mean"] = 0.123456
    elif key == "clean":
        first["clean"] = [0.123456] * len(first["clean"])
    else:
        first["accuracy"] = 0.123456
    assert _render(name, stored) != (RESULTS / f"{name}.md").read_text(encoding="utf-8")


def _mondeq_summary() -> dict:
    rng = np.random.default_rng(0)
    dist = 10 ** rng.uniform(-4, -1, 30)
    ptq = [
        {
            "bits": b,
            "per_channel": pc,
            "delta_w_norm": 2.0**-b,
            "margin_quantized": 0.2 - 2.0**-b,
            "margin": 0.2,
        }
        for pc in (False, True)
        for b in (3, 4, 8)
    ]
    disp = [
        {
            "bits": "8",
            "distances": dist.tolist(),
            "bound_full": (2 * dist).tolist(),
            "bound_paper": dist.tolist(),
        }
    ]
    return {"ptq": ptq, "displacement": disp}


def test_mondeq_plots_write_pngs(tmp_path: Path):
    from qmargin.report import plot_mondeq_displacement, plot_mondeq_margin_vs_bits

    s = _mondeq_summary()
    a = plot_mondeq_margin_vs_bits(s, tmp_path / "out" / "m.png")
    b = plot_mondeq_displacement(s, tmp_path / "out" / "d.png")
    assert a.read_bytes()[:8] == PNG_SIGNATURE and b.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.png", "m.png"]
    # the same results draw the same bytes
    assert plot_mondeq_margin_vs_bits(s, tmp_path / "again.png").read_bytes() == a.read_bytes()
