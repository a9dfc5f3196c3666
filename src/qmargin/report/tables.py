"""Tables of bit-error campaign results (design.md §4): rich tables and markdown.

Inputs are the plain result dicts of :func:`qmargin.engine.run_campaign` (or the JSON it wrote):
either one result or a list of ``(label, result)`` pairs. Fractions (top-1, top-k accuracy) are
shown in percent by default (``100 * a``), other metrics (cross-entropy, user metrics) as they are;
a BER row shows the mean ``a_bar_p``, the population standard deviation, the minimum and maximum
over the ``R`` patterns. The first row of every model is its clean value. The result's ``metric``
(absent: top-1) names the metric and says whether higher is better: tables of another metric than
top-1 say so in their caption, and the compare table marks the best model of every row (``*``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from qmargin.errors import ConfigError
from qmargin.stats import CI_LEVEL, paired_difference

__all__ = [
    "ber_table",
    "compare_table",
    "format_markdown_table",
    "render_text",
    "as_labelled",
    "format_ber",
    "metric_of",
    "metric_label",
    "clean_value",
    "entry_values",
    "entry_count",
    "seed_values",
    "paired_rows",
    "paired_table",
]

Result = Mapping[str, Any]
Results = Result | Sequence[tuple[str, Result]]
DASH = "-"
BEST = " *"
_TOP1 = {"name": "top1", "higher_is_better": True, "fraction": True}


def metric_of(res: Result) -> dict[str, Any]:
    """The result's metric (``name``, ``higher_is_better``, ``fraction``, options); top-1 when absent
    (files written before metrics were recorded)."""
    m = res.get("metric")
    return {**_TOP1, **m} if isinstance(m, Mapping) else dict(_TOP1)


def metric_label(metric: Mapping[str, Any]) -> str:
    """``accuracy``, ``top-5 accuracy``, ``cross_entropy``, a user metric's name."""
    name = str(metric.get("name"))
    if name == "top1":
        return "accuracy"
    if name == "topk":
        return f"top-{metric.get('k')} accuracy"
    return name


def clean_value(res: Result) -> float:
    """The clean value: ``clean_accuracy`` (top-1) or ``clean_value`` (other metrics)."""
    return float(res["clean_accuracy"] if "clean_accuracy" in res else res["clean_value"])


def entry_values(entry: Mapping[str, Any]) -> list[float]:
    """Per-pattern values of a BER entry: ``accuracies`` (top-1) or ``values``."""
    return list(entry.get("accuracies", entry.get("values", [])))


def seed_values(res: Result, entry: Mapping[str, Any]) -> dict[int, float]:
    """``{pattern seed: value}`` of a BER entry of a campaign result (empty for a summary that
    stores only statistics). Pattern ``r`` has seed ``res["seeds"][r]`` (``base_seed + r``)."""
    values = entry_values(entry)
    seeds = res.get("seeds")
    if not values or not isinstance(seeds, list):
        return {}
    pats = entry.get("patterns")
    pats = pats if isinstance(pats, list) else list(range(len(values)))
    return {int(seeds[r]): float(v) for r, v in zip(pats, values, strict=True)}


def paired_rows(items: list[tuple[str, Result]]) -> list[dict[str, Any]]:
    """Every model after the first against the first (the reference), per BER both hold: the paired
    difference over their shared pattern seeds (:func:`qmargin.stats.paired_difference`), as
    ``{"model", "reference", "ber", "n", "mean", "ci_low", "ci_high"}`` (rows without shared seeds
    are left out)."""
    if len(items) < 2:
        return []
    ref_label, ref = items[0]
    ref_entries = {float(e["ber"]): e for e in ref["results"]}
    out = []
    for label, res in items[1:]:
        for e in res["results"]:
            ber = float(e["ber"])
            if ber not in ref_entries:
                continue
            d = paired_difference(seed_values(ref, ref_entries[ber]), seed_values(res, e))
            if d is not None:
                out.append({"model": label, "reference": ref_label, "ber": ber, **d})
    return out


