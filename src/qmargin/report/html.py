"""One self-contained HTML report of stored results (plain dicts in, one HTML string out).

:func:`report_html` renders a *document*, a plain dict that ``qmargin.experiments.report_inputs``
assembles from result files (or any caller builds by hand):

* ``title``: the page title;
* ``comparisons``: ``[{"title", "results": [(label, campaign result), ...], "note"?}]``: one
  metric-vs-BER plot per entry (line: mean; band: min-max or mean ± std over patterns; bars: the 95 %
  confidence interval of the mean, :func:`qmargin.stats.mean_confidence_interval`), the
  comparison table (per BER, each model, the best mean of the row marked by the metric's
  ``higher_is_better``) and the per-model statistics;
* ``certificates``: ``[{"title", "rows": [certificate dicts of `qmargin certify`], "per_channel"?}]``;
* ``mondeq``: ``[{"title", "summary": summary of `qmargin reproduce mondeq`}]``;
* ``configurations``: ``[{"label", "config": any JSON value}]``, each a collapsible ``<details>``;
* ``provenance``: :func:`qmargin.report.provenance.provenance` (version, command, date, machine,
  the SHA-256 of every input file);
* ``band``: ``"minmax"`` (default) or ``"std"``.

The page loads nothing: plots are inline SVG (matplotlib, text kept as text, element ids prefixed
per plot), the style is inline, there is no script, and a Content-Security-Policy
(``default-src 'none'``) makes the browser refuse any load a result file could smuggle in. Every
text that comes from a file is escaped (:func:`html.escape`).

Machine-checkable numbers: every number is an element ``<span class="v" data-stat=KEY
data-value=JSON data-format=FMT ...>TEXT</span>``. ``data-value`` is the exact value of the result
file (``json.dumps``: the shortest repr, which reads back to the same double), ``TEXT`` is
``format(value, FMT)``, or ``format(100 * value, FMT[4:])`` when ``FMT`` starts with ``100*``
(percent), ``yes`` / ``no`` for ``FMT == "bool"``. Campaign values carry ``data-group`` (the
comparison, 1-based), ``data-model`` (the label) and ``data-ber`` (the BER as JSON; the clean value
has ``data-stat="clean"`` and no BER); their stats are ``clean``, ``mean``, ``std``, ``min``,
``max``, ``ci_low``, ``ci_high``, ``patterns``, and in the paired-difference table (every model
against the first, :func:`qmargin.report.tables.paired_rows`) ``diff_mean``, ``diff_ci_low``,
``diff_ci_high``, ``diff_n``. Certificate values carry ``data-table``
(``certificate``, or ``float`` / ``ptq`` / ``displacement`` / ``qat`` of a MonDEQ reproduction),
``data-source`` and ``data-row`` (the row's index in its list).
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qmargin.report.tables import (
    Result,
    as_labelled,
    clean_value,
    entry_count,
    format_ber,
    metric_label,
    metric_of,
    paired_rows,
)
from qmargin.stats import CI_LEVEL, mean_confidence_interval

__all__ = ["report_html", "figure_svg", "format_value", "CSP"]

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
"""The page's Content-Security-Policy: no scripts, no network, inline styles and data: images only."""

DASH = "–"

_STYLE = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dee7; --band: #f4f6fa; --accent: #1f5fbf;
        --best: #e4f3e6; --bestfg: #14612a; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { padding: 22px 32px 14px; border-bottom: 1px solid var(--line); background: var(--band); }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: var(--muted); font-size: 13px; }
