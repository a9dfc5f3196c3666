"""Rendering a sensitivity result (:func:`qmargin.engine.sensitivity.sensitivity`, a plain dict).

* :func:`sensitivity_table`: a rich table, one row per cell (the full model first), sorted as stored;
* :func:`sensitivity_csv`: the same rows as CSV text;
* :func:`plot_sensitivity`: a PNG: a heat map layer x bit of the mean drop for ``by="layer-bit"``,
  bar charts with 95% CI error bars for ``by="layer"`` / ``"bit"``.

Drops are in the metric's units (percentage points for metrics whose values are fractions).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from qmargin.files import atomic_path

__all__ = ["sensitivity_table", "sensitivity_csv", "plot_sensitivity", "sensitivity_rows"]

Result = Mapping[str, Any]


def _scale(res: Result) -> float:
    return 100.0 if (res.get("metric") or {}).get("fraction", True) else 1.0


def _unit(res: Result) -> str:
    return " (pp)" if _scale(res) == 100.0 else ""


def _label(cell: Mapping[str, Any]) -> str:
    if cell["kind"] == "full":
        return "full model"
    if cell["kind"] == "layer":
        return str(cell["layer"])
    if cell["kind"] == "bit":
        return f"bit {cell['bit']}"
    return f"{cell['layer']} bit {cell['bit']}"


def sensitivity_rows(res: Result) -> list[dict[str, Any]]:
    """One flat row per cell (the full model first): what the table and the CSV show."""
    rows = []
    for cell in [res["full"], *res["cells"]]:
        rows.append(
            {
                "kind": cell["kind"],
                "layer": cell["layer"] if cell["layer"] is not None else "",
                "bit": cell["bit"] if cell["bit"] is not None else "",
                "n": cell["n"],
                "mean_value": cell["mean_value"],
                "mean_drop": cell["mean_drop"],
                "std_drop": cell["std_drop"],
                "ci_low": cell["ci_low"] if cell["ci_low"] is not None else "",
                "ci_high": cell["ci_high"] if cell["ci_high"] is not None else "",
                "min_drop": cell["min_drop"],
                "max_drop": cell["max_drop"],
                "exposed_bits": cell["exposed_bits"],
                "observed_ber": cell["observed_ber"],
            }
        )
    return rows


def sensitivity_csv(res: Result) -> str:
    """CSV text of :func:`sensitivity_rows` (values in the metric's own units, fractions as stored)."""
    rows = sensitivity_rows(res)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _f(v: Any, k: float) -> str:
    return "-" if v is None or v == "" else f"{k * float(v):.2f}"


def sensitivity_table(res: Result, *, title: str | None = None) -> Table:
    """A rich table of the cells: metric under errors, mean drop ± std, 95% CI, exposed bits."""
    k = _scale(res)
    unit = _unit(res)
    table = Table(title=title, title_justify="left")
    for col, right in (
        ("cell", False),
        (f"value{unit}", True),
        (f"mean drop{unit}", True),
        ("std", True),
        ("95% CI", True),
        ("exposed bits", True),
        ("observed BER", True),
    ):
        table.add_column(col, justify="right" if right else "left")
    for cell in [res["full"], *res["cells"]]:
        ci = "-" if cell["ci_low"] is None else f"[{_f(cell['ci_low'], k)}, {_f(cell['ci_high'], k)}]"
        table.add_row(
            _label(cell),
            _f(cell["mean_value"], k),
            _f(cell["mean_drop"], k),
            _f(cell["std_drop"], k),
            ci,
            str(cell["exposed_bits"]),
            f"{cell['observed_ber']:.3g}",
        )
    table.caption = (
        f"clean {_f(res['clean_value'], k)}; BER {res['ber']:g}; {res['patterns']} paired patterns per cell "
        f"(seeds {res['base_seed']}..{res['base_seed'] + res['patterns'] - 1}); drop = clean - faulty"
    )
    return table


def plot_sensitivity(res: Result, path: str | Path, *, title: str | None = None, dpi: int = 110) -> Path:
    """Write the sensitivity figure of ``res`` to ``path`` (PNG, atomically); returns ``path``."""
    k = _scale(res)
    unit = _unit(res)
    cells = list(res["cells"])
    by = res["by"]
    if by == "layer-bit":
        layers = list(dict.fromkeys(c["layer"] for c in cells))
        bits = sorted({int(c["bit"]) for c in cells})
        grid = [[float("nan")] * len(bits) for _ in layers]
        for c in cells:
            grid[layers.index(c["layer"])][bits.index(int(c["bit"]))] = k * float(c["mean_drop"])
        fig = Figure(figsize=(1.2 + 0.7 * len(bits), 1.2 + 0.45 * len(layers)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(bits)), [str(b) for b in bits])
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("bit position (0 = LSB)")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=7)
        fig.colorbar(im, ax=ax, label=f"mean drop{unit}")
    else:
        labels = [_label(c) for c in cells]
        means = [k * float(c["mean_drop"]) for c in cells]
        lows = [
            0.0 if c["ci_low"] is None else means[i] - k * float(c["ci_low"]) for i, c in enumerate(cells)
        ]
        highs = [
            0.0 if c["ci_high"] is None else k * float(c["ci_high"]) - means[i] for i, c in enumerate(cells)
        ]
        fig = Figure(figsize=(max(4.0, 0.6 * len(cells) + 1.5), 3.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(len(cells)), means, yerr=[lows, highs], capsize=3, color="tab:blue")
        ax.axhline(k * float(res["full"]["mean_drop"]), color="tab:red", ls="--", lw=1, label="full model")
        ax.set_xticks(range(len(cells)), labels, rotation=30 if by == "layer" else 0, ha="right")
        ax.set_ylabel(f"mean drop{unit}, 95% CI")
        ax.legend(fontsize=8)
    ax.set_title(title or f"sensitivity at BER {res['ber']:g} ({res['patterns']} patterns)", fontsize=9)
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return target