def paired_table(results: Results, *, title: str | None = None, percent: bool = True) -> Table | None:
    """The paired differences of :func:`paired_rows` as a table (``None`` for fewer than 2 models
    or no shared seeds)."""
    headers, rows = _paired(as_labelled(results), percent)
    return _rich(headers, rows, {0, 1}, title) if rows else None


def _paired(items: list[tuple[str, Result]], percent: bool) -> tuple[list[str], list[list[str]]]:
    percent = _percent(items, percent)
    unit = " (points)" if percent else ""
    labels = [label or f"model {i + 1}" for i, (label, _) in enumerate(items)]
    named = [(labels[i], r) for i, (_, r) in enumerate(items)]
    headers = [
        "model - reference",
        "BER",
        f"mean difference{unit}",
        f"{100 * CI_LEVEL:g}% CI{unit}",
        "shared seeds",
    ]
    rows = []
    for d in paired_rows(named):
        ci = (
            DASH
            if d["ci_low"] is None
            else f"[{_diff(d['ci_low'], percent)}, {_diff(d['ci_high'], percent)}]"
        )
        rows.append(
            [
                f"{d['model']} - {d['reference']}",
                format_ber(d["ber"]),
                _diff(d["mean"], percent),
                ci,
                str(d["n"]),
            ]
        )
    return headers, rows


def _diff(v: float, percent: bool) -> str:
    return f"{100.0 * v:+.2f}" if percent else f"{v:+.4f}"


def entry_count(entry: Mapping[str, Any]) -> int:
    """Number of patterns of a BER entry: its values, or ``patterns`` where a summary stores only the
    statistics (a reproduction's ``summary.json``)."""
    values = entry_values(entry)
    return len(values) if values else int(entry.get("patterns", 0))


def _identity(metric: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metric.items() if k not in ("higher_is_better", "fraction")}


def as_labelled(results: Results) -> list[tuple[str, Result]]:
    """``[(label, result), ...]`` from one result (label ``""``) or a list of pairs; checks the shape
    and that every result uses the same metric."""
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
        if "results" not in res:
            raise ConfigError(f"result {label!r} is not a campaign result (no 'results')")
        if "clean_accuracy" not in res and "clean_value" not in res:
            raise ConfigError(f"result {label!r} is not a campaign result (no 'clean_accuracy')")
    metrics = {json.dumps(_identity(metric_of(r)), sort_keys=True) for _, r in items}
    if len(metrics) > 1:
        names = sorted({metric_label(metric_of(r)) for _, r in items})
        raise ConfigError(
            f"the results measure different metrics ({', '.join(names)}); compare like with like"
        )
    return items


def _percent(items: list[tuple[str, Result]], percent: bool) -> bool:
    """Percent only for fractions."""
    return percent and bool(metric_of(items[0][1])["fraction"])


def _caption(items: list[tuple[str, Result]]) -> str | None:
    m = metric_of(items[0][1])
    if m["name"] == "top1":
        return None
    return f"metric: {metric_label(m)} ({'higher' if m['higher_is_better'] else 'lower'} is better)"


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
    percent = _percent(items, percent)
    labelled = any(label for label, _ in items)
    failures = any("clean_failures" in r or any("failures" in e for e in r["results"]) for _, r in items)
    stopping = any("ci_halfwidth" in e for _, r in items for e in r["results"])
    unit = " (%)" if percent else ""
    headers = (["model"] if labelled else []) + [
        "BER",
        f"mean{unit}",
        f"std{unit}",
        f"min{unit}",
        f"max{unit}",
        "patterns",
    ]
    if stopping:
        headers.append(f"{100 * CI_LEVEL:g}% CI ±{' (points)' if percent else ''}")
    if failures:
        headers.append("failures/pattern")
    rows: list[list[str]] = []
    for label, res in items:
        prefix = [label] if labelled else []
        clean = [*prefix, "clean", _acc(clean_value(res), percent), DASH, DASH, DASH, DASH]
        if stopping:
            clean.append(DASH)
        if failures:
            cf = res.get("clean_failures")
            clean.append(DASH if cf is None else f"{cf:.1f}" if isinstance(cf, float) else str(cf))
        rows.append(clean)
        for e in res["results"]:
            row = [*prefix, format_ber(e["ber"])]
            row += [_acc(e.get(k), percent) for k in ("mean", "std", "min", "max")]
            row.append(str(entry_count(e)))
            if stopping:
                hw = e.get("ci_halfwidth")
                row.append(DASH if hw is None else _acc(hw, percent))
            if failures:
                row.append(_mean_failures(e))
            rows.append(row)
    return headers, rows, ({0, 1} if labelled else {0})