nav { padding: 8px 32px; font-size: 13px; border-bottom: 1px solid var(--line); }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
main { padding: 8px 32px 32px; max-width: 1180px; }
section { margin: 26px 0 34px; }
h2 { font-size: 18px; margin: 0 0 6px; border-bottom: 2px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.note { color: var(--muted); font-size: 13px; margin: 4px 0 10px; }
figure.plot { margin: 10px 0 16px; }
figure.plot svg { width: 100%; max-width: 860px; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12.5px; max-width: 860px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 4px 9px; vertical-align: top; }
th { background: var(--band); font-weight: 600; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { text-align: left; }
td.best { background: var(--best); color: var(--bestfg); font-weight: 600; }
span.star { margin-left: 3px; }
small.ci { color: var(--muted); font-weight: 400; }
tbody tr:nth-child(even) td:not(.best) { background: #fafbfd; }
details { margin: 6px 0; }
summary { cursor: pointer; color: var(--accent); }
pre { background: var(--band); border: 1px solid var(--line); padding: 10px; overflow-x: auto;
      font-size: 12.5px; max-height: 480px; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; font-size: 13.5px; }
dl.prov dt { color: var(--muted); }
dl.prov dd { margin: 0; }
code { font-size: 12.5px; word-break: break-all; }
footer { color: var(--muted); font-size: 12px; padding: 0 32px 24px; }
"""


# -- values ---------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    """Escaped text (also fit for a quoted attribute)."""
    return html.escape(str(text), quote=True)


def format_value(value: Any, fmt: str) -> str:
    """The text of a value in the page: ``format(value, fmt)``; ``100*SPEC`` formats ``100 * value``;
    ``bool`` is ``yes`` / ``no``; ``ber`` is :func:`format_ber`."""
    if value is None:
        return DASH
    if fmt == "bool":
        return "yes" if value else "no"
    if fmt == "ber":
        return format_ber(float(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if fmt.startswith("100*"):
        return format(100.0 * float(value), fmt[4:])
    return format(value, fmt)


def _json(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _span(value: Any, fmt: str, attrs: Mapping[str, Any]) -> str:
    """A machine-checkable number: ``<span class="v" data-...>``."""
    if value is None:
        return DASH
    parts = [f'data-{k}="{_e(v)}"' for k, v in attrs.items() if v is not None]
    parts += [f'data-value="{_e(_json(value))}"', f'data-format="{_e(fmt)}"']
    return f'<span class="v" {" ".join(parts)}>{_e(format_value(value, fmt))}</span>'


def _table(head: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]], attrs: str = "") -> str:
    """``rows``: cells ``(class, inner html)``."""
    out = [f"<table{attrs}>", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>"]
    out.append("<tbody>")
    for row in rows:
        cells = "".join(
            f'<td class="{cls}">{inner}</td>' if cls else f"<td>{inner}</td>" for cls, inner in row
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


# -- plots ----------------------------------------------------------------------------------------

_ID = re.compile(r'\bid="([^"]+)"')
_REF = re.compile(r'(url\(#|href="#)([^)"]+)')


def figure_svg(fig: Any, prefix: str) -> str:
    """A matplotlib figure as an inline ``<svg>`` element: text kept as text, no XML prolog, no
    metadata, every element id (and every reference to one) prefixed with ``prefix`` so several plots
    share one page, the size left to the page's style (``viewBox`` kept)."""
    import matplotlib  # lazy: only the report needs it here (plots.py imports it anyway)

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue().decode("utf-8")
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = _ID.sub(lambda m: f'id="{prefix}-{m.group(1)}"', svg)
    svg = _REF.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", svg)
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 role="img"', svg, count=1)
    return svg.strip()


def _plain(text: str) -> str:
    """Text for matplotlib with no mathtext (a ``$`` in a run's name stays a dollar sign)."""
    return text.replace("$", r"\$")


# -- campaign comparisons -------------------------------------------------------------------------


def _entries(res: Result) -> dict[float, Mapping[str, Any]]:
    return {float(e["ber"]): e for e in res["results"]}


def _stats(e: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """mean, std, min, max, patterns and the confidence interval of a BER entry with values."""
    if e is None or not entry_count(e) or e.get("mean") is None:
        return None
    n = entry_count(e)
    ci = mean_confidence_interval(float(e["mean"]), float(e["std"]), n)
    return {
        "mean": e["mean"],
        "std": e["std"],
        "min": e["min"],
        "max": e["max"],
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
        "patterns": n,
    }


STAR = '<span class="star" title="best of the row">★</span>'


def _marked(inner: str, best: bool) -> tuple[str, str]:
    """A comparison cell; the best of its row gets class ``best`` and a star after its mean."""
    if not best:
        return ("num", inner)
    head, sep, tail = inner.partition("<br>")
    return ("num best", head + STAR + sep + tail)


def _paired_section(index: int, items: list[tuple[str, Result]], fmt: str, unit: str) -> list[str]:
    """Every model against the first over their shared pattern seeds (paired t, :func:`paired_rows`)."""
    rows_in = paired_rows(items)
    if not rows_in:
        return []
    pfmt = "100*+.2f" if fmt.startswith("100*") else "+.4f"
    punit = " (points)" if unit else ""
    head = ["model", "BER", f"mean difference{punit}", f"{100 * CI_LEVEL:g} % CI{punit}", "shared seeds"]
    rows: list[list[tuple[str, str]]] = []
    for d in rows_in:
        a = {"group": index, "model": d["model"], "ber": _json(d["ber"])}
        ci = DASH
        if d["ci_low"] is not None:
            ci = (
                f"[{_span(d['ci_low'], pfmt, {**a, 'stat': 'diff_ci_low'})}, "
                f"{_span(d['ci_high'], pfmt, {**a, 'stat': 'diff_ci_high'})}]"
            )
        rows.append(
            [
                ("text", _e(f"{d['model']} - {d['reference']}")),
                ("text", _e(format_ber(d["ber"]))),
                ("num", _span(d["mean"], pfmt, {**a, "stat": "diff_mean"})),
                ("num", ci),
                ("num", _span(d["n"], "d", {**a, "stat": "diff_n"})),
            ]
        )
    return [
        f"<h3>Paired differences against {_e(items[0][0])}</h3>",
        '<p class="note">Over the pattern seeds both campaigns hold (same seed, same error pattern for '
        f"models of the same shapes): mean of the per-pattern differences and its {100 * CI_LEVEL:g} % "
        "confidence interval (paired Student t). An interval that excludes 0 means the difference is "
        "not pattern noise.</p>",
        _table(head, rows, f' class="paired" data-group="{index}"'),
    ]


def _comparison(index: int, comp: Mapping[str, Any], band: str) -> str:
    from qmargin.report.plots import accuracy_vs_ber_figure  # lazy: matplotlib

    items = as_labelled([(str(label), res) for label, res in comp["results"]])
    metric = metric_of(items[0][1])
    percent = bool(metric["fraction"])
    fmt = "100*.2f" if percent else ".4f"
    unit = " (%)" if percent else ""
    higher = bool(metric["higher_is_better"])
    name = metric_label(metric)
    title = str(comp.get("title") or f"{name} under random bit errors")
    group = {"group": index}
    out = [
        f'<section id="comparison-{index}" class="comparison" data-group="{index}">',
        f"<h2>{_e(title)}</h2>",
    ]
    direction = "higher is better" if higher else "lower is better"
    note = f"Metric: {name}{unit}, {direction}. " + (str(comp["note"]) + " " if comp.get("note") else "")
    out.append(f'<p class="note">{_e(note)}</p>')

    fig = accuracy_vs_ber_figure(
        [(_plain(label), res) for label, res in items],
        None,
        band=band,
        percent=True,
        ci=True,
        legend_outside=True,
        zoom=True,
    )
    band_txt = "minimum to maximum over the patterns" if band == "minmax" else "mean ± std over the patterns"
    out.append(
        f'<figure class="plot">{figure_svg(fig, f"g{index}")}<figcaption>Line: mean over the error '
        f"patterns of each BER; shaded band: {band_txt}; bars: {100 * CI_LEVEL:g} % confidence "
        "interval of the mean (Student t over the patterns). Left panel: the clean value (no "
        "injection). The value axis spans the data.</figcaption></figure>"
    )

    # the comparison table: one row per BER, one column per model
    labels = [label for label, _ in items]
    entries = [_entries(res) for _, res in items]
    bers = sorted({b for es in entries for b in es})
    head = ["BER", *[f"{label}{unit}" for label in labels]]
    rows: list[list[tuple[str, str]]] = []

    def best_of(values: list[float | None]) -> set[int]:
        known = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        if len(labels) < 2 or len(known) < 2:
            return set()
        target = (max if higher else min)(v for _, v in known)
        return {i for i, v in known if v == target}

    cleans: list[float | None] = [clean_value(res) for _, res in items]
    best = best_of(cleans)
    row = [("text", "clean")]
    for i, (label, res) in enumerate(items):
        span = _span(
            res["clean_accuracy" if "clean_accuracy" in res else "clean_value"],
            fmt,
            {**group, "model": label, "stat": "clean"},
        )
        row.append(_marked(span, i in best))
    rows.append(row)
    for ber in bers:
        stats = [_stats(es.get(ber)) for es in entries]
        best = best_of([None if s is None else float(s["mean"]) for s in stats])
        row = [("text", _e(format_ber(ber)))]
        for i, (label, s) in enumerate(zip(labels, stats, strict=True)):
            if s is None:
                row.append(("num", DASH))
                continue
            a = {**group, "model": label, "ber": _json(ber)}
            mean = _span(s["mean"], fmt, {**a, "stat": "mean"})
            inner = f"{mean} ± {_span(s['std'], fmt, {**a, 'stat': 'std'})}"
            if s["ci_low"] is not None:
                inner += (
                    f'<br><small class="ci">CI [{_span(s["ci_low"], fmt, {**a, "stat": "ci_low"})}, '
                    f"{_span(s['ci_high'], fmt, {**a, 'stat': 'ci_high'})}]</small>"
                )
            row.append(_marked(inner, i in best))
        rows.append(row)
    out.append(f"<h3>Comparison: mean ± std over patterns, {100 * CI_LEVEL:g} % CI of the mean</h3>")
    if len(labels) > 1:
        out.append(f'<p class="note">★: the best mean of the row ({direction}).</p>')
    out.append(_table(head, rows, f' class="compare" data-group="{index}"'))
    out += _paired_section(index, items, fmt, unit)

    # per-model statistics
    head = [
        "model",
        "BER",
        f"mean{unit}",
        f"std{unit}",
        f"min{unit}",
        f"max{unit}",
        f"CI low{unit}",
        f"CI high{unit}",
        "patterns",
    ]
    rows = []
    for label, es in zip(labels, entries, strict=True):
        for ber in sorted(es):
            s = _stats(es[ber])
            row = [("text", _e(label)), ("text", _e(format_ber(ber)))]
            if s is None:
                row += [("num", DASH)] * 7
            else:
                a = {**group, "model": label, "ber": _json(ber)}
                for key in ("mean", "std", "min", "max", "ci_low", "ci_high"):
                    row.append(("num", _span(s[key], fmt, {**a, "stat": key})))
                row.append(("num", _span(s["patterns"], "d", {**a, "stat": "patterns"})))
            rows.append(row)
    out.append("<details><summary>Per-model statistics (mean, std, min, max, confidence interval)</summary>")
    out.append(_table(head, rows, f' class="stats" data-group="{index}"'))
    out.append("</details></section>")
    return "\n".join(out)


# -- certificates and the MonDEQ reproduction -----------------------------------------------------

Column = tuple[str, str, str]  # key, header, format ("" = text)

CERTIFICATE_COLUMNS: list[Column] = [
    ("bits", "bits", "d"),
    ("delta_w_norm", "‖dW‖₂", ".4f"),
    ("margin", "μ(W)", ".4f"),
    ("margin_quantized", "exact μ(W~)", ".4f"),
    ("certified", "certified", "bool"),
    ("monotone", "monotone", "bool"),
    ("pr_rate", "PR rate", ".4f"),
    ("fb_rate", "FB rate", ".4f"),
    ("max_certified_bit_flips", "max flips", "d"),
    ("max_certified_bit_flips_msb2_protected", "max flips, 2 MSBs protected", "d"),
    ("ber_certified_share", "BER certified (%)", "100*.2f"),
    ("ber_monotone_share", "BER monotone (%)", "100*.2f"),
]
_OPTIONAL = {"ber_certified_share", "ber_monotone_share"}

FLOAT_COLUMNS: list[Column] = [
    ("seed", "seed", "d"),
    ("accuracy", "accuracy (%)", "100*.1f"),
    ("m", "m", ".3f"),
    ("mu", "μ(W)", ".3f"),
    ("L", "L(W)", ".3f"),
]
PTQ_COLUMNS: list[Column] = [
    ("per_channel", "per-row scales", "bool"),
    ("bits", "bits", "d"),
    ("delta_w_norm", "‖dW‖₂", ".4f"),
    ("margin", "μ(W)", ".4f"),
    ("margin_quantized", "exact μ(W~)", ".4f"),
    ("certified", "certified", "bool"),
    ("monotone", "monotone", "bool"),
    ("fb_iterations", "FB iters", "d"),
    ("pr_iterations", "PR iters", "d"),
    ("pr_converged", "PR converged", "bool"),
    ("accuracy", "accuracy (%)", "100*.1f"),
]
DISPLACEMENT_COLUMNS: list[Column] = [
    ("bits", "bits", ""),
    ("share_full", "full bound holds (%)", "100*.1f"),
    ("share_norm_form", "norm form (%)", "100*.1f"),
    ("share_paper", "paper form (%)", "100*.1f"),
    ("mean_distance", "mean ‖z*−z~*‖", ".4g"),
    ("mean_full", "mean full bound", ".4g"),
    ("mean_paper", "mean paper bound", ".4g"),
    ("ratio_paper", "max dist / paper bound", ".2f"),
]
QAT_COLUMNS: list[Column] = [
    ("method", "method", ""),
    ("bits", "bits", "d"),
    ("seed", "seed", "d"),
    ("per_channel", "per-row scales", "bool"),
    ("m", "m", ".3f"),
    ("delta_w_norm", "‖dW‖₂", ".4f"),
    ("margin", "μ(W)", ".4f"),
    ("margin_quantized", "exact μ(W~)", ".4f"),
    ("certified", "certified", "bool"),
    ("pr_converged", "PR converged", "bool"),
    ("accuracy", "accuracy (%)", "100*.1f"),
]


def _row_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], table: str, source: str) -> str:
    cols = [c for c in columns if c[0] not in _OPTIONAL or any(c[0] in r for r in rows)]
    body = []
    for i, r in enumerate(rows):
        attrs = {"table": table, "source": source, "row": i}
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if not fmt:
                cells.append(("text", _e(DASH if v is None else v)))
            else:
                cells.append(("num", _span(v, fmt, {**attrs, "stat": key})))
        body.append(cells)
    return _table(
        [h for _, h, _ in cols], body, f' class="rows" data-table="{_e(table)}" data-source="{_e(source)}"'
    )


def _certificates(index: int, cert: Mapping[str, Any]) -> str:
    title = str(cert.get("title") or "MonDEQ certificates")
    source = f"certificate-{index}"
    out = [f'<section id="{source}" class="certificates">', f"<h2>{_e(title)}</h2>"]
    scales = cert.get("per_channel")
    note = "Certificates from the weights alone: ‖dW‖₂ < μ(W) certifies that the quantized MonDEQ stays "
    note += "monotone (one equilibrium, convergent solvers); “max flips” is the number of arbitrary bit "
    note += "flips of W's stored codes that provably keep it monotone."
    if scales is not None:
        note += " Scales: " + ("per row." if scales else "per tensor.")
    out.append(f'<p class="note">{_e(note)}</p>')
    out.append(_row_table(list(cert["rows"]), CERTIFICATE_COLUMNS, "certificate", source))
    out.append("</section>")
    return "\n".join(out)


def _mondeq(index: int, item: Mapping[str, Any]) -> str:
    from qmargin.report.plots import mondeq_displacement_figure, mondeq_margin_vs_bits_figure  # lazy

    s = item["summary"]
    title = str(item.get("title") or "MonDEQ reproduction")
    source = f"mondeq-{index}"
    out = [f'<section id="{source}" class="mondeq">', f"<h2>{_e(title)}</h2>"]
    if s.get("float"):
        out += ["<h3>Float model</h3>", _row_table(s["float"], FLOAT_COLUMNS, "float", source)]
    if s.get("ptq"):
        out += [
            "<h3>Post-training quantization: certificates (W, U, b and head at the same bits)</h3>",
            f'<figure class="plot">{figure_svg(mondeq_margin_vs_bits_figure(s), f"m{index}a")}'
            "<figcaption>The certificate holds where ‖dW‖₂ lies below μ(W).</figcaption></figure>",
            _row_table(s["ptq"], PTQ_COLUMNS, "ptq", source),
        ]
    if s.get("displacement"):
        out += [
            "<h3>Displacement bounds (share of the test samples where each bound holds)</h3>",
            _row_table(s["displacement"], DISPLACEMENT_COLUMNS, "displacement", source),
        ]
        if all(
            d.get("distances") and d.get("bound_full") and d.get("bound_paper") for d in s["displacement"]
        ):
            out.append(
                f'<figure class="plot">{figure_svg(mondeq_displacement_figure(s), f"m{index}b")}'
                "<figcaption>Points above the line violate the bound.</figcaption></figure>"
            )
    if s.get("qat"):
        out += [
            "<h3>Quantization-aware training: certificates</h3>",
            _row_table(s["qat"], QAT_COLUMNS, "qat", source),
        ]
    out.append("</section>")
    return "\n".join(out)


# -- configurations and provenance ----------------------------------------------------------------


def _configurations(configs: Sequence[Mapping[str, Any]]) -> str:
    out = ['<section id="configurations">', "<h2>Resolved configurations</h2>"]
    for c in configs:
        text = json.dumps(c.get("config"), indent=2, sort_keys=True, allow_nan=True, default=str)
        out.append(f"<details><summary>{_e(c.get('label', ''))}</summary><pre>{_e(text)}</pre></details>")
    out.append("</section>")
    return "\n".join(out)


def _provenance(prov: Mapping[str, Any]) -> str:
    out = ['<section id="provenance">', "<h2>Provenance</h2>", '<dl class="prov">']
    for key, label in (
        ("qmargin_version", "qmargin"),
        ("command", "command"),
        ("date", "date (UTC)"),
        ("machine", "machine"),
    ):
        value = prov.get(key)
        inner = f"<code>{_e(value)}</code>" if key == "command" else _e(value)
        out.append(f'<dt>{_e(label)}</dt><dd data-provenance="{key}">{inner}</dd>')
    out.append("</dl>")
    inputs = list(prov.get("inputs", []))
    if inputs:
        rows = [
            [
                ("text", f"<code>{_e(i.get('path'))}</code>"),
                (
                    "text",
                    f'<code data-path="{_e(i.get("path"))}" data-sha256="{_e(i.get("sha256"))}">'
                    f"{_e(i.get('sha256'))}</code>",
                ),
                ("num", _e(i.get("bytes", DASH))),
            ]
            for i in inputs
        ]
        out += ["<h3>Input files</h3>", _table(["file", "SHA-256", "bytes"], rows, ' class="inputs"')]
    out.append("</section>")
    return "\n".join(out)


# -- the page -------------------------------------------------------------------------------------


def report_html(document: Mapping[str, Any]) -> str:
    """The whole page (see the module docstring for the document's keys)."""
    band = str(document.get("band", "minmax"))
    title = str(document.get("title") or "qmargin report")
    prov = dict(document.get("provenance") or {})
    parts: list[tuple[str, str, str]] = []  # anchor, navigation text, section
    for i, comp in enumerate(document.get("comparisons", []), 1):
        nav_text = str(comp.get("title") or "comparison")
        parts.append((f"comparison-{i}", nav_text, _comparison(i, comp, band)))
    for i, cert in enumerate(document.get("certificates", []), 1):
        nav_text = str(cert.get("title") or "certificates")
        parts.append((f"certificate-{i}", nav_text, _certificates(i, cert)))
    for i, item in enumerate(document.get("mondeq", []), 1):
        parts.append((f"mondeq-{i}", str(item.get("title") or "MonDEQ"), _mondeq(i, item)))
    configs = list(document.get("configurations", []))
    nav = [f'<a href="#{anchor}">{_e(text)}</a>' for anchor, text, _ in parts]
    if configs:
        nav.append('<a href="#configurations">configurations</a>')
    nav.append('<a href="#provenance">provenance</a>')
    sub = " · ".join(
        _e(x)
        for x in (f"qmargin {prov.get('qmargin_version', '?')}", prov.get("date"), prov.get("machine"))
        if x
    )
    body = [section for _, _, section in parts]
    if not parts:
        body.append('<p class="note">No results.</p>')
    if configs:
        body.append(_configurations(configs))
    body.append(_provenance(prov))
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="generator" content="qmargin">',
            f"<title>{_e(title)}</title>",
            f"<style>{_STYLE}</style>",
            "</head>",
            "<body>",
            f"<header><h1>{_e(title)}</h1><p>{sub}</p></header>",
            f"<nav>{''.join(nav)}</nav>",
            "<main>",
            *body,
            "</main>",
            "<footer>Written by qmargin; self-contained (no network, no scripts).</footer>",
            "</body>",
            "</html>",
            "",
        ]
    )
