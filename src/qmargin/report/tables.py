"""Tables of bit-error campaign results (design.md §4): rich tables and markdown.

Inputs are the plain result dicts of :func:`qmargin.experiments.run_ber_campaign` (or the JSON it
wrote): either one result or a list of ``(label, result)`` pairs. Accuracies are shown in percent
by default (``100 * a``); a BER row shows the mean ``a_bar_p``, the population standard deviation,
the minimum and maximum over the ``R`` patterns. The first row of every model is its clean accuracy.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from qmargin.errors import ConfigError

__all__ = ["ber_table", "compare_table", "format_markdown_table", "render_text", "as_labelled", "format_ber"]

Result = Mapping[str, Any]
Results = Result | Sequence[tuple[str, Result]]
DASH = "-"


def as_labelled(results: Results) -> list[tuple[str, Result]]:
    """``[(label, result), ...]`` from one result (label ``""``) or a list of pairs; checks the shape."""
    if isinstance(results, Mapping):
        items: list[tuple[str, Result]] = [("", results)]
    else:
        items = []
        for item in results:
            if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], Mapping)):
                raise ConfigError("expected a campaign result or a list of (label, result) pairs")
            items.append((str(item[0]), item[1]))
    if not items:
        raise ConfigError("no campaign results given")
    for label, res in items:
        for key in ("clean_accuracy", "results"):
            if key not in res:
                raise ConfigError(f"result {label!r} is not a campaign result (no {key!r})")
    return items


def format_ber(ber: float) -> str:
    """A BER as written in tables and plots: ``0``, ``0.001``, ``1e-05``, ``0.0015`` (``%g``)."""
    return "0" if ber == 0 else f"{float(ber):g}"


def _acc(v: float | None, percent: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    return f"{100.0 * v:.2f}" if percent else f"{v:.4f}"


def _pm(mean: float | None, std: float | None, percent: bool) -> str:
    if mean is None:
        return DASH
    return f"{_acc(mean, percent)} ± {_acc(std, percent)}" if std is not None else _acc(mean, percent)


def _mean_failures(res: Mapping[str, Any]) -> str:
    f = res.get("failures")
    return f"{sum(f) / len(f):.1f}" if f else DASH


def _ber_rows(items: list[tuple[str, Result]], percent: bool) -> tuple[list[str], list[list[str]], set[int]]:
    """Headers, rows (strings) and indices of the text (left-aligned) columns of the BER table."""
    labelled = any(label for label, _ in items)
    failures = any("clean_failures" in r or any("failures" in e for e in r["results"]) for _, r in items)
    unit = " (%)" if percent else ""
    headers = (["model"] if labelled else []) + [
        "BER",
        f"mean{unit}",
        f"std{unit}",
        f"min{unit}",
        f"max{unit}",
        "patterns",
    ]
    if failures:
        headers.append("failures/pattern")
    rows: list[list[str]] = []
    for label, res in items:
        prefix = [label] if labelled else []
        clean = [*prefix, "clean", _acc(res["clean_accuracy"], percent), DASH, DASH, DASH, DASH]
        if failures:
            cf = res.get("clean_failures")
            clean.append(DASH if cf is None else f"{cf:.1f}" if isinstance(cf, float) else str(cf))
        rows.append(clean)
        for e in res["results"]:
            row = [*prefix, format_ber(e["ber"])]
            row += [_acc(e.get(k), percent) for k in ("mean", "std", "min", "max")]
            row.append(str(len(e.get("accuracies", []))))
            if failures:
                row.append(_mean_failures(e))
            rows.append(row)
    return headers, rows, ({0, 1} if labelled else {0})


def _compare_rows(
    items: list[tuple[str, Result]], percent: bool
) -> tuple[list[str], list[list[str]], set[int]]:
    bers = sorted({float(e["ber"]) for _, r in items for e in r["results"]})
    headers = ["BER"] + [label or f"model {i + 1}" for i, (label, _) in enumerate(items)]
    rows = [["clean"] + [_acc(r["clean_accuracy"], percent) for _, r in items]]
    for ber in bers:
        row = [format_ber(ber)]
        for _, r in items:
            e = next((e for e in r["results"] if float(e["ber"]) == ber), None)
            row.append(DASH if e is None else _pm(e.get("mean"), e.get("std"), percent))
        rows.append(row)
    return headers, rows, {0}


def _rich(headers: list[str], rows: list[list[str]], text_cols: set[int], title: str | None) -> Table:
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i in text_cols else "right")
    for row in rows:
        table.add_row(*row)
    return table


def ber_table(results: Results, *, title: str | None = None, percent: bool = True) -> Table:
    """Clean accuracy and per-BER mean / std / min / max accuracy (one block of rows per model)."""
    return _rich(*_ber_rows(as_labelled(results), percent), title)


def compare_table(results: Results, *, title: str | None = None, percent: bool = True) -> Table:
    """Models side by side: one column per model, rows clean and every BER (``mean ± std``)."""
    return _rich(*_compare_rows(as_labelled(results), percent), title)


def format_markdown_table(results: Results, *, compare: bool = False, percent: bool = True) -> str:
    """The :func:`ber_table` (or, with ``compare``, the :func:`compare_table`) as a markdown table."""
    items = as_labelled(results)
    headers, rows, text_cols = (_compare_rows if compare else _ber_rows)(items, percent)

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" if i in text_cols else "---:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_text(table: Table, width: int = 120) -> str:
    """A rich table rendered to plain text (no colour codes)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(table)
    return buf.getvalue()