def _compare_rows(
    items: list[tuple[str, Result]], percent: bool
) -> tuple[list[str], list[list[str]], set[int]]:
    percent = _percent(items, percent)
    higher = bool(metric_of(items[0][1])["higher_is_better"])
    bers = sorted({float(e["ber"]) for _, r in items for e in r["results"]})
    headers = ["BER"] + [label or f"model {i + 1}" for i, (label, _) in enumerate(items)]

    def marked(cells: list[str], means: list[float | None]) -> list[str]:
        """Mark the best mean of the row (several models; ties all marked)."""
        known = [m for m in means if m is not None and not math.isnan(m)]
        if len(items) < 2 or len(known) < 2:
            return cells
        best = max(known) if higher else min(known)
        return [c + BEST if m == best else c for c, m in zip(cells, means, strict=True)]

    cleans: list[float | None] = [clean_value(r) for _, r in items]
    rows = [["clean"] + marked([_acc(v, percent) for v in cleans], cleans)]
    for ber in bers:
        cells, means = [], []
        for _, r in items:
            e = next((e for e in r["results"] if float(e["ber"]) == ber), None)
            cells.append(DASH if e is None else _pm(e.get("mean"), e.get("std"), percent))
            means.append(None if e is None or e.get("mean") is None else float(e["mean"]))
        rows.append([format_ber(ber)] + marked(cells, means))
    return headers, rows, {0}


def _rich(
    headers: list[str],
    rows: list[list[str]],
    text_cols: set[int],
    title: str | None,
    caption: str | None = None,
) -> Table:
    table = Table(title=title, caption=caption)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i in text_cols else "right")
    for row in rows:
        table.add_row(*row)
    return table


def ber_table(results: Results, *, title: str | None = None, percent: bool = True) -> Table:
    """Clean value and per-BER mean / std / min / max of the metric (one block of rows per model)."""
    items = as_labelled(results)
    return _rich(*_ber_rows(items, percent), title, _caption(items))


def compare_table(results: Results, *, title: str | None = None, percent: bool = True) -> Table:
    """Models side by side: one column per model, rows clean and every BER (``mean ± std``); the best
    model of each row (highest mean, or lowest where the metric says lower is better) marked ``*``."""
    items = as_labelled(results)
    caption = _caption(items)
    if len(items) > 1:
        best = "*: best of the row"
        caption = f"{caption}; {best}" if caption else best
    return _rich(*_compare_rows(items, percent), title, caption)


def format_markdown_table(results: Results, *, compare: bool = False, percent: bool = True) -> str:
    """The :func:`ber_table` (or, with ``compare``, the :func:`compare_table`) as a markdown table."""
    items = as_labelled(results)
    headers, rows, text_cols = (_compare_rows if compare else _ber_rows)(items, percent)

    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" if i in text_cols else "---:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    notes = [n for n in (_caption(items), "*: best of the row" if compare and len(items) > 1 else None) if n]
    if notes:
        lines += ["", "; ".join(notes)]
    if compare:
        p_headers, p_rows = _paired(items, percent)
        if p_rows:
            lines += ["", "| " + " | ".join(p_headers) + " |", "|---|---|---:|---|---:|"]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in p_rows]
    return "\n".join(lines) + "\n"


def render_text(table: Table, width: int = 120) -> str:
    """A rich table rendered to plain text (no colour codes)."""
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(table)
    return buf.getvalue()
